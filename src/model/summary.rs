//! What `trainer check` reports about a model before building it: parameter counts, per-rank
//! shard sizes and an estimate of GPU memory per rank.

use std::fmt;

use serde::Serialize;

use super::hf_names;
use super::spec::{ArchSpec, MlpSpec};
use crate::lora::LoraTargets;
use crate::error::Result;
use crate::recipe::{RecomputeGranularity, RecomputeSection};

/// One linear layer of the architecture.
#[derive(Debug, Clone, Serialize)]
pub struct LinearInfo {
    pub path: String,
    pub inp: usize,
    pub out: usize,
    /// How the layer is split: 1 (replicated), or the tensor-/expert-parallel size dividing it.
    pub split: Split,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Split {
    Replicated,
    /// Output dimension split across the tensor-parallel group.
    Column,
    /// Input dimension split across the tensor-parallel group.
    Row,
    /// Whole layer on the one expert-parallel rank that owns the expert.
    Expert,
    /// The LM head: its vocabulary columns split across the tensor-parallel group when the group
    /// divides the vocabulary (as the embedding's rows), else replicated.
    Vocab,
}

/// Every linear layer, in checkpoint order, with how it is split.
pub fn linears(spec: &ArchSpec) -> Vec<LinearInfo> {
    let (h, d) = (spec.hidden_size, spec.head_dim);
    let mut v = Vec::new();
    let mut push = |path: String, inp, out, split| v.push(LinearInfo { path, inp, out, split });
    for (i, l) in spec.layers.iter().enumerate() {
        let a = hf_names::self_attn(i);
        let (q, kv) = (spec.num_heads * d, spec.num_kv_heads * d);
        let dims = [(h, q, Split::Column), (h, kv, Split::Column), (h, kv, Split::Column), (q, h, Split::Row)];
        for (name, (inp, out, split)) in hf_names::ATTENTION_PROJECTIONS.into_iter().zip(dims) {
            push(hf_names::child(&a, name), inp, out, split);
        }
        let m = hf_names::mlp(i);
        // A SwiGLU MLP's projections at `module`: gate and up split as `split[0]`, down as `split[1]`.
        let swiglu = |module: &str, n: usize, split: [Split; 2]| {
            let dims = [(h, n, split[0]), (h, n, split[0]), (n, h, split[1])];
            hf_names::MLP_PROJECTIONS.into_iter().zip(dims).map(|(name, (inp, out, s))| (hf_names::child(module, name), inp, out, s)).collect::<Vec<_>>()
        };
        match l.mlp {
            MlpSpec::Dense { intermediate_size: n } => {
                for (path, inp, out, split) in swiglu(&m, n, [Split::Column, Split::Row]) {
                    push(path, inp, out, split);
                }
            }
            MlpSpec::Moe { num_experts, intermediate_size: n, shared_expert_intermediate_size, .. } => {
                push(hf_names::router(&m), h, num_experts, Split::Replicated);
                for e in 0..num_experts {
                    for (path, inp, out, split) in swiglu(&hf_names::expert(&m, e), n, [Split::Expert; 2]) {
                        push(path, inp, out, split);
                    }
                }
                // Whole on every rank, as the router (SparseMoe::load).
                if let Some(n) = shared_expert_intermediate_size {
                    for (path, inp, out, split) in swiglu(&hf_names::shared_expert(&m), n, [Split::Replicated; 2]) {
                        push(path, inp, out, split);
                    }
                    push(hf_names::shared_expert_gate(&m), h, 1, Split::Replicated);
                }
            }
        }
    }
    if !spec.tie_word_embeddings {
        push(hf_names::LM_HEAD.into(), h, spec.vocab_size, Split::Vocab);
    }
    v
}

/// What the recipe asks of the model, for the estimates.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub data: usize,
    pub tensor: usize,
    pub expert: usize,
    pub context: usize,
    pub sequence_parallel: bool,
    pub micro_batch: usize,
    pub seq_len: usize,
    /// `None` for full fine-tuning.
    pub lora: Option<(usize, LoraTargets)>,
    /// Bytes per element of the frozen base weights.
    pub weight_bytes: usize,
    /// What `train.recompute` recomputes (granularity `none`: nothing).
    pub recompute: RecomputeSection,
    pub fused_cross_entropy: bool,
    /// The optimizer's state dealt over the data-parallel ranks (`parallel.distributed_optimizer`).
    pub distributed_optimizer: bool,
}

