//! The optimizer's per-parameter arithmetic as single operations: AdamW's update of one
//! parameter with its moments (gradient clipping folded in), and a gradient's sum of squares
//! for the global norm.
//!
//! A LoRA step updates hundreds of small tensors; as chains of Burn ops each update is a dozen
//! launches over a few thousand elements, so the step is bound by launches, not by memory.
//! [`FusedOptimizerBackend`]'s provided methods are those chains (NdArray uses them); CubeCL
//! backends run one kernel per parameter for each. Optimizer state is never tracked, so no
//! autodiff implementation is needed beyond forwarding.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

/// One AdamW update's scalars, as `torch.optim.AdamW` uses them: decoupled weight decay first,
/// then `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 0 for parameters that are not decayed.
    pub weight_decay: f64,
    /// `1 - beta1^step`.
    pub bias_correction1: f64,
    /// `1 - beta2^step`.
    pub bias_correction2: f64,
}

/// A parameter and its moments after one update.
pub struct AdamWUpdated<B: Backend> {
    /// In the parameter's dtype.
    pub param: Tensor<B, 1>,
    /// f32.
    pub exp_avg: Tensor<B, 1>,
    /// f32.
    pub exp_avg_sq: Tensor<B, 1>,
}

/// Backends that run the optimizer's fused per-parameter operations.
pub trait FusedOptimizerBackend: Backend {
    /// One AdamW update of `param` (`[n]`, any float dtype, updated in f32) from `grad` (`[n]`,
    /// f32) times `grad_scale` (a one-element f32 tensor: the clipping coefficient, left on the
    /// device) and the f32 moments.
    fn adamw_update(
        param: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        grad_scale: Tensor<Self, 1>,
        exp_avg: Tensor<Self, 1>,
        exp_avg_sq: Tensor<Self, 1>,
        step: AdamWStep,
    ) -> AdamWUpdated<Self> {
        adamw_update_value(param, grad, grad_scale, exp_avg, exp_avg_sq, step)
    }

    /// `sum(g^2)` over every element of every tensor of `grads` (each `[n]`, f32) as a
    /// one-element f32 tensor: the square of the global gradient norm. `grads` must not be empty.
    fn sum_of_squares(grads: &[Tensor<Self, 1>]) -> Tensor<Self, 1> {
        sum_of_squares_value(grads)
    }
}

/// [`FusedOptimizerBackend::sum_of_squares`] in plain Burn.
pub fn sum_of_squares_value<B: Backend>(grads: &[Tensor<B, 1>]) -> Tensor<B, 1> {
    assert!(!grads.is_empty(), "sum_of_squares of no tensors");
    // Empty gradients add nothing; on CUDA a launch over no elements fails.
    let sums: Vec<_> = grads.iter().filter(|g| g.dims()[0] > 0).map(|g| g.clone().powi_scalar(2).sum()).collect();
    if sums.is_empty() {
        return Tensor::zeros([1], (&grads[0].device(), DType::F32));
    }
    Tensor::cat(sums, 0).sum()
}

/// [`FusedOptimizerBackend::adamw_update`] in plain Burn.
pub fn adamw_update_value<B: Backend>(
    param: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    grad_scale: Tensor<B, 1>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    s: AdamWStep,
) -> AdamWUpdated<B> {
    let dtype = param.dtype();
    let p = if dtype == DType::F32 { param } else { param.cast(FloatDType::F32) };
    let g = grad * grad_scale;
    let exp_avg = exp_avg * s.beta1 + g.clone() * (1.0 - s.beta1);
    let exp_avg_sq = exp_avg_sq * s.beta2 + g.powi_scalar(2) * (1.0 - s.beta2);
    let p = if s.weight_decay > 0.0 { p * (1.0 - s.lr * s.weight_decay) } else { p };
    let denom = exp_avg_sq.clone().sqrt() / s.bias_correction2.sqrt() + s.eps;
    let p = p - exp_avg.clone() / denom * (s.lr / s.bias_correction1);
    let param = if dtype == DType::F32 { p } else { p.cast(dtype) };
    AdamWUpdated { param, exp_avg, exp_avg_sq }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FusedOptimizerBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

/// The inner backend's operations on the untracked values.
impl<B: FusedOptimizerBackend, C: CheckpointStrategy> FusedOptimizerBackend for Autodiff<B, C> {
    fn adamw_update(
        param: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        grad_scale: Tensor<Self, 1>,
        exp_avg: Tensor<Self, 1>,
        exp_avg_sq: Tensor<Self, 1>,
        step: AdamWStep,
    ) -> AdamWUpdated<Self> {
        let u = B::adamw_update(param.inner(), grad.inner(), grad_scale.inner(), exp_avg.inner(), exp_avg_sq.inner(), step);
        AdamWUpdated {
            param: Tensor::from_inner(u.param),
            exp_avg: Tensor::from_inner(u.exp_avg),
            exp_avg_sq: Tensor::from_inner(u.exp_avg_sq),
        }
    }

    fn sum_of_squares(grads: &[Tensor<Self, 1>]) -> Tensor<Self, 1> {
        let inner: Vec<_> = grads.iter().map(|g| g.clone().inner()).collect();
        Tensor::from_inner(B::sum_of_squares(&inner))
    }
}
