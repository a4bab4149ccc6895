//! Fused linear cross-entropy for the LM head: the loss of `h @ w` against labels without ever
//! holding all `[tokens, vocab]` logits, as Liger-Kernel's `fused_linear_cross_entropy` does.
//!
//! Tokens are taken in chunks; for each chunk the `[chunk, vocab]` logits are computed in f32,
//! turned into the rows' losses and, in the same pass, into `d loss / d logits = softmax -
//! onehot(target)`, which is then multiplied back into `dh` and `dw` at once. The forward pass
//! therefore already holds the gradients (they are no larger than `h` and `w`); backward only
//! scales them by the upstream gradient. The maths is [`crate::reference::linear_cross_entropy`].
//!
//! [`FusedCrossEntropyBackend`] has a plain-Burn chunked implementation that every backend can
//! use (it is what `NdArray` uses); CubeCL backends override it with a kernel (`crate::cube`), and
//! `Autodiff<B>` turns either into an autodiff op.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use crate::reference::CrossEntropy;

/// How [`fused_linear_cross_entropy`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearCrossEntropyOptions {
    /// Labels equal to this are not counted and get no gradient.
    pub ignore_index: i64,
    /// Tokens per chunk; `None` picks [`LinearCrossEntropyOptions::chunk_tokens_for`]'s default.
    pub chunk_tokens: Option<usize>,
}

impl Default for LinearCrossEntropyOptions {
    fn default() -> Self {
        Self { ignore_index: -100, chunk_tokens: None }
    }
}

impl LinearCrossEntropyOptions {
    /// Tokens per chunk for `tokens` rows of a `[hidden, vocab]` head. The default is Liger's: a
    /// power of two that makes one chunk's `[chunk, vocab]` logits about as large as `h` itself.
    pub fn chunk_tokens_for(&self, tokens: usize, hidden: usize, vocab: usize) -> usize {
        let chunk = self.chunk_tokens.unwrap_or_else(|| {
            let logits_per_hidden = vocab.div_ceil(hidden.max(1)).max(1);
            tokens.div_ceil(logits_per_hidden).next_power_of_two()
        });
        chunk.clamp(1, tokens.max(1))
    }
}

/// Which gradients [`FusedCrossEntropyBackend::linear_cross_entropy_parts`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WantedGrads {
    pub h: bool,
    pub w: bool,
}

impl WantedGrads {
    pub const NONE: Self = Self { h: false, w: false };
    pub const BOTH: Self = Self { h: true, w: true };

    pub fn any(self) -> bool {
        self.h || self.w
    }
}

/// The loss of a linear cross-entropy and, when asked for, its gradients.
pub struct LinearCrossEntropyParts<B: Backend> {
    /// Sum over counted tokens of `-log p(target)`, in f32. Shape `[1]`.
    pub sum: Tensor<B, 1>,
    /// Number of labels not equal to the ignore index.
    pub tokens: usize,
    /// `d sum / d h`, `[tokens, hidden]` in `h`'s dtype, when [`WantedGrads::h`].
    pub grad_h: Option<Tensor<B, 2>>,
    /// `d sum / d w`, `[hidden, vocab]` in `w`'s dtype, when [`WantedGrads::w`].
    pub grad_w: Option<Tensor<B, 2>>,
}

/// Backends that run [`fused_linear_cross_entropy`].
pub trait FusedCrossEntropyBackend: Backend {
    /// Loss and the wanted gradients of `cross_entropy(h @ w, labels)`, chunked over tokens.
    ///
    /// # Shapes
    /// - `h`: `[tokens, hidden]`, `w`: `[hidden, vocab]`, `labels`: `[tokens]`
    ///
    /// # Panics
    /// On mismatched shapes, and on a label outside `[0, vocab)` that is not the ignore index.
    fn linear_cross_entropy_parts(
        h: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        labels: Tensor<Self, 1, Int>,
        options: LinearCrossEntropyOptions,
        wanted: WantedGrads,
    ) -> LinearCrossEntropyParts<Self> {
        chunked_linear_cross_entropy(h, w, labels, options, wanted)
    }

