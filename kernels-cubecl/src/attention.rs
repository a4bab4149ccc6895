//! Memory-efficient grouped-query attention: [`crate::reference::attention`] without the
//! `[batch, q_heads, seq, seq]` scores that autodiff would keep for backward.
//!
//! FlashAttention's algorithm at the granularity of query blocks, in plain Burn ops. Forward
//! takes the queries one block of rows at a time; each block sees all the keys it may read, so
//! its softmax is exact (no online rescaling) and only the block's `[batch, q_heads, rows, keys]`
//! scores exist at once. Autodiff keeps `q`, `k`, `v`, the mask, the output `O` and each row's
//! log-sum-exp `L` (`[batch, q_heads, seq]`, f32); backward recomputes one block's probabilities
//! as `P = exp(S - L)` and accumulates `dK`, `dV` across blocks. With [`AttentionOptions::causal`]
//! a block of queries `[i0, i1)` reads only keys `[0, i1)`, which halves the work.
//!
//! Query head `h` reads key/value head `h / groups`. The kernels never repeat `k` and `v`: a
//! block of queries `[b, q_heads, rows, d]` is viewed as `[b, kv_heads, groups * rows, d]`, so
//! one batched matmul per kv head serves all its query heads, and `P^T dO`, `dS^T Q` sum over the
//! group's query heads inside the matmul.
//!
//! [`FusedAttentionBackend`] has this plain-Burn implementation as provided methods (NdArray
//! uses it all; CubeCL backends replace each block's softmax and its backward, the
//! [`FusedAttentionBackend::attention_block_softmax`] and
//! [`FusedAttentionBackend::attention_block_grad`] steps, by row kernels); `Autodiff<B>` turns
//! the inner backend's forward and backward into one autodiff op.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, DType, FloatDType, Tensor, TensorPrimitive};

use crate::qkv::QkvLayout;

/// Budget for one query block's f32 scores `[batch, q_heads, rows, seq]` (backward holds a few
/// tensors of this size at once: scores, probabilities, their gradient).
const SCORE_BLOCK_BYTES: usize = 256 << 20;

/// How [`memory_efficient_attention`] runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttentionOptions {
    /// Query rows per block; `None` picks [`AttentionOptions::block_q_for`]'s default.
    pub block_q: Option<usize>,
    /// A promise that `blocked` includes the causal mask (as [`crate::attention_mask`]'s does),
    /// so that a block of queries skips the keys after its last row. With `false` any mask is
    /// honoured.
    pub causal: bool,
    /// Which implementation runs ([`AttentionKernel`]).
    pub kernel: AttentionKernel,
}

/// Which implementation of the attention runs, where a backend has several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// The flash kernels where they keep their accumulators in registers (CUDA's manual mma
    /// for bf16/f16 at head dims that are multiples of 16 up to 128, each pass where its
    /// tiles fit shared memory), faster at the step there (benches/RESULTS.md, session 31);
    /// the blockwise path elsewhere (the cmma and per-unit flash kernels are not faster).
    /// `KERNELS_CUBECL_ATTENTION=flash` (or `=flash-forward`, `=blockwise`) in the environment
    /// picks one.
    #[default]
    Auto,
    /// The blockwise path of plain-Burn ops and row kernels.
    Blockwise,
    /// The flash forward (on CUDA tensor cores with its accumulators in registers where it can)
    /// and the blockwise backward, which reads the forward's output and log-sum-exp alike.
    FlashForward,
    /// The flash kernels wherever the backend has them for the inputs (CubeCL: on tensor cores
    /// for bf16/f16 at head dims that are multiples of 16 up to 128, else one unit per product
    /// element, as in the wgpu tests), the blockwise path elsewhere.
    Flash,
}

impl AttentionOptions {
    /// Default blocks for a causal mask.
    pub const CAUSAL: Self = Self { block_q: None, causal: true, kernel: AttentionKernel::Auto };

