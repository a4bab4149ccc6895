//! Layer-level activation recompute (Megatron's `--recompute_granularity full`): a group of
//! decoder layers keeps only its input during the forward pass and runs its forward again when
//! the backward pass reaches it.
//!
//! Burn has no module-level checkpoint, and a nested backward inside an autodiff step
//! deadlocks on burn-autodiff's graph mutex, so the pass is cut into segments instead (as
//! PyTorch's `checkpoint_sequential` without reentrancy): the embedding, runs of kept layers,
//! recomputed groups, and the head, each starting from a fresh leaf. The forward runs
//! recomputed groups on the inner backend (no autodiff: Burn's autodiff registers even untracked
//! ops in its graph, which kept every layer's activations alive until backward — 2.7 GiB per
//! Qwen2.5-7B layer at 4 x 2048 tokens) and keeps their input; the backward walks
//! the segments in reverse, replaying each recomputed group from its input with its
//! parameters as fresh leaves (same `ParamId`s), and hands each segment the gradient of its
//! output. Dropout draws the same masks both times: every layer reseeds the backend's
//! generator with [`layer_seed`].

use std::ops::Range;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use crate::backend::{gib, TrainBackend};
use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::model::{DecoderLayer, SequenceContext};
use crate::recipe::{RecomputeGranularity, RecomputeMethod, RecomputeSection};

/// The layer groups recomputed in backward, from the recipe. `uniform`: consecutive groups of
/// `num_layers` covering every layer; `block`: each of the first `num_layers` layers alone.
pub fn groups(section: &RecomputeSection, num_layers: usize) -> Result<Vec<Range<usize>>> {
    let n = section.num_layers.max(1);
    if section.granularity == RecomputeGranularity::Full && n > num_layers {
        return Err(Error::Unsupported(format!(
            "train.recompute.num_layers = {n} but the model has {num_layers} layers; expected 1 to {num_layers}"
        )));
    }
    match (section.granularity, section.method) {
        (RecomputeGranularity::None, _) => Ok(vec![]),
        (RecomputeGranularity::Full, RecomputeMethod::Uniform) => {
            Ok((0..num_layers).step_by(n).map(|s| s..(s + n).min(num_layers)).collect())
        }
        (RecomputeGranularity::Full, RecomputeMethod::Block) => Ok((0..n.min(num_layers)).map(|i| i..i + 1).collect()),
        (RecomputeGranularity::Selective, _) => Err(Error::Unsupported(
            "train.recompute.granularity = \"selective\" (the attention core only) is not supported yet; use \"full\" \
             (whole layers) or \"none\""
                .into(),
        )),
    }
}

/// Every float parameter of `module` cut from its graph (keeping its id), the trainable ones as
/// fresh leaves that ask for a gradient.
pub fn fresh_leaves<B: TrainBackend, M: Module<B>>(module: M) -> M {
    struct Fresh;
    impl<AB: Backend> ModuleMapper<AB> for Fresh {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
            let (id, t, mapper) = param.consume();
            let grad = t.is_require_grad();
            let t = t.detach();
            Param::from_mapped_value(id, if grad { t.require_grad() } else { t }, mapper)
        }
    }
    module.map(&mut Fresh)
}

/// The seed of layer `layer`'s dropout in the pass seeded `seed`: per layer, so grouping
/// layers for recompute draws exactly the masks a pass without recompute draws.
pub fn layer_seed(seed: u64, layer: usize) -> u64 {
    (seed ^ ((layer as u64 + 1) << 40)).wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Layers `first..` in order, each reseeding the backend's generator with its
/// [`layer_seed`].
pub fn run_layers<B: TrainBackend>(layers: &[DecoderLayer<B>], first: usize, mut x: Tensor<B, 3>, ctx: &SequenceContext<B>, seed: u64) -> Tensor<B, 3> {
    let device = x.device();
    for (i, l) in layers.iter().enumerate() {
        B::seed(&device, layer_seed(seed, first + i));
        x = l.forward(x, ctx);
        trace_memory::<B>(&device, first + i);
    }
    x
}

/// With `TRAINER_TRACE_MEMORY=1`, the device allocator after each layer's forward (synchronised,
/// so slow): where a step's memory goes.
fn trace_memory<B: TrainBackend>(device: &B::Device, layer: usize) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var("TRAINER_TRACE_MEMORY").is_ok_and(|v| v == "1")) {
        return;
    }
    let _ = B::sync(device);
    match crate::backend::device_memory::<B>(device) {
        Some(m) => eprintln!("memory after layer {layer}: {:.2} GiB in use, {:.2} GiB reserved", gib(m.in_use), gib(m.reserved)),
        // CPU: the process's resident memory (Linux).
        None => {
            let pages = std::fs::read_to_string("/proc/self/statm").ok().and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
            if let Some(p) = pages {
                eprintln!("memory after layer {layer}: {:.2} GiB resident", gib(p * 4096));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_megatron_methods() {
        let s = |granularity, method, num_layers| RecomputeSection { granularity, method, num_layers };
        use RecomputeGranularity::*;
        use RecomputeMethod::*;
        assert!(groups(&s(None, Uniform, 1), 4).unwrap().is_empty());
        assert_eq!(groups(&s(Full, Uniform, 1), 3).unwrap(), vec![0..1, 1..2, 2..3]);
        assert_eq!(groups(&s(Full, Uniform, 2), 5).unwrap(), vec![0..2, 2..4, 4..5]);
        assert_eq!(groups(&s(Full, Block, 2), 5).unwrap(), vec![0..1, 1..2]);
        assert_eq!(groups(&s(Full, Block, 2), 2).unwrap(), vec![0..1, 1..2]);
        assert!(groups(&s(Full, Block, 9), 2).unwrap_err().to_string().contains("has 2 layers"));
        assert!(groups(&s(Selective, Uniform, 1), 2).unwrap_err().to_string().contains("selective"));
    }
}