    /// The loss as an operation of the backend: on autodiff backends its gradient flows to `h`
    /// and `w`.
    fn linear_cross_entropy(
        h: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        labels: Tensor<Self, 1, Int>,
        options: LinearCrossEntropyOptions,
    ) -> CrossEntropy<Self> {
        let parts = Self::linear_cross_entropy_parts(h, w, labels, options, WantedGrads::NONE);
        CrossEntropy { sum: parts.sum, tokens: parts.tokens }
    }
}

/// Summed cross-entropy of the logits `h @ w` against `labels` and the number of counted
/// tokens, equal to [`crate::reference::linear_cross_entropy`] but holding at most one chunk of
/// logits at a time; differentiable with respect to `h` and `w` on autodiff backends.
///
/// # Shapes
/// - `h`: `[tokens, hidden]` (any float dtype), `w`: `[hidden, vocab]` (stored `[in, out]`),
///   `labels`: `[tokens]`
pub fn fused_linear_cross_entropy<B: FusedCrossEntropyBackend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    options: LinearCrossEntropyOptions,
) -> CrossEntropy<B> {
    B::linear_cross_entropy(h, w, labels, options)
}

/// Checks shapes and labels and returns `(tokens, hidden, vocab, counted tokens)`.
pub(crate) fn check_inputs<B: Backend>(
    h: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    labels: &Tensor<B, 1, Int>,
    ignore_index: i64,
) -> (usize, usize, usize, usize) {
    let [tokens, hidden] = h.dims();
    let [w_in, vocab] = w.dims();
    assert_eq!(hidden, w_in, "linear_cross_entropy: h is [{tokens}, {hidden}] but w is [{w_in}, {vocab}]");
    assert_eq!(labels.dims(), [tokens], "linear_cross_entropy: {tokens} hidden states but labels {:?}", labels.dims());
    let keep = labels.clone().not_equal_elem(ignore_index);
    // A label outside the vocabulary would make a kernel read another row's logit: refuse it.
    let out_of_range = labels
        .clone()
        .lower_elem(0)
        .bool_or(labels.clone().greater_equal_elem(vocab as i64))
        .bool_and(keep.clone());
    let counts = Tensor::cat(vec![keep.int().sum(), out_of_range.int().sum()], 0);
    let counts: Vec<i64> = counts.into_data().convert::<i64>().to_vec().expect("i64 counts");
    assert_eq!(
        counts[1], 0,
        "linear_cross_entropy: {} labels are outside [0, {vocab}) and not the ignore index {ignore_index}",
        counts[1]
    );
    (tokens, hidden, vocab, counts[0] as usize)
}

/// The plain-Burn chunked computation: the logits of one chunk at a time in f32 (from an f32
/// copy of `w`), the gradient through `log_softmax`'s closed form.
pub fn chunked_linear_cross_entropy<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    options: LinearCrossEntropyOptions,
    wanted: WantedGrads,
) -> LinearCrossEntropyParts<B> {
    let (n, hidden, vocab, tokens) = check_inputs(&h, &w, &labels, options.ignore_index);
    let device = h.device();
    let (h_dtype, w_dtype) = (h.dtype(), w.dtype());
    let w32 = w.cast(FloatDType::F32);
    let chunk = options.chunk_tokens_for(n, hidden, vocab);
    let mut losses = Vec::new();
    let mut grad_h_chunks = Vec::new();
    let mut grad_w: Option<Tensor<B, 2>> = None;
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let h_chunk = h.clone().slice([start..start + rows, 0..hidden]).cast(FloatDType::F32);
        let labels_chunk = labels.clone().slice([start..start + rows]);
        let keep = labels_chunk.clone().not_equal_elem(options.ignore_index);
        let keep_col = keep.clone().float().cast(FloatDType::F32).reshape([rows, 1]);
        let targets = labels_chunk.mask_fill(keep.bool_not(), 0).reshape([rows, 1]);
        let logp = log_softmax(h_chunk.clone().matmul(w32.clone()), 1);
        losses.push(logp.clone().gather(1, targets.clone()).neg() * keep_col.clone());
        if wanted.any() {
            let dlogits =
                logp.exp().scatter(1, targets, keep_col.clone().neg(), IndexingUpdateOp::Add) * keep_col;
            if wanted.h {
                grad_h_chunks.push(dlogits.clone().matmul(w32.clone().transpose()).cast(h_dtype));
            }
            if wanted.w {
                let part = h_chunk.transpose().matmul(dlogits);
                grad_w = Some(match grad_w {
                    None => part,
                    Some(acc) => acc + part,
                });
            }
        }
    }
    let sum = if losses.is_empty() {
        Tensor::<B, 1>::zeros([1], &device).cast(FloatDType::F32)
    } else {
        Tensor::cat(losses, 0).sum()
    };
    let grad_h = wanted.h.then(|| match grad_h_chunks.is_empty() {
        true => Tensor::<B, 2>::zeros([n, hidden], &device).cast(h_dtype),
        false => Tensor::cat(grad_h_chunks, 0),
    });
    let grad_w = wanted.w.then(|| match grad_w {
        Some(g) => g.cast(w_dtype),
        None => Tensor::<B, 2>::zeros([hidden, vocab], &device).cast(w_dtype),
    });
    LinearCrossEntropyParts { sum, tokens, grad_h, grad_w }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FusedCrossEntropyBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