    /// Query rows per block. The default is the largest power of two whose f32 scores
    /// `[batch, q_heads, rows, seq]` fit in 256 MiB (256 rows for batch 4, 28 heads, seq 2048),
    /// never more than `seq`.
    pub fn block_q_for(&self, batch: usize, q_heads: usize, seq: usize) -> usize {
        let block = self.block_q.unwrap_or_else(|| {
            let row_bytes = (batch * q_heads * seq * size_of::<f32>()).max(1);
            let rows = (SCORE_BLOCK_BYTES / row_bytes).max(1);
            1 << rows.ilog2()
        });
        block.clamp(1, seq.max(1))
    }
}

/// The blockwise forward's results.
pub struct AttentionForward<B: Backend> {
    /// `[batch, q_heads, seq, head_dim]` in `q`'s dtype.
    pub output: Tensor<B, 4>,
    /// Log-sum-exp of each query row's masked, scaled scores, `[batch, q_heads, seq]`, f32.
    pub lse: Tensor<B, 3>,
}

/// Which gradients [`FusedAttentionBackend::blockwise_attention_backward`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionWanted {
    pub q: bool,
    pub k: bool,
    pub v: bool,
}

/// Gradients of the attention's inputs, each in its input's dtype, when wanted.
pub struct AttentionGrads<B: Backend> {
    /// `[batch, q_heads, seq, head_dim]`.
    pub q: Option<Tensor<B, 4>>,
    /// `[batch, kv_heads, seq, head_dim]`.
    pub k: Option<Tensor<B, 4>>,
    /// `[batch, kv_heads, seq, head_dim]`.
    pub v: Option<Tensor<B, 4>>,
}

/// Backends that run [`memory_efficient_attention`].
pub trait FusedAttentionBackend: Backend {
    /// `a @ b` of two `[b1, b2, m, k]` x `[b1, b2, k, n]` tensors (either may be a view: a
    /// transposed or narrowed one); the blockwise forward and backward run every matmul through
    /// it. Burn's matmul by default; CubeCL backends take a registered faster GEMM
    /// (`set_batched_gemm`, with the `cubecl` feature).
    fn attention_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        a.matmul(b)
    }

    /// The implementation [`FusedAttentionBackend::blockwise_attention_forward`] and
    /// [`FusedAttentionBackend::blockwise_attention_backward`] run for these inputs and options:
    /// [`AttentionKernel::Flash`] or [`AttentionKernel::Blockwise`] (the default, for backends
    /// without flash kernels).
    fn attention_kernel(q: &Tensor<Self, 4>, k: &Tensor<Self, 4>, v: &Tensor<Self, 4>, options: AttentionOptions) -> AttentionKernel {
        let _ = (q, k, v, options);
        AttentionKernel::Blockwise
    }

    /// One query block's softmax, [`block_softmax`] by default: from the raw scores `q k^T`
    /// (`[batch, q_heads, rows, keys]`, input dtype) and the block's mask (`[batch, 1, rows,
    /// keys]`, `true` = may not read), the probabilities of `scores * scale` in f32, returned in
    /// the scores' dtype, and each row's log-sum-exp `[batch, q_heads, rows]` in f32.
    fn attention_block_softmax(
        scores: Tensor<Self, 4>,
        scale: f64,
        mask: Tensor<Self, 4, Bool>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        block_softmax(scores, scale, mask)
    }

    /// One query block's softmax backward, [`block_softmax_grad`] by default: the probabilities
    /// `P = exp(scores * scale - lse)` rebuilt from the forward's `lse` (`[batch, q_heads, rows]`,
    /// f32), returned in the scores' dtype when `want_probs`, and with `upstream = (dP, delta)`
    /// (`dP = dO v^T` like the scores, `delta = rowsum(dO O)` like `lse`) the scores' gradient
    /// `dS = P (dP - delta)` in the scores' dtype (unscaled).
    fn attention_block_grad(
        scores: Tensor<Self, 4>,
        scale: f64,
        mask: Tensor<Self, 4, Bool>,
        lse: Tensor<Self, 3>,
        upstream: Option<(Tensor<Self, 4>, Tensor<Self, 3>)>,
        want_probs: bool,
    ) -> (Option<Tensor<Self, 4>>, Option<Tensor<Self, 4>>) {
        block_softmax_grad(scores, scale, mask, lse, upstream, want_probs)
    }

    /// Output and row log-sum-exp, one query block at a time; untracked.
    ///
    /// # Shapes
    /// As [`memory_efficient_attention`]; panics on mismatched shapes.
    fn blockwise_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        options: AttentionOptions,
    ) -> AttentionForward<Self> {
        blockwise_forward(q, k, v, scale, blocked, options)
    }

    /// The wanted gradients given the upstream gradient `grad_output` and the forward's saved
    /// `output` and `lse`; untracked.
    #[allow(clippy::too_many_arguments)]
    fn blockwise_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        saved: AttentionForward<Self>,
        grad_output: Tensor<Self, 4>,
        options: AttentionOptions,
        wanted: AttentionWanted,
    ) -> AttentionGrads<Self> {
        blockwise_backward(q, k, v, scale, blocked, saved, grad_output, options, wanted)
    }

    /// The attention as an operation of the backend: on autodiff backends its gradient flows to
    /// `q`, `k` and `v`.
    fn blockwise_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        options: AttentionOptions,
    ) -> Tensor<Self, 4> {
        Self::blockwise_attention_forward(q, k, v, scale, blocked, options).output
    }

    /// [`FusedAttentionBackend::blockwise_attention`] of the q, k and v of a packed tensor
    /// ([`crate::qkv`]); on autodiff backends its gradient flows to the packed tensor, as one.
    fn qkv_attention(packed: Tensor<Self, 1>, layout: QkvLayout, scale: f64, blocked: Tensor<Self, 4, Bool>, options: AttentionOptions) -> Tensor<Self, 4> {
        let [q, k, v] = layout.split(packed);
        Self::blockwise_attention(q, k, v, scale, blocked, options)
    }
}

