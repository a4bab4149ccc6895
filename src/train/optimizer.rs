//! AdamW over the trainable parameters of a module, as `torch.optim.AdamW` computes it (and so
//! peft + transformers and Megatron's fused Adam): decoupled weight decay applied first, bias
//! corrections per parameter, `eps` added after the square root.
//!
//! Gradients and moments live on the inner (non-autodiff) backend in f32, flattened, keyed by
//! the parameter's module path (`layers.3.self_attn.q_proj.lora.lora_a`): the keys a checkpoint
//! stores, stable across processes where Burn's `ParamId`s are not. A parameter that received
//! no gradient in a step (an expert no token was routed to) is skipped, state and all, as torch
//! skips a parameter whose `.grad` is `None`.
//!
//! A parameter stored below f32 (bf16 or f16 full fine-tuning on GPU) is updated in an f32 master
//! copy the optimizer owns beside its moments, and the model gets that copy's cast after each
//! step, as Megatron's and transformers' mixed precision keep them: an update below the stored
//! dtype's spacing (common at lr 1e-5) then still accumulates instead of rounding away.

use crate::backend::TrainBackend;
use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};
use kernels_cubecl::{AdamWStep, AdamWTensors};

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

    /// The gradients `pick` picks, taken out of these (the scale stays with these).
    pub fn split_off(self, pick: impl Fn(&str) -> bool) -> (Grads<B>, Grads<B>) {
        let (picked, rest): (BTreeMap<_, _>, BTreeMap<_, _>) = self.by_path.into_iter().partition(|(p, _)| pick(p));
        (Grads { by_path: picked, scale: None }, Grads { by_path: rest, scale: self.scale })
    }

    /// These gradients and `other`'s (other paths), with these ones' scale.
    pub fn merged(mut self, other: Grads<B>) -> Grads<B> {
        self.by_path.extend(other.by_path);
        self
    }

    /// The sums of squares (one-element f32 tensors on `device`) of the gradients in each of
    /// `N` classes (`class` gives a path's, below `N`), each zero when its class has none.
    pub fn sums_of_squares_by<const N: usize>(&self, device: &B::Device, class: impl Fn(&str) -> usize) -> [Tensor<B, 1>; N] {
        let mut classes: [Vec<Tensor<B, 1>>; N] = std::array::from_fn(|_| Vec::new());
        for (path, g) in &self.by_path {
            classes[class(path)].push(g.clone());
        }
        classes.map(|grads| match grads.is_empty() {
            true => Tensor::zeros([1], (device, DType::F32)),
            false => B::sum_of_squares(&grads),
        })
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

/// First and second moments of one parameter and its own step count, and the f32 master copy
/// of a parameter stored in a narrower dtype (`None` for an f32 parameter: it is its own master).
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
    pub step: u64,
    pub master: Option<Tensor<B, 1>>,
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

/// Parameters per list handed to the backend's multi-tensor update at most (it may split a list
/// further), and the bytes of parameters per list.
const LIST_TENSORS: usize = 64;
const LIST_BYTES: usize = 256 << 20;
/// Updated parameters are put into the module whenever this many bytes of them wait: the old
/// values are freed as they go, so a full fine-tuning step holds at most this much twice.
const FLUSH_BYTES: usize = 1 << 30;

/// One parameter to update: its module path, its value flattened and its rank.
pub(crate) struct Trained<B: Backend> {
    pub path: String,
    pub value: Tensor<B, 1>,
    pub rank: usize,
}

/// The trained parameters of `module` that have a gradient in `grads`, in the module's order.
fn trained<AB: AutodiffBackend, M: Module<AB>>(module: &M, grads: &Grads<AB::InnerBackend>) -> Vec<Trained<AB::InnerBackend>> {
    parameters::<AB, M>(module, |path| grads.by_path.contains_key(path))
}

/// The parameters of `module` whose paths `pick` picks, in the module's order.
pub(crate) fn parameters<AB: AutodiffBackend, M: Module<AB>>(module: &M, pick: impl Fn(&str) -> bool) -> Vec<Trained<AB::InnerBackend>> {
    struct Finder<B: AutodiffBackend, F: Fn(&str) -> bool> {
        path: Vec<String>,
        pick: F,
        found: Vec<Trained<B::InnerBackend>>,
    }
    impl<B: AutodiffBackend, F: Fn(&str) -> bool> ModuleVisitor<B> for Finder<B, F> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let path = self.path.join(".");
            if (self.pick)(&path) {
                let value = param.val().inner();
                let n = value.shape().num_elements();
                self.found.push(Trained { path, value: value.reshape([n]), rank: D });
            }
        }
    }
    let mut finder = Finder::<AB, _> { path: Vec::new(), pick, found: Vec::new() };
    module.visit(&mut finder);
    finder.found
}