impl RunShape {
    /// What `r` asks of its model, with the base weights' bytes of the backend it resolves to
    /// here (the CPU backend holds f32).
    pub fn of(r: &crate::recipe::Recipe) -> Result<RunShape> {
        use crate::recipe::{Device, Tuning};
        let lora = match r.train.tuning {
            Tuning::Lora => Some((r.lora.rank, LoraTargets::parse(&r.lora.targets)?)),
            Tuning::Full => None,
        };
        let on_gpu = r.device == Device::Cuda || crate::backend::resolve(r.device) == Device::Cuda;
        Ok(RunShape {
            data: r.parallel.data,
            tensor: r.parallel.tensor,
            expert: r.parallel.expert,
            context: r.parallel.context,
            sequence_parallel: r.parallel.sequence_parallel,
            micro_batch: r.train.micro_batch_size,
            seq_len: r.train.max_length,
            lora,
            weight_bytes: if on_gpu { r.model.dtype.bytes() } else { 4 },
            recompute: r.train.recompute.clone(),
            fused_cross_entropy: r.train.fused_cross_entropy,
            distributed_optimizer: r.parallel.distributed_optimizer,
        })
    }
}

/// Refuse a job whose estimate per rank exceeds what the device it runs on holds, before
/// anything is allocated; `Ok(Some(note))` when this machine cannot tell (CUDA asked for
/// without a GPU here), or when `refuse` is false (a check of a job that may run elsewhere):
/// then the verdict is a note.
pub fn check_fits(summary: &ModelSummary, device: crate::recipe::Device, refuse: bool) -> Result<Option<String>> {
    let Some((capacity, what)) = crate::backend::memory_capacity(device) else {
        return Ok(Some(format!(
            "memory: {:.1} GiB per rank estimated; not checked against a GPU (none on this machine)",
            summary.memory.total
        )));
    };
    let cap = capacity as f64 / GIB;
    if summary.memory.total > cap {
        let m = &summary.memory;
        if !refuse {
            return Ok(Some(format!(
                "memory: {:.1} GiB per rank estimated, more than this machine's {what} ({cap:.1} GiB): it would not run here",
                m.total
            )));
        }
        let recompute = recompute_hint(m);
        return Err(crate::error::Error::model(format!(
            "the job needs about {:.1} GiB per rank ({:.1} weights, {:.1} trainable and optimizer, {:.1} activations and \
             logits) but this machine's {what} is {cap:.1} GiB; shrink the model, train.micro_batch_size or \
             train.max_length{recompute}, or run on a larger device",
            m.total,
            m.weights,
            m.trainable_and_optimizer,
            m.total - m.weights - m.trainable_and_optimizer
        )));
    }
    Ok(None)
}