/// Grouped-query attention `softmax(q k^T * scale + mask) v` with softmax in f32, equal to
/// [`crate::reference::attention`] but holding the scores of one block of query rows at a time,
/// in forward and in backward; differentiable with respect to `q`, `k`, `v` on autodiff backends.
///
/// # Shapes
/// - `q`: `[batch, q_heads, seq, head_dim]`, `k`/`v`: `[batch, kv_heads, seq, head_dim]` with
///   `q_heads` a multiple of `kv_heads`, `blocked`: `[batch, 1, seq, seq]` (`true` = may not
///   read) → `[batch, q_heads, seq, head_dim]` in `q`'s dtype
///
/// # Panics
/// On shapes other than these.
pub fn memory_efficient_attention<B: FusedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    blocked: Tensor<B, 4, Bool>,
    options: AttentionOptions,
) -> Tensor<B, 4> {
    B::blockwise_attention(q, k, v, scale, blocked, options)
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
}

impl Dims {
    pub(crate) fn check<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, blocked: &Tensor<B, 4, Bool>) -> Self {
        let [batch, q_heads, seq, head_dim] = q.dims();
        let kv_heads = k.dims()[1];
        assert!(
            kv_heads > 0 && q_heads % kv_heads == 0,
            "attention: {q_heads} query heads are not a multiple of {kv_heads} kv heads"
        );
        let kv = [batch, kv_heads, seq, head_dim];
        assert_eq!(k.dims(), kv, "attention: q is {:?} but k is {:?}", q.dims(), k.dims());
        assert_eq!(v.dims(), kv, "attention: k is {:?} but v is {:?}", k.dims(), v.dims());
        assert_eq!(blocked.dims(), [batch, 1, seq, seq], "attention: q is {:?} but blocked is {:?}", q.dims(), blocked.dims());
        Self { batch, q_heads, kv_heads, seq, head_dim }
    }

    /// [`Dims::check`], and the saved output and upstream gradient shaped like `q`: every
    /// backward's contract.
    pub(crate) fn check_backward<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        blocked: &Tensor<B, 4, Bool>,
        output: &Tensor<B, 4>,
        grad_output: &Tensor<B, 4>,
    ) -> Self {
        let dims = Self::check(q, k, v, blocked);
        assert_eq!(output.dims(), q.dims(), "attention backward: output is {:?}, q {:?}", output.dims(), q.dims());
        assert_eq!(grad_output.dims(), q.dims(), "attention backward: grad is {:?}, q {:?}", grad_output.dims(), q.dims());
        dims
    }

    fn groups(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// `[b, q_heads, rows, x]` → `[b, kv_heads, groups * rows, x]`: the rows of a kv head's query
    /// heads one after the other (query head `h` is `kv * groups + j`).
    fn group<B: Backend>(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, _, rows, x] = t.dims();
        t.reshape([b, self.kv_heads, self.groups() * rows, x])
    }

    /// Inverse of [`Dims::group`].
    fn ungroup<B: Backend>(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, _, grouped, x] = t.dims();
        t.reshape([b, self.q_heads, grouped / self.groups(), x])
    }

    /// The query blocks as `(first row, rows, keys it reads)`.
    fn blocks(&self, options: AttentionOptions) -> impl Iterator<Item = (usize, usize, usize)> {
        let (seq, causal) = (self.seq, options.causal);
        let block = options.block_q_for(self.batch, self.q_heads, seq);
        (0..seq).step_by(block).map(move |i0| {
            let rows = block.min(seq - i0);
            (i0, rows, if causal { i0 + rows } else { seq })
        })
    }
}

fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

fn cast<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}

/// Rows `[i0, i0 + rows)` of a `[b, h, seq, x]` tensor.
fn rows_of<B: Backend>(t: &Tensor<B, 4>, i0: usize, rows: usize) -> Tensor<B, 4> {
    t.clone().narrow(2, i0, rows)
}

/// One query block's raw scores `q k^T` against keys `[0, keys)`, `[b, q_heads, rows, keys]` in
/// the input dtype (as the reference), and its mask `[b, 1, rows, keys]`. `q_blk` is grouped
/// (`[b, kv_heads, groups * rows, d]`), `k_blk` the keys read.
fn block_scores<B: FusedAttentionBackend>(
    dims: &Dims,
    q_blk: Tensor<B, 4>,
    k_blk: Tensor<B, 4>,
    blocked: &Tensor<B, 4, Bool>,
    (i0, rows, keys): (usize, usize, usize),
) -> (Tensor<B, 4>, Tensor<B, 4, Bool>) {
    let scores = dims.ungroup(B::attention_matmul(q_blk, k_blk.swap_dims(2, 3)));
    (scores, blocked.clone().narrow(2, i0, rows).narrow(3, 0, keys))
}

/// `scores * scale` in f32 (the scale applied after the conversion), masked with `-inf`.
fn masked_scaled<B: Backend>(scores: Tensor<B, 4>, scale: f64, mask: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    let dims = scores.dims();
    (to_f32(scores) * scale).mask_fill(mask.expand(dims), f32::NEG_INFINITY)
}

/// The plain-Burn [`FusedAttentionBackend::attention_block_softmax`]: `softmax(scores * scale)`
/// in f32 over the keys the mask lets each row read, and `L = max + ln(sum exp)`. A row that
/// may read no key gets probabilities 0 and `L = +inf`, as flash-attention keeps it: its output
/// and every gradient through it are 0, never NaN (the masks of [`crate::reference`] leave no
/// such row; a caller's own mask may).
pub fn block_softmax<B: Backend>(scores: Tensor<B, 4>, scale: f64, mask: Tensor<B, 4, Bool>) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, h, rows, _] = scores.dims();
    let dtype = scores.dtype();
    let scores = masked_scaled(scores, scale, mask);
    let max = scores.clone().max_dim(3);
    // -inf only where every key is masked; any readable score is above the finite floor.
    let empty = max.clone().lower_elem(EMPTY_ROW_FLOOR);
    let max = max.mask_fill(empty.clone(), 0.0);
    let exp = (scores - max.clone()).exp();
    let sum = exp.clone().sum_dim(3);
    let probs = cast(exp / sum.clone().mask_fill(empty.clone(), 1.0), dtype);
    let lse = (max + sum.log()).mask_fill(empty, f32::INFINITY);
    (probs, lse.reshape([b, h, rows]))
}