/// `module` with the parameters at the paths of `updated` replaced by those values (reshaped to
/// the parameters' shapes and cast to their dtypes, `updated` emptied).
pub(crate) fn put_back<AB: AutodiffBackend, M: Module<AB>>(module: M, updated: &mut BTreeMap<String, Tensor<AB::InnerBackend, 1>>) -> M {
    struct Replace<'a, B: Backend> {
        path: Vec<String>,
        updated: &'a mut BTreeMap<String, Tensor<B, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleMapper<AB> for Replace<'_, AB::InnerBackend> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
            let Some(value) = self.updated.remove(&self.path.join(".")) else {
                return param;
            };
            let (id, tensor, mapper) = param.consume();
            let value = value.reshape(tensor.shape());
            let value = match tensor.dtype() {
                dtype if dtype != value.dtype() => value.cast(dtype),
                _ => value,
            };
            Param::from_mapped_value(id, Tensor::from_inner(value).require_grad(), mapper)
        }
    }
    if updated.is_empty() {
        return module;
    }
    module.map(&mut Replace::<AB::InnerBackend> { path: Vec::new(), updated })
}

impl<B: TrainBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, state: BTreeMap::new() }
    }

    /// The scalars of the next update of a parameter of `rank` at its step `step`. Weight decay
    /// applies to matrices only, never to biases or norm scales (Megatron's default, and
    /// transformers' Trainer's).
    fn scalars(&self, rank: usize, step: u64, lr: f64) -> AdamWStep {
        let c = self.config;
        AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: if rank >= 2 { c.weight_decay } else { 0.0 },
            bias_correction1: 1.0 - c.beta1.powi(step as i32),
            bias_correction2: 1.0 - c.beta2.powi(step as i32),
        }
    }

    /// One update of every parameter of `module` that has a gradient in `grads`, at learning
    /// rate `lr`: the parameters in lists of the same scalars, each list one multi-tensor update
    /// of the backend ([`FusedOptimizerBackend::adamw_update_many`]).
    pub fn step<AB, M>(&mut self, module: M, mut grads: Grads<B>, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: Module<AB>,
    {
        let found = trained::<AB, M>(&module, &grads);
        let Some(first) = found.first() else {
            return module;
        };
        let scale = grads.scale.take().unwrap_or_else(|| Tensor::ones([1], (&first.value.device(), DType::F32)));
        let mut module = module;
        let (mut updated, mut waiting) = (BTreeMap::new(), 0);
        // Lists being filled, one per set of scalars, each with its bytes.
        // (The parameters of a list share their step count: it is in the scalars.)
        // Each entry: a parameter's path and stored dtype, and what its update takes.
        let mut lists: Vec<(AdamWStep, u64, Vec<((String, DType), AdamWTensors<B>)>, usize)> = Vec::new();
        let count = found.len();
        for (i, t) in found.into_iter().enumerate() {
            let grad = grads.by_path.remove(&t.path).expect("found by its gradient");
            let m = self.state.remove(&t.path).unwrap_or_else(|| Moments { exp_avg: grad.zeros_like(), exp_avg_sq: grad.zeros_like(), step: 0, master: None });
            let step = m.step + 1;
            let scalars = self.scalars(t.rank, step, lr);
            let dtype = t.value.dtype();
            let bytes = t.value.shape().num_elements() * dtype.size();
            // A narrower parameter's update runs on its master copy (made from it at the first
            // step, or restored from a checkpoint).
            let param = match dtype {
                DType::F32 => t.value,
                _ => m.master.unwrap_or_else(|| t.value.cast(FloatDType::F32)),
            };
            let tensors = AdamWTensors { param, grad, exp_avg: m.exp_avg, exp_avg_sq: m.exp_avg_sq };
            match lists.iter_mut().find(|(s, n, _, _)| *s == scalars && *n == step) {
                Some((_, _, list, list_bytes)) => {
                    list.push(((t.path, dtype), tensors));
                    *list_bytes += bytes;
                }
                None => lists.push((scalars, step, vec![((t.path, dtype), tensors)], bytes)),
            }
            let last = i + 1 == count;
            // Run the lists that are full (all of them after the last parameter).
            let mut k = 0;
            while k < lists.len() {
                if last || lists[k].2.len() >= LIST_TENSORS || lists[k].3 >= LIST_BYTES {
                    let (scalars, step, list, bytes) = lists.swap_remove(k);
                    let (paths, tensors): (Vec<(String, DType)>, Vec<AdamWTensors<B>>) = list.into_iter().unzip();
                    for ((path, dtype), u) in paths.into_iter().zip(B::adamw_update_many(tensors, scale.clone(), scalars)) {
                        let (param, master) = match dtype {
                            DType::F32 => (u.param, None),
                            _ => (u.param.clone().cast(dtype), Some(u.param)),
                        };
                        self.state.insert(path.clone(), Moments { exp_avg: u.exp_avg, exp_avg_sq: u.exp_avg_sq, step, master });
                        updated.insert(path, param);
                    }
                    waiting += bytes;
                } else {
                    k += 1;
                }
            }
            if waiting >= FLUSH_BYTES || last {
                module = put_back::<AB, M>(module, &mut updated);
                waiting = 0;
            }
        }
        module
    }
}
