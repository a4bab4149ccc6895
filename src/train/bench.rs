//! `trainer bench`: optimizer steps of a recipe's model on synthetic tokens, timed after a
//! warm-up, for `benches/` to set beside the PyTorch baseline. Each step is one micro batch of
//! `train.micro_batch_size` x `train.max_length` random token ids, labels = ids (every position
//! trained), with the recipe's tuning, LoRA, recompute and optimizer.

use std::time::Instant;

use burn::backend::Autodiff;
use crate::backend::TrainBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::optimizer::{AdamW, AdamWConfig};
use super::{recompute, LrSchedule, Trainer};
use std::collections::BTreeMap;

use crate::backend::{self, profile, BackendJob};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::lora::{self, LoraConfig, LoraTargets};
use crate::model::spec::{ArchSpec, MlpSpec};
use crate::model::{self, ModelPlan};
use crate::parallel::Layout;
use crate::recipe::{LoadedRecipe, Tuning};

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub family: String,
    pub device: String,
    pub dtype: String,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub tuning: String,
    pub warmup_steps: usize,
    pub steps: usize,
    /// Seconds of each timed step (device synchronised at each end).
    pub step_seconds: Vec<f64>,
    pub s_per_step: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs per trained token ([`flops_per_token`]).
    pub flops_per_token: f64,
    /// Seconds to build the model (random init or load) and attach adapters.
    pub build_seconds: f64,
    pub losses: Vec<f64>,
    /// cuBLAS path against exact (host f64) maths on random bf16 operands (CUDA bf16 runs only):
    /// max |diff| / max |reference| of the forward and both gradients.
    pub gemm_check: Option<serde_json::Value>,
    /// With `--check-attention` (CUDA bf16 runs only): the attention kernels (blockwise, batched
    /// cuBLAS GEMMs) in bf16 against the f32 reference on the CPU, output and gradients.
    pub attention_check: Option<serde_json::Value>,
    /// The device allocator's pool after each step (warm-up included), GiB: the step's
    /// high-water mark (CUDA only).
    pub reserved_gib: Vec<f64>,
    /// Largest of [`BenchReport::reserved_gib`].
    pub peak_reserved_gib: Option<f64>,
    /// Seconds of the build's phases: the model's weights (random init or load, upload), the
    /// adapters.
    pub build_phases: BTreeMap<String, f64>,
    /// With `--profile`: one more step after the timed ones, its spans timed with the device
    /// synchronised around each ([`crate::backend::profile`]); seconds by span path.
    pub profile: Vec<profile::SpanTotal>,
    /// With `--profile`: one more step at [`profile::Level::Coarse`] (the phases and the
    /// attention core, few synchronisations), for totals close to an unprofiled step's.
    pub profile_coarse: Vec<profile::SpanTotal>,
    /// Times per timed step the host waited for the device inside the step
    /// ([`crate::backend::host_syncs`]: value reads, synchronised GEMMs).
    pub syncs_per_step: f64,
    /// Seconds a timed step spent blocked in the layers' device reads (a mixture of experts'
    /// counts; [`backend::host_wait_seconds`]).
    pub host_wait_s_per_step: f64,
    /// How cuBLAS GEMMs were ordered with CubeCL's kernels (CUDA only):
    /// `compute-stream` or `synchronised: <why>`.
    pub gemm_ordering: Option<String>,
    /// Wall-clock seconds since the Unix epoch at the start and end of the timed steps, for
    /// setting GPU utilisation samples against them (`benches/run.sh`).
    pub timed_unix: [f64; 2],
    /// The GPU's busy share over the timed steps and the most device memory used in them (every
    /// process's, as nvidia-smi counts it), from NVML ([`backend::device_monitor`]); absent on
    /// CPU or without NVML.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_busy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_used_peak_gib: Option<f64>,
}

