//! The optimizer's arithmetic over many tensors at once: AdamW's update of a list of parameters
//! with their moments (gradient clipping folded in), and the sum of squares of a list of
//! gradients for the global norm.
//!
//! A LoRA step updates hundreds of small tensors; as chains of Burn ops each update is a dozen
//! launches over a few thousand elements, and even one kernel per tensor leaves the step's end
//! bound by the host's launches. [`FusedOptimizerBackend`]'s provided methods are the chains
//! (NdArray uses them); CubeCL backends run multi-tensor kernels, dozens of tensors per launch,
//! as torch's fused AdamW does. Optimizer state is never tracked, so no autodiff implementation
//! is needed beyond forwarding.

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

/// One parameter of an AdamW update with its gradient and moments.
pub struct AdamWTensors<B: Backend> {
    /// `[n]`, any float dtype (updated in f32).
    pub param: Tensor<B, 1>,
    /// `[n]`, f32.
    pub grad: Tensor<B, 1>,
    /// `[n]`, f32.
    pub exp_avg: Tensor<B, 1>,
    /// `[n]`, f32.
    pub exp_avg_sq: Tensor<B, 1>,
}

/// Backends that run the optimizer's fused operations.
pub trait FusedOptimizerBackend: Backend {
    /// One AdamW update of each of `tensors` with the same scalars, every gradient times
    /// `grad_scale` (a one-element f32 tensor: the clipping coefficient, left on the device);
    /// the updated tensors in `tensors`' order. CubeCL backends update a list of tensors per
    /// launch (moments in place when nothing else holds them).
    fn adamw_update_many(tensors: Vec<AdamWTensors<Self>>, grad_scale: Tensor<Self, 1>, step: AdamWStep) -> Vec<AdamWUpdated<Self>> {
        tensors.into_iter().map(|t| adamw_update_value(t, grad_scale.clone(), step)).collect()
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

/// One parameter's update of [`FusedOptimizerBackend::adamw_update_many`] in plain Burn.
pub fn adamw_update_value<B: Backend>(t: AdamWTensors<B>, grad_scale: Tensor<B, 1>, s: AdamWStep) -> AdamWUpdated<B> {
    let AdamWTensors { param, grad, exp_avg, exp_avg_sq } = t;
    if param.dims()[0] == 0 {
        // Nothing to update; on CUDA a launch over no elements fails.
        return AdamWUpdated { param, exp_avg, exp_avg_sq };
    }
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
    fn adamw_update_many(tensors: Vec<AdamWTensors<Self>>, grad_scale: Tensor<Self, 1>, step: AdamWStep) -> Vec<AdamWUpdated<Self>> {
        let inner = tensors
            .into_iter()
            .map(|t| AdamWTensors { param: t.param.inner(), grad: t.grad.inner(), exp_avg: t.exp_avg.inner(), exp_avg_sq: t.exp_avg_sq.inner() })
            .collect();
        let updated = B::adamw_update_many(inner, grad_scale.inner(), step);
        updated
            .into_iter()
            .map(|u| AdamWUpdated {
                param: Tensor::from_inner(u.param),
                exp_avg: Tensor::from_inner(u.exp_avg),
                exp_avg_sq: Tensor::from_inner(u.exp_avg_sq),
            })
            .collect()
    }

    fn sum_of_squares(grads: &[Tensor<Self, 1>]) -> Tensor<Self, 1> {
        let inner: Vec<_> = grads.iter().map(|g| g.clone().inner()).collect();
        Tensor::from_inner(B::sum_of_squares(&inner))
    }
}