/// `, recompute every layer (...)` where that would hold fewer activations than the recipe's
/// recompute setting, else nothing (recompute is on as far as it goes).
fn recompute_hint(m: &MemoryEstimate) -> String {
    let activations = m.total - m.weights - m.trainable_and_optimizer - m.logits;
    if activations <= m.activations_least * 1.01 {
        return String::new();
    }
    format!(
        ", recompute every layer (train.recompute.granularity = \"full\", method = \"uniform\", num_layers = 1: {:.1} GiB \
         of activations instead of {activations:.1})",
        m.activations_least
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub family: String,
    pub layers: usize,
    pub moe_layers: usize,
    pub total_params: u64,
    /// Parameters active per token (MoE: only top-k experts).
    pub active_params: u64,
    pub trainable_params: u64,
    pub adapted_linears: usize,
    pub per_rank_params: u64,
    pub per_rank_trainable: u64,
    pub memory: MemoryEstimate,
}

/// GiB per rank.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    pub weights: f64,
    /// Trainable weights, their gradients and AdamW's state: LoRA's f32 factors, f32 gradients
    /// and moments; full tuning's f32 gradients, moments and master copies of weights stored
    /// narrower (the weights themselves are in `weights`). The moments and master copies on
    /// 1/data of the ranks each under the distributed optimizer.
    pub trainable_and_optimizer: f64,
    /// `trainable_and_optimizer` with the other `parallel.distributed_optimizer` setting, where
    /// there is more than one data-parallel rank.
    pub trainable_and_optimizer_otherwise: Option<f64>,
    pub distributed_optimizer: bool,
    pub activations_no_recompute: f64,
    /// Under the recipe's recompute where it recomputes layers, else recomputing every layer
    /// one at a time (`granularity = "full"`).
    pub activations_recompute: f64,
    /// Recomputing every layer one at a time: the least any recompute setting holds.
    pub activations_least: f64,
    /// Logits and their gradient in f32, unless the fused cross-entropy keeps them chunked.
    pub logits: f64,
    /// Weights + optimizer + logits + activations under the recipe's recompute setting.
    pub total: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

impl ModelSummary {
    pub fn new(spec: &ArchSpec, run: &RunShape) -> Result<Self> {
        let (h, v) = (spec.hidden_size as u64, spec.vocab_size as u64);
        let lin = linears(spec);
        let norms_per_layer = 2 * h + if spec.qk_norm { 2 * spec.head_dim as u64 } else { 0 };
        let bias_per_layer = if spec.qkv_bias { ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim) as u64 } else { 0 };
        let small = spec.layers.len() as u64 * (norms_per_layer + bias_per_layer) + h;
        let embed = v * h;
        let (tp, ep) = (run.tensor as u64, run.expert as u64);
        // The embedding's rows and the head's columns split by vocabulary when tp divides it.
        let vocab_split = if v.is_multiple_of(tp) { tp } else { 1 };
        let mut total = embed + small;
        let mut per_rank = embed / vocab_split + small;
        let mut trainable = 0u64;
        let mut trainable_rank = 0u64;
        let mut adapted = 0usize;
        for l in &lin {
            let n = (l.inp * l.out) as u64;
            let div = match l.split {
                Split::Replicated => 1,
                Split::Column | Split::Row => tp,
                Split::Expert => ep,
                Split::Vocab => vocab_split,
            };
            total += n;
            per_rank += n / div;
            if let Some((rank, targets)) = &run.lora {
                if targets.matches(&l.path) {
                    let (r, i, o) = (*rank as u64, l.inp as u64, l.out as u64);
                    trainable += r * (i + o);
                    // A is [r, in], B is [out, r]: a column split cuts B, a row split cuts A,
                    // an expert's adapter lives with its expert.
                    trainable_rank += match l.split {
                        Split::Replicated => r * (i + o),
                        Split::Column => r * i + r * o / tp,
                        Split::Row => r * i / tp + r * o,
                        Split::Expert => r * (i + o) / ep,
                        Split::Vocab => r * i + r * o / vocab_split,
                    };
                    adapted += 1;
                }
            }
        }
        if run.lora.is_none() {
            trainable = total;
            trainable_rank = per_rank;
        }
        let mut active = total;
        for l in &spec.layers {
            if let MlpSpec::Moe { num_experts, top_k, intermediate_size, .. } = l.mlp {
                active -= ((num_experts - top_k) * 3 * intermediate_size) as u64 * h;
            }
        }
        let memory = estimate_memory(spec, run, per_rank, trainable_rank);
        Ok(ModelSummary {
            family: spec.family.clone(),
            layers: spec.layers.len(),
            moe_layers: spec.num_moe_layers(),
            total_params: total,
            active_params: active,
            trainable_params: trainable,
            adapted_linears: adapted,
            per_rank_params: per_rank,
            per_rank_trainable: trainable_rank,
            memory,
        })
    }
}