/// Model FLOPs per token of one training step, recompute not counted (MFU, not HFU): every
/// matmul a token goes through (attention projections, the dense MLP or its top-k experts,
/// router and shared expert, the LM head) twice forward and twice more backward for the input
/// gradient, twice more for weight gradients when the base is trained; the causal attention core
/// (`QK^T` and `PV`, half of `seq` keys on average) forward and twice that backward. LoRA
/// factors are counted as trained matmuls.
pub fn flops_per_token(spec: &ArchSpec, seq_len: usize, full: bool, lora_params_per_token: f64) -> f64 {
    let (h, d) = (spec.hidden_size as f64, (spec.num_heads * spec.head_dim) as f64);
    let kv = (spec.num_kv_heads * spec.head_dim) as f64;
    let mut matmul = 0.0;
    for l in &spec.layers {
        matmul += h * d * 2.0 + h * kv * 2.0;
        matmul += match l.mlp {
            MlpSpec::Dense { intermediate_size } => 3.0 * h * intermediate_size as f64,
            MlpSpec::Moe { num_experts, top_k, intermediate_size, .. } => {
                top_k as f64 * 3.0 * h * intermediate_size as f64 + h * num_experts as f64 + l.mlp.shared_expert_params(spec.hidden_size) as f64
            }
        };
    }
    matmul += h * spec.vocab_size as f64;
    let base = if full { 6.0 } else { 4.0 } * matmul;
    let attention = 3.0 * 2.0 * seq_len as f64 * d * spec.layers.len() as f64;
    base + 6.0 * lora_params_per_token + attention
}

/// What `trainer bench` does beside the timed steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BenchExtras {
    /// One more step timed op by op ([`BenchReport::profile`]).
    pub profile: bool,
    /// The attention self-check on CUDA bf16 ([`BenchReport::attention_check`]); its kernels
    /// compile for minutes on a fresh machine, so it is asked for.
    pub check_attention: bool,
}

pub fn bench(loaded: &LoadedRecipe, plan: &ModelPlan, warmup: usize, steps: usize, extras: BenchExtras) -> Result<BenchReport> {
    let r = &loaded.recipe;
    // First, whether the GEMM path the steps will take computes what Burn's matmul does (bf16
    // only: Burn fixes a CUDA device's float dtype at its first tensor).
    #[cfg(feature = "cuda")]
    let check = (backend::resolve(r.device) == crate::recipe::Device::Cuda && r.model.dtype == crate::recipe::DType::Bf16).then(|| {
        let t = Instant::now();
        let c = backend::gpu_check::self_check(&Default::default());
        let a = extras.check_attention.then(|| backend::gpu_check::attention_check(&Default::default()));
        eprintln!("bench: self-checks {:.1} s: {c:?}, {a:?}", t.elapsed().as_secs_f64());
        (c, a)
    });
    // Timing wrong maths is worthless: a failed self-check ends the bench.
    #[cfg(feature = "cuda")]
    if let Some((c, a)) = &check {
        if let Some((what, err)) = c.failure() {
            return Err(Error::Internal(format!(
                "the cuBLAS GEMM self-check failed: {what} is {err:.3e} (max |diff| / max |reference|), above {:.0e}; {c:?}",
                backend::gpu_check::GemmCheck::TOLERANCE
            )));
        }
        if let Some((what, err)) = a.as_ref().and_then(|a| a.failure()) {
            return Err(Error::Internal(format!(
                "the attention self-check failed: {what} is {err:.3e} (max |diff| / max |reference|), above {:.0e}; {a:?}",
                backend::gpu_check::AttentionCheck::TOLERANCE
            )));
        }
    }
    #[allow(unused_mut)]
    let mut report = backend::dispatch(r.device, r.model.dtype, Job { loaded, plan, warmup, steps, profile: extras.profile })?;
    #[cfg(feature = "cuda")]
    {
        report.gemm_check = check.and_then(|(c, _)| serde_json::to_value(c).ok());
        report.attention_check = check.and_then(|(_, a)| a).and_then(|a| serde_json::to_value(a).ok());
        if backend::resolve(r.device) == crate::recipe::Device::Cuda {
            report.gemm_ordering = Some(kernels_cubecl::gemm_ordering());
        }
    }
    Ok(report)
}

struct Job<'a> {
    loaded: &'a LoadedRecipe,
    plan: &'a ModelPlan,
    warmup: usize,
    steps: usize,
    profile: bool,
}

