//! The fused kernels of `kernels-cubecl`, reached from generic model code.
//!
//! The kernels exist for concrete backends (NdArray, and CubeCL's CUDA backend in a `cuda`
//! build), with and without autodiff; the model is generic over `B: Backend`. Each entry point
//! here recognises the concrete backend at run time and otherwise hands its inputs back, so the
//! caller falls back to the plain-Burn reference (any other backend, e.g. a test's).

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use kernels_cubecl::{fused_linear_cross_entropy, CrossEntropy, FusedCrossEntropyBackend, LinearCrossEntropyOptions};

use super::{cast, same};

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
    let inputs = (h, w, labels);
    let inputs = match lce_via::<B, Autodiff<NdArray<f32>>>(inputs, options) {
        Ok(ce) => return Ok(ce),
        Err(inputs) => inputs,
    };
    let inputs = match lce_via::<B, NdArray<f32>>(inputs, options) {
        Ok(ce) => return Ok(ce),
        Err(inputs) => inputs,
    };
    #[cfg(feature = "cuda")]
    let inputs = {
        use burn::backend::cuda::Cuda;
        let mut inputs = inputs;
        macro_rules! try_cuda {
            ($($c:ty),*) => {$(
                inputs = match lce_via::<B, $c>(inputs, options) {
                    Ok(ce) => return Ok(ce),
                    Err(inputs) => inputs,
                };
            )*};
        }
        try_cuda!(
            Autodiff<Cuda<half::bf16>>,
            Autodiff<Cuda<half::f16>>,
            Autodiff<Cuda<f32>>,
            Cuda<half::bf16>,
            Cuda<half::f16>,
            Cuda<f32>
        );
        inputs
    };
    Err(inputs)
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