/// Activation bytes per token per layer in bf16 for a pre-norm block with flash-style
/// attention (no seq x seq scores kept): the tensors autograd saves (norm outputs, q/k/v,
/// attention output, the MLP's gate, up and product), following Korthikanti et al. 2022 with
/// the attention-score term removed. MoE layers keep them for top-k experts plus the router,
/// and for the shared expert (plus its gate's output) where there is one.
fn activation_bytes_per_token_layer(spec: &ArchSpec, layer: &MlpSpec) -> f64 {
    let h = spec.hidden_size as f64;
    let q = (spec.num_heads * spec.head_dim) as f64;
    let kv = (spec.num_kv_heads * spec.head_dim) as f64;
    let attn = 2.0 * h /* norm in/out */ + q + 2.0 * kv /* q, k, v */ + 2.0 * q /* rotated q, attn out */ + kv /* rotated k */ + h;
    let mlp = match *layer {
        MlpSpec::Dense { intermediate_size } => 2.0 * h + 3.0 * intermediate_size as f64,
        MlpSpec::Moe { num_experts, top_k, intermediate_size, shared_expert_intermediate_size, .. } => {
            let shared = shared_expert_intermediate_size.map_or(0.0, |n| h + 3.0 * n as f64 + 1.0);
            2.0 * h + num_experts as f64 * 2.0 + top_k as f64 * (h + 3.0 * intermediate_size as f64) + shared
        }
    };
    2.0 * (attn + mlp)
}