impl BackendJob for Job<'_> {
    type Output = BenchReport;

    fn run<B: TrainBackend>(self, device: B::Device) -> Result<BenchReport> {
        let r = &self.loaded.recipe;
        let sync = |d: &B::Device| B::sync(d).map_err(|e| Error::Internal(format!("device sync failed: {e:?}")));
        let t0 = Instant::now();
        let mut phases = BTreeMap::new();
        let mut m = model::build::<Autodiff<B>>(self.plan, &r.model, Layout::SINGLE, &device)?;
        sync(&device)?;
        phases.insert("weights".to_string(), t0.elapsed().as_secs_f64());
        let parts = model::weights::build_time::PHASES.iter().zip(model::weights::build_time::seconds());
        let parts: Vec<String> = parts.map(|(name, s)| {
            phases.insert(format!("weights_{name}"), s);
            format!("{name} {s:.1} s")
        }).collect();
        eprintln!("bench: weights built in {:.1} s ({}; the rest in the backend and between)", phases["weights"], parts.join(", "));
        let mut lora_params = 0.0;
        if r.train.tuning == Tuning::Lora {
            let targets = LoraTargets::parse(&r.lora.targets)?;
            let cfg = LoraConfig { rank: r.lora.rank, scale: r.lora.scale(), dropout: r.lora.dropout, seed: r.train.seed };
            m = lora::apply(m, &targets, &cfg)?.0;
            // Adapter FLOPs per token: dense layers see every token, experts top_k / E of them.
            for (_, linear) in m.linears_mut() {
                if linear.lora.is_some() {
                    let (i, o) = linear.dims();
                    lora_params += (r.lora.rank * (i + o)) as f64;
                }
            }
            for moe in m.layers.iter().filter_map(|l| l.moe.as_ref()) {
                let share = moe.top_k as f64 / moe.num_experts as f64;
                for adapter in lora::EXPERT_PROJECTIONS.iter().filter_map(|p| moe.expert_lora.get(p)) {
                    let ([_, i, rank], [_, _, o]) = (adapter.lora_a.val().dims(), adapter.lora_b.val().dims());
                    let local = moe.first_expert..moe.first_expert + moe.experts.len();
                    let adapted = adapter.adapted[local].iter().filter(|&&a| a).count();
                    lora_params += share * (adapted * rank * (i + o)) as f64;
                }
            }
        }
        sync(&device)?;
        let build_seconds = t0.elapsed().as_secs_f64();
        phases.insert("adapters".to_string(), build_seconds - phases["weights"]);
        let groups = recompute::groups(&r.train.recompute, m.layers.len())?;
        let schedule = LrSchedule::new(&r.optimizer, &r.schedule, self.warmup + self.steps);
        let mut trainer = Trainer::new(m, AdamW::new(AdamWConfig::from(&r.optimizer)), schedule, r.train.gradient_clip, r.train.seed, groups, device.clone());
        trainer.fused_cross_entropy = r.train.fused_cross_entropy;
        trainer.router_aux_loss_coef = super::preflight::router_aux_loss_coef(r, &self.plan.spec)?;
        let (micro, seq) = (r.train.micro_batch_size, r.train.max_length);
        let vocab = self.plan.spec.vocab_size as u32;
        let mut rng = ChaCha8Rng::seed_from_u64(r.train.seed);
        let mut batch = || {
            let ids: Vec<u32> = (0..micro * seq).map(|_| rng.random_range(0..vocab)).collect();
            Batch {
                batch_size: micro,
                seq_len: seq,
                labels: ids.iter().map(|&i| i64::from(i)).collect(),
                input_ids: ids,
                position_ids: (0..micro).flat_map(|_| 0..seq as u32).collect(),
                segment_ids: vec![1; micro * seq],
            }
        };
        let monitor = backend::device_monitor(r.device);
        let mut step_seconds = Vec::new();
        let mut losses = Vec::new();
        let mut reserved_gib = Vec::new();
        let (mut syncs, mut timed_unix, mut waited) = (0, [0.0; 2], 0.0);
        for step in 1..=self.warmup + self.steps {
            let b = batch();
            sync(&device)?;
            if step == self.warmup + 1 {
                timed_unix[0] = backend::device_monitor::unix_now();
            }
            let (before, waited_before) = (backend::host_syncs(), backend::host_wait_seconds());
            let t = Instant::now();
            let stats = trainer.step(step, std::slice::from_ref(&b))?;
            sync(&device)?;
            let secs = t.elapsed().as_secs_f64();
            if step > self.warmup {
                syncs += backend::host_syncs() - before;
                waited += backend::host_wait_seconds() - waited_before;
                timed_unix[1] = backend::device_monitor::unix_now();
            }
            let mem = stats.memory.map(|m| format!(", {:.1} GiB reserved", backend::gib(m.reserved))).unwrap_or_default();
            eprintln!("bench step {step}: {secs:.3} s, loss {:.4}{mem}{}", stats.loss, if step <= self.warmup { " (warm-up)" } else { "" });
            losses.push(stats.loss);
            if let Some(m) = stats.memory {
                reserved_gib.push(backend::gib(m.reserved));
            }
            if step > self.warmup {
                step_seconds.push(secs);
            }
        }
        let s_per_step = step_seconds.iter().sum::<f64>() / step_seconds.len().max(1) as f64;
        let load = monitor.and_then(|m| m.load_between(timed_unix[0], timed_unix[1]));
        let (spans, spans_coarse) = if self.profile {
            // (The last step ended synchronised.) Fine first: the pools give back what no tensor
            // holds, so the profiled step regrows them and each span's growth says where the
            // step's high-water mark is set.
            let mut profiled = |level: profile::Level| -> Result<(f64, Vec<profile::SpanTotal>)> {
                let b = batch();
                B::memory_cleanup(&device);
                profile::enable(level);
                let t = Instant::now();
                let stats = trainer.step(self.warmup + self.steps + 1, std::slice::from_ref(&b));
                let secs = t.elapsed().as_secs_f64();
                let spans = profile::totals();
                profile::enable(profile::Level::Off);
                stats?;
                Ok((secs, spans))
            };
            let (secs, spans) = profiled(profile::Level::Fine)?;
            eprintln!("bench: profiled step {secs:.3} s (device synchronised around each span; GiB: in use at the span's end, the pools' growth in it)");
            print_spans(&spans, secs);
            let (secs, coarse) = profiled(profile::Level::Coarse)?;
            eprintln!("bench: coarse profiled step {secs:.3} s (synchronised around the phases and the attention core only)");
            print_spans(&coarse, secs);
            let ms = |path: &str| coarse.iter().find(|s| s.path == path).map_or(0.0, |s| s.seconds * 1e3);
            eprintln!("bench: forward outside the attention core {:.1} ms (coarse: forward {:.1} - core {:.1})", ms("forward") - ms("forward/core"), ms("forward"), ms("forward/core"));
            (spans, coarse)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(BenchReport {
            family: self.plan.spec.family.clone(),
            device: format!("{:?}", backend::resolve(r.device)).to_lowercase(),
            // The CPU backend computes in f32 whatever model.dtype says.
            dtype: if backend::resolve(r.device) == crate::recipe::Device::Cpu { "f32".into() } else { format!("{:?}", r.model.dtype).to_lowercase() },
            micro_batch: micro,
            seq_len: seq,
            tuning: format!("{:?}", r.train.tuning).to_lowercase(),
            warmup_steps: self.warmup,
            steps: self.steps,
            s_per_step,
            tokens_per_s: (micro * seq) as f64 / s_per_step,
            flops_per_token: flops_per_token(&self.plan.spec, seq, r.train.tuning == Tuning::Full, lora_params),
            step_seconds,
            build_seconds,
            losses,
            gemm_check: None,
            attention_check: None,
            peak_reserved_gib: reserved_gib.iter().copied().reduce(f64::max),
            reserved_gib,
            build_phases: phases,
            profile: spans,
            profile_coarse: spans_coarse,
            syncs_per_step: syncs as f64 / self.steps.max(1) as f64,
            host_wait_s_per_step: waited / self.steps.max(1) as f64,
            gemm_ordering: None,
            timed_unix,
            gpu_busy: load.map(|l| l.busy),
            device_used_peak_gib: load.map(|l| backend::gib(l.used_peak)),
        })
    }
}

