//! The fused kernels of `kernels-cubecl`, reached from generic model code.
//!
//! The kernels exist for concrete backends (NdArray, and CubeCL's CUDA backend in a `cuda`
//! build), with and without autodiff; the model is generic over `B: Backend`. Each entry point
//! here recognises the concrete backend at run time and otherwise hands its inputs back, so the
//! caller falls back to the plain-Burn reference (any other backend, e.g. a test's).

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};
use kernels_cubecl::{
    fused_linear_cross_entropy, memory_efficient_attention, AttentionOptions, CrossEntropy, FusedAttentionBackend,
    FusedCrossEntropyBackend, LinearCrossEntropyOptions,
};

use super::{cast, same};

/// `$via::<B, $c>(inputs, args..)`, returning from the caller with its output when `B` is `$c`.
macro_rules! try_backend {
    ($inputs:ident, $via:ident, [$c:ty] $(, $arg:expr)*) => {
        let $inputs = match $via::<B, $c>($inputs $(, $arg)*) {
            Ok(out) => return Ok(out),
            Err(inputs) => inputs,
        };
    };
}

/// `$via::<B, C>(inputs, args..)` for each concrete backend `C` with the kernels until one takes
/// the inputs (`B` is `C`); the inputs back when none does.
macro_rules! first_backend {
    ($inputs:expr, $via:ident $(, $arg:expr)*) => {{
        let inputs = $inputs;
        try_backend!(inputs, $via, [Autodiff<NdArray<f32>>] $(, $arg)*);
        try_backend!(inputs, $via, [NdArray<f32>] $(, $arg)*);
        #[cfg(feature = "cuda")]
        let inputs = {
            use burn::backend::cuda::Cuda;
            try_backend!(inputs, $via, [Autodiff<Cuda<half::bf16>>] $(, $arg)*);
            try_backend!(inputs, $via, [Autodiff<Cuda<half::f16>>] $(, $arg)*);
            try_backend!(inputs, $via, [Autodiff<Cuda<f32>>] $(, $arg)*);
            try_backend!(inputs, $via, [Cuda<half::bf16>] $(, $arg)*);
            try_backend!(inputs, $via, [Cuda<half::f16>] $(, $arg)*);
            try_backend!(inputs, $via, [Cuda<f32>] $(, $arg)*);
            inputs
        };
        Err(inputs)
    }};
}

type LceInputs<B> = (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>);

/// `cross_entropy(h @ w, labels)` summed over counted tokens, without the `[tokens, vocab]`
/// logits ever being resident (chunked; gradients of `h` and `w` on autodiff backends), when `B`
/// has the fused kernel; `Err` hands the inputs back.
///
/// # Shapes
/// - `h`: `[tokens, hidden]`, `w`: `[hidden, vocab]`, `labels`: `[tokens]`
pub fn linear_cross_entropy<B: Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    ignore_index: i64,
) -> Result<CrossEntropy<B>, LceInputs<B>> {
    let options = LinearCrossEntropyOptions { ignore_index, chunk_tokens: None };
    first_backend!((h, w, labels), lce_via, options)
}

/// Grouped-query attention with `kernels_cubecl::reference::attention`'s maths and shapes,
/// computed in query blocks so that neither forward nor backward holds the `[seq, seq]` scores
/// of all heads (the op keeps its output and log-sum-exp and recomputes blocks in backward),
/// when `B` has the kernel; `Err` hands the inputs back. `blocked` must include the causal mask
/// (it lets each block skip the keys after it).
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    blocked: Tensor<B, 4, Bool>,
) -> Result<Tensor<B, 4>, AttentionInputs<B>> {
    first_backend!((q, k, v, blocked), attention_via, scale)
}

type AttentionInputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4, Bool>);

fn attention_via<B: Backend, C: FusedAttentionBackend>(inputs: AttentionInputs<B>, scale: f64) -> Result<Tensor<B, 4>, AttentionInputs<B>> {
    if !same::<B, C>() {
        return Err(inputs);
    }
    let (q, k, v, blocked) = inputs;
    let (q, k, v, blocked) = match (
        cast::<_, Tensor<C, 4>>(q),
        cast::<_, Tensor<C, 4>>(k),
        cast::<_, Tensor<C, 4>>(v),
        cast::<_, Tensor<C, 4, Bool>>(blocked),
    ) {
        (Ok(q), Ok(k), Ok(v), Ok(b)) => (q, k, v, b),
        _ => unreachable!("B is C"),
    };
    let out = memory_efficient_attention(q, k, v, scale, blocked, AttentionOptions::CAUSAL);
    match cast::<_, Tensor<B, 4>>(out) {
        Ok(out) => Ok(out),
        Err(_) => unreachable!("B is C"),
    }
}

fn lce_via<B: Backend, C: FusedCrossEntropyBackend>(
    (h, w, labels): LceInputs<B>,
    options: LinearCrossEntropyOptions,
) -> Result<CrossEntropy<B>, LceInputs<B>> {
    if !same::<B, C>() {
        return Err((h, w, labels));
    }
    let (h, w, labels) = match (cast::<_, Tensor<C, 2>>(h), cast::<_, Tensor<C, 2>>(w), cast::<_, Tensor<C, 1, Int>>(labels)) {
        (Ok(h), Ok(w), Ok(l)) => (h, w, l),
        _ => unreachable!("B is C"),
    };
    let ce = fused_linear_cross_entropy(h, w, labels, options);
    match cast::<_, Tensor<B, 1>>(ce.sum) {
        Ok(sum) => Ok(CrossEntropy { sum, tokens: ce.tokens }),
        Err(_) => unreachable!("B is C"),
    }
}
