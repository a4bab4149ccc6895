//! An attention layer's q, k and v packed in one tensor from the projection to the attention.
//!
//! When one GEMM projects q, k and v (`[batch, seq, (q_heads + 2 kv_heads) head_dim]`), taking
//! them apart with Burn's `narrow` costs the backward a zero-filled tensor of the whole width
//! per part and two additions of them (autodiff's slice backward). Here the projection's output
//! goes through two operations that each take one tensor, so their gradients are one tensor too:
//! [`qkv_rotary`] rotates q and k and lays the three out head-major, `[q | k | v]` with each part
//! `[batch, heads, seq, head_dim]` contiguous (the layout the attention's batched GEMMs read
//! without copies), and [`qkv_attention`] reads the parts as views.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor};

use crate::attention::{AttentionForward, AttentionOptions, AttentionWanted, FusedAttentionBackend};
use crate::layer_ops::{float, primitive, rotary_grad, rotary_value, FusedLayerBackend};

/// The sizes of a packed q/k/v.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One of q, k, v: its heads in the projection's order and its place in the packed tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvPart {
    /// First head among the projection's `q_heads + 2 kv_heads`.
    pub first_head: usize,
    pub heads: usize,
    /// Element offset in the packed tensor.
    pub offset: usize,
    /// Whether the rotary embedding applies (q and k) or not (v).
    pub rotated: bool,
}

impl QkvLayout {
    /// `q_heads + 2 kv_heads`.
    pub fn heads(&self) -> usize {
        self.q_heads + 2 * self.kv_heads
    }

    /// Elements of the packed tensor.
    pub fn len(&self) -> usize {
        self.batch * self.heads() * self.seq * self.head_dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// q, k and v in order.
    pub fn parts(&self) -> [QkvPart; 3] {
        let per_head = self.batch * self.seq * self.head_dim;
        let (q, kv) = (self.q_heads, self.kv_heads);
        [
            QkvPart { first_head: 0, heads: q, offset: 0, rotated: true },
            QkvPart { first_head: q, heads: kv, offset: q * per_head, rotated: true },
            QkvPart { first_head: q + kv, heads: kv, offset: (q + kv) * per_head, rotated: false },
        ]
    }

    /// The part's `[batch, heads, seq, head_dim]` view of a packed tensor.
    pub fn view<B: Backend>(&self, packed: Tensor<B, 1>, part: QkvPart) -> Tensor<B, 4> {
        let len = self.batch * part.heads * self.seq * self.head_dim;
        packed.narrow(0, part.offset, len).reshape([self.batch, part.heads, self.seq, self.head_dim])
    }

    /// q, k and v of a packed tensor, as views.
    pub fn split<B: Backend>(&self, packed: Tensor<B, 1>) -> [Tensor<B, 4>; 3] {
        self.parts().map(|part| self.view(packed.clone(), part))
    }

    fn check<B: Backend>(&self, projected: &Tensor<B, 3>) {
        let want = [self.batch, self.seq, self.heads() * self.head_dim];
        assert_eq!(projected.dims(), want, "qkv: the projection is {:?}, the layout wants {want:?}", projected.dims());
    }
}

/// [`FusedLayerBackend::qkv_rotary_forward`] in plain Burn.
pub fn qkv_rotary_value<B: Backend>(projected: Tensor<B, 3>, cos: Tensor<B, 4>, sin: Tensor<B, 4>, layout: QkvLayout) -> Tensor<B, 1> {
    layout.check(&projected);
    let QkvLayout { batch, seq, head_dim, .. } = layout;
    let heads = projected.reshape([batch, seq, layout.heads(), head_dim]);
    let parts = layout.parts().map(|part| {
        let x = heads.clone().narrow(2, part.first_head, part.heads).swap_dims(1, 2);
        let x = if part.rotated { rotary_value(x, cos.clone(), sin.clone()) } else { x };
        x.reshape([batch * part.heads * seq * head_dim])
    });
    Tensor::cat(parts.to_vec(), 0)
}

/// [`FusedLayerBackend::qkv_rotary_backward`] in plain Burn.
pub fn qkv_rotary_grad<B: Backend>(grad: Tensor<B, 1>, cos: Tensor<B, 4>, sin: Tensor<B, 4>, layout: QkvLayout) -> Tensor<B, 3> {
    let QkvLayout { batch, seq, head_dim, .. } = layout;
    let parts = layout.parts().map(|part| {
        let g = layout.view(grad.clone(), part);
        if part.rotated { rotary_grad(g, cos.clone(), sin.clone()) } else { g }
    });
    Tensor::cat(parts.to_vec(), 1).swap_dims(1, 2).reshape([batch, seq, layout.heads() * head_dim])
}

/// The rotary embedding of q and k ([`crate::reference::rotary`]'s maths in f32) from one
/// projection's output, with v, packed head-major (see the module); one op forward and one
/// backward, whose gradient is the projection's in its own layout.
///
/// # Shapes
/// - `projected`: `[batch, seq, (q_heads + 2 kv_heads) head_dim]`, `cos`/`sin`: `[batch or 1,
///   1, seq, head_dim]` → `[layout.len()]` in `projected`'s dtype
pub fn qkv_rotary<B: FusedLayerBackend>(projected: Tensor<B, 3>, cos: Tensor<B, 4>, sin: Tensor<B, 4>, layout: QkvLayout) -> Tensor<B, 1> {
    B::qkv_rotary(projected, cos, sin, layout)
}

/// [`crate::memory_efficient_attention`] of the q, k and v of a packed tensor; on autodiff
/// backends one op whose gradient is the packed tensor's.
///
/// # Shapes
/// - `packed`: `[layout.len()]`, `blocked`: `[batch, 1, seq, seq]` → `[batch, q_heads, seq,
///   head_dim]`
pub fn qkv_attention<B: FusedAttentionBackend>(
    packed: Tensor<B, 1>,
    layout: QkvLayout,
    scale: f64,
    blocked: Tensor<B, 4, Bool>,
    options: AttentionOptions,
) -> Tensor<B, 4> {
    B::qkv_attention(packed, layout, scale, blocked, options)
}

#[derive(Debug, Clone)]
struct RotaryState<B: Backend> {
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    layout: QkvLayout,
}

#[derive(Debug)]
struct QkvRotaryBackward;

impl<B: FusedLayerBackend> Backward<B, 1> for QkvRotaryBackward {
    type State = RotaryState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = float::<B, 1>(grads.consume::<B>(&ops.node));
        if let Some(node) = node {
            let s = ops.state;
            grads.register::<B>(node.id, primitive(B::qkv_rotary_backward(grad, float(s.cos), float(s.sin), s.layout)));
        }
    }
}