/// The profiled spans, one line each, indented by depth, with their share of the step's `secs`.
fn print_spans(spans: &[profile::SpanTotal], secs: f64) {
    for s in spans {
        let depth = s.path.matches('/').count();
        // Device memory: the most in use at the span's end, and the pools' growth in it.
        let memory = match (s.in_use_gib, s.reserved_growth_gib) {
            (Some(used), Some(grew)) => format!(" {used:>6.2} GiB {:>+7.2}", grew),
            _ => String::new(),
        };
        eprintln!("  {:>8.1} ms {:>5.1}% {:>6}x{memory}  {}{}", s.seconds * 1e3, 100.0 * s.seconds / secs, s.calls, "  ".repeat(depth), s.path.rsplit('/').next().unwrap_or(""));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{hub::Fetch, Registry};
    use crate::recipe::ModelSection;

    #[test]
    fn flops_of_qwen2_5_7b_are_about_four_times_its_parameters() {
        let section = ModelSection { path: Some("tests/data/qwen2.5-7b-instruct".into()), ..Default::default() };
        let plan = model::plan(&section, &Registry::builtin(), Fetch::Config).unwrap();
        // 7.62B parameters of which 0.54B are the (untied) embedding lookup: 7.07B in matmuls.
        let f = flops_per_token(&plan.spec, 2048, false, 0.0);
        let matmul = (f - 3.0 * 2.0 * 2048.0 * 3584.0 * 28.0) / 4.0;
        assert!((matmul / 1e9 - 7.07).abs() < 0.01, "{}", matmul / 1e9);
        assert!(flops_per_token(&plan.spec, 2048, true, 0.0) > f);
    }
}