/// Below any readable scaled score: a row's max under it means the row reads no key.
pub(crate) const EMPTY_ROW_FLOOR: f32 = -3.0e38;

/// The plain-Burn [`FusedAttentionBackend::attention_block_grad`]: `P = exp(scores * scale - L)`
/// in f32 (masked entries 0, and every entry of a row whose `L` is `+inf`), `dS = P (dP -
/// delta)`, each returned in the scores' dtype.
pub fn block_softmax_grad<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f64,
    mask: Tensor<B, 4, Bool>,
    lse: Tensor<B, 3>,
    upstream: Option<(Tensor<B, 4>, Tensor<B, 3>)>,
    want_probs: bool,
) -> (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) {
    let dtype = scores.dtype();
    // Every operand in f32: Burn's binary ops take one dtype, and on CUDA an f32 minus a bf16
    // `delta` gave -inf where both were finite (2026-12-02).
    let probs = (masked_scaled(scores, scale, mask) - to_f32(lse).unsqueeze_dim::<4>(3)).exp();
    let d_scores = upstream.map(|(d_probs, delta)| cast(probs.clone() * (to_f32(d_probs) - to_f32(delta).unsqueeze_dim::<4>(3)), dtype));
    (want_probs.then(|| cast(probs, dtype)), d_scores)
}

/// The plain-Burn blockwise forward: per query block the exact f32 softmax over the keys it
/// reads, `P v` with `P` in the input dtype (as the reference), and `L = max + ln(sum exp)`.
pub fn blockwise_forward<B: FusedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    blocked: Tensor<B, 4, Bool>,
    options: AttentionOptions,
) -> AttentionForward<B> {
    let dims = Dims::check(&q, &k, &v, &blocked);
    let dtype = q.dtype();
    if dims.seq == 0 {
        let lse = Tensor::<B, 3>::zeros([dims.batch, dims.q_heads, 0], &q.device()).cast(FloatDType::F32);
        return AttentionForward { output: q, lse };
    }
    let mut outputs = Vec::new();
    let mut lses = Vec::new();
    for (i0, rows, keys) in dims.blocks(options) {
        let q_blk = dims.group(rows_of(&q, i0, rows));
        let (scores, mask) = block_scores(&dims, q_blk, k.clone().narrow(2, 0, keys), &blocked, (i0, rows, keys));
        let (probs, lse) = B::attention_block_softmax(scores, scale, mask);
        outputs.push(dims.ungroup(B::attention_matmul(dims.group(cast(probs, dtype)), v.clone().narrow(2, 0, keys))));
        lses.push(lse);
    }
    AttentionForward { output: Tensor::cat(outputs, 2), lse: Tensor::cat(lses, 2) }
}

/// Adds `part` (`[b, h, keys, d]`) to the first `keys` rows of the accumulator `acc`.
fn accumulate<B: Backend>(acc: Tensor<B, 4>, part: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, seq, d] = acc.dims();
    let keys = part.dims()[2];
    if keys == seq {
        return acc + part;
    }
    let updated = acc.clone().narrow(2, 0, keys) + part;
    acc.slice_assign([0..b, 0..h, 0..keys, 0..d], updated)
}