/// The gradients computed in forward, `d sum / d h` and `d sum / d w` of the parents that are
/// tracked.
type KeptGrads<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: Backend> Backward<B, 2> for LinearCrossEntropyBackward {
    type State = KeptGrads<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let upstream = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let (grad_h, grad_w) = ops.state;
        let scale = |grad: FloatTensor<B>| -> FloatTensor<B> {
            let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
            let dtype = grad.dtype();
            let upstream = upstream.clone().cast(FloatDType::F32).reshape([1, 1]);
            // Scaled in f32 so that a low-precision gradient is rounded once, not scaled by a
            // rounded upstream gradient (1/tokens in bf16 is off by up to 0.4%).
            let scaled = grad.cast(FloatDType::F32) * upstream;
            scaled.cast(dtype).into_primitive().tensor()
        };
        if let (Some(node), Some(grad)) = (node_h, grad_h) {
            grads.register::<B>(node.id, scale(grad));
        }
        if let (Some(node), Some(grad)) = (node_w, grad_w) {
            grads.register::<B>(node.id, scale(grad));
        }
    }
}

impl<B: FusedCrossEntropyBackend, C: CheckpointStrategy> FusedCrossEntropyBackend for Autodiff<B, C> {
    /// The inner backend's computation; the results are untracked values.
    fn linear_cross_entropy_parts(
        h: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        labels: Tensor<Self, 1, Int>,
        options: LinearCrossEntropyOptions,
        wanted: WantedGrads,
    ) -> LinearCrossEntropyParts<Self> {
        let parts = B::linear_cross_entropy_parts(h.inner(), w.inner(), labels.inner(), options, wanted);
        LinearCrossEntropyParts {
            sum: Tensor::from_inner(parts.sum),
            tokens: parts.tokens,
            grad_h: parts.grad_h.map(Tensor::from_inner),
            grad_w: parts.grad_w.map(Tensor::from_inner),
        }
    }

    fn linear_cross_entropy(
        h: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        labels: Tensor<Self, 1, Int>,
        options: LinearCrossEntropyOptions,
    ) -> CrossEntropy<Self> {
        let labels = labels.inner();
        let h = h.into_primitive().tensor();
        let w = w.into_primitive().tensor();
        let wanted = WantedGrads { h: h.is_tracked(), w: w.is_tracked() };
        let inner = |t: FloatTensor<B>| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
        let outer = |t: FloatTensor<Self>| Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(t));
        match LinearCrossEntropyBackward
            .prepare::<C>([h.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let parts = B::linear_cross_entropy_parts(inner(h.primitive), inner(w.primitive), labels, options, wanted);
                let kept = (
                    parts.grad_h.map(|g| g.into_primitive().tensor()),
                    parts.grad_w.map(|g| g.into_primitive().tensor()),
                );
                let sum = prep.finish(kept, parts.sum.into_primitive().tensor());
                CrossEntropy { sum: outer(sum), tokens: parts.tokens }
            }
            OpsKind::UnTracked(prep) => {
                let ce = B::linear_cross_entropy(inner(h.primitive), inner(w.primitive), labels, options);
                CrossEntropy { sum: outer(prep.finish(ce.sum.into_primitive().tensor())), tokens: ce.tokens }
            }
        }
    }
}
