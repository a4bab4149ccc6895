//! AdamW over the trainable parameters of a module, as `torch.optim.AdamW` computes it (and so
//! peft + transformers and Megatron's fused Adam): decoupled weight decay applied first, bias
//! corrections per parameter, `eps` added after the square root.
//!
//! Gradients and moments live on the inner (non-autodiff) backend in f32, flattened, keyed by
//! the parameter's module path (`layers.3.self_attn.q_proj.lora.lora_a`): the keys a checkpoint
//! stores, stable across processes where Burn's `ParamId`s are not. A parameter that received
//! no gradient in a step (an expert no token was routed to) is skipped, state and all, as torch
//! skips a parameter whose `.grad` is `None`.

use crate::backend::TrainBackend;
use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};
use kernels_cubecl::{AdamWStep, FusedOptimizerBackend};

use crate::recipe::OptimizerSection;

/// Summed gradients of one optimizer step, by module path, flattened, f32.
pub struct Grads<B: Backend> {
    pub by_path: BTreeMap<String, Tensor<B, 1>>,
    /// What every gradient is multiplied by before the update (the clipping coefficient, a
    /// one-element f32 tensor on the device); `None` is 1.
    pub scale: Option<Tensor<B, 1>>,
}

impl<B: Backend> Default for Grads<B> {
    fn default() -> Self {
        Grads { by_path: BTreeMap::new(), scale: None }
    }
}

impl<B: Backend> Grads<B> {
    /// Add `g` (any shape, any float dtype) to the gradient of `path`.
    pub fn add<const D: usize>(&mut self, path: String, g: Tensor<B, D>) {
        let n = g.shape().num_elements();
        let g = g.cast(FloatDType::F32).reshape([n]);
        let sum = match self.by_path.remove(&path) {
            Some(prev) => prev + g,
            None => g,
        };
        self.by_path.insert(path, sum);
    }
}

impl<B: TrainBackend> Grads<B> {
    /// The global L2 norm over every gradient as a one-element f32 tensor, left on the device;
    /// `None` without gradients.
    pub fn global_norm(&self) -> Option<Tensor<B, 1>> {
        let grads: Vec<Tensor<B, 1>> = self.by_path.values().cloned().collect();
        (!grads.is_empty()).then(|| B::sum_of_squares(&grads).sqrt())
    }

    /// Clip by the global norm as `torch.nn.utils.clip_grad_norm_` does, on the device: every
    /// gradient times `min(1, max_norm / (norm + 1e-6))`, where `norm` is [`Grads::global_norm`].
    /// The product is taken inside the update ([`Grads::scale`]), not as a pass of its own.
    pub fn clip_by_norm(&mut self, norm: &Tensor<B, 1>, max_norm: f64) {
        let coef = (norm.clone().add_scalar(1e-6).recip() * max_norm).clamp_max(1.0);
        self.scale = Some(match self.scale.take() {
            Some(scale) => scale * coef,
            None => coef,
        });
    }
}


/// Add the gradients in `grads` (from one `backward`) of the parameters of `module` to
/// `into`, by module path; `prefix` is the module's own path in the model (`["layers", "3"]`
/// for a layer visited on its own).
pub fn collect_grads<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    grads: &B::Gradients,
    prefix: &[&str],
    into: &mut Grads<B::InnerBackend>,
) {
    struct Collector<'a, B: AutodiffBackend> {
        path: Vec<String>,
        grads: &'a B::Gradients,
        into: &'a mut Grads<B::InnerBackend>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collector<'_, B> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.into.add(self.path.join("."), g);
            }
        }
    }
    let path = prefix.iter().map(|s| s.to_string()).collect();
    module.visit(&mut Collector::<B> { path, grads, into });
}

/// First and second moments of one parameter and its own step count.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
    pub step: u64,
}

/// AdamW hyper-parameters (the learning rate comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl From<&OptimizerSection> for AdamWConfig {
    fn from(o: &OptimizerSection) -> Self {
        AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay }
    }
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// Moments by module path.
    pub state: BTreeMap<String, Moments<B>>,
}

impl<B: TrainBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, state: BTreeMap::new() }
    }

    /// One update of every parameter of `module` that has a gradient in `grads`, at learning
    /// rate `lr`. Weight decay applies to matrices only, never to biases or norm scales
    /// (Megatron's default, and transformers' Trainer's).
    pub fn step<AB, M>(&mut self, module: M, grads: Grads<B>, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        struct Update<'a, B: Backend> {
            path: Vec<String>,
            grads: Grads<B>,
            /// [`Grads::scale`], or 1.
            scale: Option<Tensor<B, 1>>,
            opt: &'a mut AdamW<B>,
            lr: f64,
        }
        impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB::InnerBackend>
        where
            AB::InnerBackend: TrainBackend,
        {
            fn enter_module(&mut self, name: &str, _container: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container: &str) {
                self.path.pop();
            }
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
                let path = self.path.join(".");
                let Some(g) = self.grads.by_path.remove(&path) else {
                    return param;
                };
                let (id, tensor, mapper) = param.consume();
                let inner = tensor.inner();
                let (dims, n) = (inner.dims(), g.dims()[0]);
                let c = self.opt.config;
                let m = self.opt.state.remove(&path).unwrap_or_else(|| Moments {
                    exp_avg: g.zeros_like(),
                    exp_avg_sq: g.zeros_like(),
                    step: 0,
                });
                let step = m.step + 1;
                let hyper = AdamWStep {
                    lr: self.lr,
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    weight_decay: if D >= 2 { c.weight_decay } else { 0.0 },
                    bias_correction1: 1.0 - c.beta1.powi(step as i32),
                    bias_correction2: 1.0 - c.beta2.powi(step as i32),
                };
                let scale = self.scale.clone().expect("made beside the gradients");
                let u = AB::InnerBackend::adamw_update(inner.reshape([n]), g, scale, m.exp_avg, m.exp_avg_sq, hyper);
                self.opt.state.insert(path, Moments { exp_avg: u.exp_avg, exp_avg_sq: u.exp_avg_sq, step });
                let updated = u.param.reshape(dims);
                Param::from_mapped_value(id, Tensor::from_inner(updated).require_grad(), mapper)
            }
        }
        let ones = |g: &Tensor<B, 1>| Tensor::ones([1], (&g.device(), DType::F32));
        let scale = grads.scale.clone().or_else(|| grads.by_path.values().next().map(ones));
        let mut update = Update { path: Vec::new(), grads, scale, opt: self, lr };
        module.map(&mut update)
    }
}