/// The plain-Burn blockwise backward: per query block, `P = exp(S - L)` recomputed from the
/// saved `L`, `dV += P^T dO`, `dS = P (dO v^T - rowsum(dO O))`, `dQ = dS k * scale`,
/// `dK += dS^T q * scale`. Matmul operands in the input dtype, `dK`/`dV` accumulated in f32.
#[allow(clippy::too_many_arguments)]
pub fn blockwise_backward<B: FusedAttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    blocked: Tensor<B, 4, Bool>,
    saved: AttentionForward<B>,
    grad_output: Tensor<B, 4>,
    options: AttentionOptions,
    wanted: AttentionWanted,
) -> AttentionGrads<B> {
    let dims = Dims::check_backward(&q, &k, &v, &blocked, &saved.output, &grad_output);
    let (q_dtype, k_dtype, v_dtype) = (q.dtype(), k.dtype(), v.dtype());
    // The matmul operands share one dtype, q's (the output's, hence dO's).
    let grad_output = cast(grad_output, q_dtype);
    let need_ds = wanted.q || wanted.k;
    if !(need_ds || wanted.v) {
        return AttentionGrads { q: None, k: None, v: None };
    }
    let kv_dims = [dims.batch, dims.kv_heads, dims.seq, dims.head_dim];
    let zeros = |shape: [usize; 4]| Tensor::<B, 4>::zeros(shape, &q.device()).cast(FloatDType::F32);
    let mut grad_q = Vec::new();
    let mut grad_k = wanted.k.then(|| zeros(kv_dims));
    let mut grad_v = wanted.v.then(|| zeros(kv_dims));
    for block @ (i0, rows, keys) in dims.blocks(options) {
        let q_blk = dims.group(rows_of(&q, i0, rows));
        let k_blk = k.clone().narrow(2, 0, keys);
        let d_out = rows_of(&grad_output, i0, rows);
        let lse = saved.lse.clone().narrow(2, i0, rows);
        let (scores, mask) = block_scores(&dims, q_blk.clone(), k_blk.clone(), &blocked, block);
        let upstream = need_ds.then(|| {
            // rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax's correction, from d-wide rows.
            let delta = (to_f32(d_out.clone()) * to_f32(rows_of(&saved.output, i0, rows))).sum_dim(3);
            let v_blk = cast(v.clone().narrow(2, 0, keys), q_dtype);
            let d_probs = dims.ungroup(B::attention_matmul(dims.group(d_out.clone()), v_blk.swap_dims(2, 3)));
            (d_probs, delta.reshape([dims.batch, dims.q_heads, rows]))
        });
        let (probs, d_scores) = B::attention_block_grad(scores, scale, mask, lse, upstream, wanted.v);
        if let Some(probs) = probs {
            let part = B::attention_matmul(dims.group(cast(probs, q_dtype)).swap_dims(2, 3), dims.group(d_out));
            grad_v = grad_v.map(|acc| accumulate(acc, to_f32(part)));
        }
        if let Some(d_scores) = d_scores {
            let d_scores = dims.group(cast(d_scores, q_dtype));
            if wanted.q {
                let k_blk = cast(k_blk, q_dtype);
                grad_q.push(cast(to_f32(dims.ungroup(B::attention_matmul(d_scores.clone(), k_blk))) * scale, q_dtype));
            }
            if wanted.k {
                let part = B::attention_matmul(d_scores.swap_dims(2, 3), q_blk);
                grad_k = grad_k.map(|acc| accumulate(acc, to_f32(part)));
            }
        }
    }
    AttentionGrads {
        q: wanted.q.then(|| match grad_q.is_empty() {
            true => cast(zeros(q.dims()), q_dtype),
            false => Tensor::cat(grad_q, 2),
        }),
        k: grad_k.map(|g| cast(g * scale, k_dtype)),
        v: grad_v.map(|g| cast(g, v_dtype)),
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FusedAttentionBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

/// What backward needs: the inputs, the mask, the output and the row log-sum-exp.
#[derive(Debug, Clone)]
struct AttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    blocked: BoolTensor<B>,
    output: FloatTensor<B>,
    lse: FloatTensor<B>,
    scale: f64,
    options: AttentionOptions,
}

#[derive(Debug)]
struct AttentionBackward;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

impl<B: FusedAttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad_output = float::<B, 4>(grads.consume::<B>(&ops.node));
        let state = ops.state;
        let wanted = AttentionWanted { q: node_q.is_some(), k: node_k.is_some(), v: node_v.is_some() };
        let saved = AttentionForward { output: float(state.output), lse: float(state.lse) };
        let result = B::blockwise_attention_backward(
            float(state.q),
            float(state.k),
            float(state.v),
            state.scale,
            Tensor::from_primitive(state.blocked),
            saved,
            grad_output,
            state.options,
            wanted,
        );
        for (node, grad) in [(node_q, result.q), (node_k, result.k), (node_v, result.v)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

impl<B: FusedAttentionBackend, C: CheckpointStrategy> FusedAttentionBackend for Autodiff<B, C> {
    fn qkv_attention(packed: Tensor<Self, 1>, layout: QkvLayout, scale: f64, blocked: Tensor<Self, 4, Bool>, options: AttentionOptions) -> Tensor<Self, 4> {
        crate::qkv::tracked_attention::<B, C>(packed, layout, scale, blocked, options)
    }

    fn attention_kernel(q: &Tensor<Self, 4>, k: &Tensor<Self, 4>, v: &Tensor<Self, 4>, options: AttentionOptions) -> AttentionKernel {
        B::attention_kernel(&q.clone().inner(), &k.clone().inner(), &v.clone().inner(), options)
    }

    /// The inner backend's computation; the results are untracked values.
    fn blockwise_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        options: AttentionOptions,
    ) -> AttentionForward<Self> {
        let f = B::blockwise_attention_forward(q.inner(), k.inner(), v.inner(), scale, blocked.inner(), options);
        AttentionForward { output: Tensor::from_inner(f.output), lse: Tensor::from_inner(f.lse) }
    }

    /// The inner backend's computation; the results are untracked values.
    fn blockwise_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        saved: AttentionForward<Self>,
        grad_output: Tensor<Self, 4>,
        options: AttentionOptions,
        wanted: AttentionWanted,
    ) -> AttentionGrads<Self> {
        let saved = AttentionForward { output: saved.output.inner(), lse: saved.lse.inner() };
        let g = B::blockwise_attention_backward(
            q.inner(),
            k.inner(),
            v.inner(),
            scale,
            blocked.inner(),
            saved,
            grad_output.inner(),
            options,
            wanted,
        );
        AttentionGrads { q: g.q.map(Tensor::from_inner), k: g.k.map(Tensor::from_inner), v: g.v.map(Tensor::from_inner) }
    }

    fn blockwise_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        scale: f64,
        blocked: Tensor<Self, 4, Bool>,
        options: AttentionOptions,
    ) -> Tensor<Self, 4> {
        let blocked = blocked.inner();
        let (q, k, v) = (q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor());
        let outer = |t: FloatTensor<Self>| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(t));
        match AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let f = B::blockwise_attention_forward(
                    float(q.primitive.clone()),
                    float(k.primitive.clone()),
                    float(v.primitive.clone()),
                    scale,
                    blocked.clone(),
                    options,
                );
                let output = f.output.into_primitive().tensor();
                let state = AttentionState {
                    q: q.primitive,
                    k: k.primitive,
                    v: v.primitive,
                    blocked: blocked.into_primitive(),
                    output: output.clone(),
                    lse: f.lse.into_primitive().tensor(),
                    scale,
                    options,
                };
                outer(prep.finish(state, output))
            }
            OpsKind::UnTracked(prep) => {
                let output = B::blockwise_attention(
                    float(q.primitive),
                    float(k.primitive),
                    float(v.primitive),
                    scale,
                    blocked,
                    options,
                );
                outer(prep.finish(output.into_primitive().tensor()))
            }
        }
    }
}