fn estimate_memory(spec: &ArchSpec, run: &RunShape, per_rank: u64, trainable_rank: u64) -> MemoryEstimate {
    let weights = per_rank as f64 * run.weight_bytes as f64;
    // Bytes a trainable weight keeps on every rank (LoRA's factor and gradient; full tuning's
    // gradient) and its optimizer state (two moments, a master copy under a narrower weight).
    let kept = if run.lora.is_some() { 8.0 } else { 4.0 };
    let state = 8.0 + if run.lora.is_none() && run.weight_bytes < 4 { 4.0 } else { 0.0 };
    let optimizer = |distributed: bool| trainable_rank as f64 * (kept + state / if distributed { run.data.max(1) as f64 } else { 1.0 });
    let trainable_and_optimizer = optimizer(run.distributed_optimizer);
    // Tokens a rank holds activations for: context parallelism splits the sequence; sequence
    // parallelism splits the rest of the block across the tensor group.
    let tokens = (run.micro_batch * run.seq_len) as f64 / run.context as f64;
    let split = if run.sequence_parallel { run.tensor as f64 } else { 1.0 };
    let per_layer: Vec<f64> = spec.layers.iter().map(|l| activation_bytes_per_token_layer(spec, &l.mlp) * tokens / split).collect();
    let all: f64 = per_layer.iter().sum();
    let boundary = 2.0 * spec.hidden_size as f64 * tokens / split;
    // A recomputed group of layers keeps only its input; the layers outside the groups keep
    // their activations. The backward walks the layers in reverse, freeing a kept layer's
    // activations once past it and holding one group's replayed activations at a time: the
    // peak is the most alive at any point of that walk.
    let under = |section: &RecomputeSection| -> f64 {
        // A setting the run refuses (selective; more layers than the model has) is reported
        // by the run's own checks; here it counts as recomputing nothing.
        let groups = crate::train::recompute::groups(section, per_layer.len()).unwrap_or_default();
        let group_ending_at = |i: usize| groups.iter().find(|g| g.end == i + 1);
        let grouped = |i: usize| groups.iter().any(|g| g.contains(&i));
        let kept: f64 = per_layer.iter().enumerate().filter(|&(i, _)| !grouped(i)).map(|(_, b)| b).sum();
        let mut alive = kept + boundary * groups.len() as f64;
        let mut peak = alive;
        for i in (0..per_layer.len()).rev() {
            match group_ending_at(i) {
                Some(g) => {
                    peak = f64::max(peak, alive + per_layer[g.clone()].iter().sum::<f64>());
                    alive -= boundary;
                }
                None if !grouped(i) => alive -= per_layer[i],
                None => {}
            }
        }
        peak
    };
    let activations = under(&run.recompute);
    let least = under(&RecomputeSection { granularity: RecomputeGranularity::Full, ..Default::default() });
    let recomputed = match run.recompute.granularity {
        RecomputeGranularity::None => least,
        _ => activations,
    };
    let logits = if run.fused_cross_entropy { 0.0 } else { 2.0 * 4.0 * tokens * spec.vocab_size as f64 };
    MemoryEstimate {
        weights: weights / GIB,
        trainable_and_optimizer: trainable_and_optimizer / GIB,
        trainable_and_optimizer_otherwise: (run.data > 1).then(|| optimizer(!run.distributed_optimizer) / GIB),
        distributed_optimizer: run.distributed_optimizer,
        activations_no_recompute: all / GIB,
        activations_recompute: recomputed / GIB,
        activations_least: least / GIB,
        logits: logits / GIB,
        total: (weights + trainable_and_optimizer + activations + logits) / GIB,
    }
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.memory;
        writeln!(f, "family            {}", self.family)?;
        writeln!(f, "layers            {} ({} sparse)", self.layers, self.moe_layers)?;
        writeln!(f, "parameters        {} total, {} active per token", count(self.total_params), count(self.active_params))?;
        writeln!(f, "trainable         {} ({:.3}% of total, {} adapted linears)", count(self.trainable_params),
            100.0 * self.trainable_params as f64 / self.total_params.max(1) as f64, self.adapted_linears)?;
        writeln!(f, "per rank          {} parameters, {} trainable", count(self.per_rank_params), count(self.per_rank_trainable))?;
        writeln!(f, "memory per rank (estimate, GiB)")?;
        writeln!(f, "  weights                    {:>8.2}", m.weights)?;
        writeln!(f, "  trainable + optimizer      {:>8.2}", m.trainable_and_optimizer)?;
        if let Some(other) = m.trainable_and_optimizer_otherwise {
            let other_setting = if m.distributed_optimizer { "  no distributed optimizer" } else { "  distributed optimizer" };
            writeln!(f, "  {other_setting:<27}{other:>8.2}")?;
        }
        writeln!(f, "  activations, no recompute  {:>8.2}", m.activations_no_recompute)?;
        writeln!(f, "  activations, recompute     {:>8.2}", m.activations_recompute)?;
        writeln!(f, "  logits (unfused CE)        {:>8.2}", m.logits)?;
        write!(f, "  total for this recipe      {:>8.2}", m.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(activations: f64, least: f64) -> MemoryEstimate {
        MemoryEstimate {
            weights: 60.0,
            trainable_and_optimizer: 2.0,
            trainable_and_optimizer_otherwise: None,
            distributed_optimizer: false,
            activations_no_recompute: 40.0,
            activations_recompute: activations,
            activations_least: least,
            logits: 1.0,
            total: 60.0 + 2.0 + activations + 1.0,
        }
    }

    #[test]
    fn recompute_is_advised_only_where_it_would_hold_less() {
        // No recompute, or a block of some layers: every layer recomputed holds less.
        let hint = recompute_hint(&estimate(40.0, 2.9));
        assert!(hint.contains("train.recompute.granularity = \"full\"") && hint.contains("2.9 GiB of activations instead of 40.0"), "{hint}");
        assert!(!recompute_hint(&estimate(16.8, 2.9)).is_empty());
        // Already every layer, one at a time: nothing left to turn on.
        assert_eq!(recompute_hint(&estimate(2.9, 2.9)), "");
    }
}