/// [`FusedLayerBackend::qkv_rotary`] on `Autodiff<B>`: the inner backend's forward and backward
/// as one op.
pub(crate) fn tracked_rotary<B: FusedLayerBackend, C: CheckpointStrategy>(
    projected: Tensor<Autodiff<B, C>, 3>,
    cos: Tensor<Autodiff<B, C>, 4>,
    sin: Tensor<Autodiff<B, C>, 4>,
    layout: QkvLayout,
) -> Tensor<Autodiff<B, C>, 1> {
    let (cos, sin) = (primitive(cos.inner()), primitive(sin.inner()));
    let x = primitive(projected);
    match QkvRotaryBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = B::qkv_rotary_forward(float(x.primitive), float(cos.clone()), float(sin.clone()), layout);
            float(prep.finish(RotaryState { cos, sin, layout }, primitive(y)))
        }
        OpsKind::UnTracked(prep) => float(prep.finish(primitive(B::qkv_rotary(float(x.primitive), float(cos), float(sin), layout)))),
    }
}

#[derive(Debug, Clone)]
struct AttentionState<B: Backend> {
    packed: FloatTensor<B>,
    blocked: BoolTensor<B>,
    output: FloatTensor<B>,
    lse: FloatTensor<B>,
    layout: QkvLayout,
    scale: f64,
    options: AttentionOptions,
}

#[derive(Debug)]
struct QkvAttentionBackward;

impl<B: FusedAttentionBackend> Backward<B, 1> for QkvAttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad_output = float::<B, 4>(grads.consume::<B>(&ops.node));
        let Some(node) = node else { return };
        let s = ops.state;
        let [q, k, v] = s.layout.split(float::<B, 1>(s.packed));
        let saved = AttentionForward { output: float(s.output), lse: float(s.lse) };
        let wanted = AttentionWanted { q: true, k: true, v: true };
        let g = B::blockwise_attention_backward(q, k, v, s.scale, Tensor::from_primitive(s.blocked), saved, grad_output, s.options, wanted);
        let parts = [g.q, g.k, g.v].into_iter().zip(s.layout.parts()).map(|(g, part)| {
            let g = g.unwrap_or_else(|| unreachable!("every gradient of the packed attention is wanted"));
            g.reshape([s.layout.batch * part.heads * s.layout.seq * s.layout.head_dim])
        });
        grads.register::<B>(node.id, primitive(Tensor::cat(parts.collect(), 0)));
    }
}

/// [`FusedAttentionBackend::qkv_attention`] on `Autodiff<B>`: the inner backend's blockwise
/// forward and backward on views of the packed tensor, one op.
pub(crate) fn tracked_attention<B: FusedAttentionBackend, C: CheckpointStrategy>(
    packed: Tensor<Autodiff<B, C>, 1>,
    layout: QkvLayout,
    scale: f64,
    blocked: Tensor<Autodiff<B, C>, 4, Bool>,
    options: AttentionOptions,
) -> Tensor<Autodiff<B, C>, 4> {
    let blocked = blocked.inner();
    let packed = primitive(packed);
    match QkvAttentionBackward.prepare::<C>([packed.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let [q, k, v] = layout.split(float::<B, 1>(packed.primitive.clone()));
            let f = B::blockwise_attention_forward(q, k, v, scale, blocked.clone(), options);
            let output = primitive(f.output);
            let state = AttentionState {
                packed: packed.primitive,
                blocked: blocked.into_primitive(),
                output: output.clone(),
                lse: primitive(f.lse),
                layout,
                scale,
                options,
            };
            float(prep.finish(state, output))
        }
        OpsKind::UnTracked(prep) => {
            let output = B::qkv_attention(float(packed.primitive), layout, scale, blocked, options);
            float(prep.finish(primitive(output)))
        }
    }
}
