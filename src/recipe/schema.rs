//! The recipe schema: every key a job can set, with its default and the ms-swift / Megatron
//! flag it replaces. Paths in the TOML match the struct paths here (`optimizer.lr` is
//! `Recipe::optimizer.lr`), so errors and `--set` name what a reader sees in the code.

use serde::{Deserialize, Serialize};

/// A whole fine-tuning job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// A base recipe this one extends, relative to this file; keys here override the base's,
    /// tables merge, arrays replace. Removed from the resolved recipe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Where to run: `auto` (CUDA when this binary has it and a GPU is present, else CPU),
    /// `cpu` or `cuda`.
    pub device: Device,
    pub model: ModelSection,
    pub parallel: ParallelSection,
    pub lora: LoraSection,
    pub train: TrainSection,
    pub optimizer: OptimizerSection,
    pub schedule: ScheduleSection,
    pub data: DataSection,
    pub checkpoint: CheckpointSection,
    pub logging: LoggingSection,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The model to fine-tune (`--model`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A local folder with config.json and safetensors, or a hub id such as
    /// `Qwen/Qwen2.5-7B-Instruct` (`--model`). Relative to the working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Registered family (`trainer models`); default: the config's `model_type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// config.json fields inline; they override the folder's config.json.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<toml::Table>,
    /// `pretrained` loads `path`'s weights; `random` draws seeded random weights.
    pub init: Init,
    /// Seed of `init = "random"`.
    pub seed: u64,
    /// Storage and compute dtype of the frozen base weights on GPU (`--torch_dtype`); the CPU
    /// backend computes in f32.
    pub dtype: DType,
    /// Model name for self-cognition rows, `[Chinese, English]` (`--model_name`).
    pub model_name: Vec<String>,
    /// Model author for self-cognition rows, `[Chinese, English]` (`--model_author`).
    pub model_author: Vec<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: None,
            family: None,
            config: None,
            init: Init::Pretrained,
            seed: 42,
            dtype: DType::Bf16,
            model_name: vec![],
            model_author: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    #[default]
    Pretrained,
    Random,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    #[default]
    Bf16,
    F16,
    F32,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

/// How ranks split the job. World size = data x tensor x pipeline x context.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSection {
    /// Data-parallel replicas.
    pub data: usize,
    /// Tensor-parallel size (`--tensor_model_parallel_size`).
    pub tensor: usize,
    /// Pipeline stages (`--pipeline_model_parallel_size`); only 1 is supported.
    pub pipeline: usize,
    /// Expert-parallel size for MoE layers (`--expert_model_parallel_size`); divides data x context.
    pub expert: usize,
    /// Context-parallel size: the sequence split across ranks (`--context_parallel_size`).
    pub context: usize,
    /// Megatron sequence parallelism inside the tensor group (`--sequence_parallel`).
    pub sequence_parallel: bool,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection { data: 1, tensor: 1, pipeline: 1, expert: 1, context: 1, sequence_parallel: false }
    }
}

impl ParallelSection {
    pub fn world_size(&self) -> usize {
        self.data * self.tensor * self.pipeline * self.context
    }
}

/// LoRA adapters (`--train_type lora`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank r (`--lora_rank`).
    pub rank: usize,
    /// Alpha; the update is scaled by alpha / r, or alpha / sqrt(r) with rslora (`--lora_alpha`).
    pub alpha: f64,
    /// Dropout on the adapter's input (`--lora_dropout`).
    pub dropout: f64,
    /// Rank-stabilised scaling (`--use_rslora`).
    pub rslora: bool,
    /// `all-linear`, module names (`q_proj`), or `re:<regex>` over module paths (`--target_modules`).
    pub targets: Vec<String>,
    /// Modules trained in full beside the adapters (`--modules_to_save`).
    pub modules_to_save: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: 8,
            alpha: 32.0,
            dropout: 0.05,
            rslora: false,
            targets: vec!["all-linear".into()],
            modules_to_save: vec![],
        }
    }
}

impl LoraSection {
    /// The factor multiplying `B A x`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tuning {
    #[default]
    Lora,
    Full,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Drop rows longer than max_length.
    #[default]
    Delete,
    /// Cut tokens from the start.
    Left,
    /// Cut tokens from the end.
    Right,
}

/// The training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// `lora` or `full` (`--train_type`). With `full` the [lora] section is ignored.
    pub tuning: Tuning,
    /// Sequences per rank per forward (`--micro_batch_size`).
    pub micro_batch_size: usize,
    /// Sequences per optimizer step over all ranks (`--global_batch_size`); default micro x data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<usize>,
    /// Passes over the data (`--max_epochs`); `max_steps` wins when set.
    pub max_epochs: usize,
    /// Optimizer steps, overriding `max_epochs` (`--train_iters`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Tokens per sequence (`--max_length`).
    pub max_length: usize,
    /// What to do with longer rows (`--truncation_strategy`).
    pub truncation: Truncation,
    /// Pack short rows into full-length sequences (`--packing`).
    pub packing: bool,
    /// Concatenate a batch without padding (`--padding_free`).
    pub padding_free: bool,
    /// Seed of data order, dropout and adapter init (`--seed`).
    pub seed: u64,
    pub recompute: RecomputeSection,
    /// Fused (chunked) cross-entropy (`--cross_entropy_loss_fusion`).
    pub fused_cross_entropy: bool,
    /// Evaluate on the validation split every N steps (`--eval_interval`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<usize>,
    /// Clip gradients to this global norm; 0 turns clipping off (`--clip_grad`).
    pub gradient_clip: f64,
    /// Load weights without optimizer or step state (`--finetune`).
    pub finetune: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            tuning: Tuning::Lora,
            micro_batch_size: 1,
            global_batch_size: None,
            max_epochs: 1,
            max_steps: None,
            max_length: 2048,
            truncation: Truncation::Delete,
            packing: false,
            padding_free: false,
            seed: 42,
            recompute: RecomputeSection::default(),
            fused_cross_entropy: true,
            eval_interval: None,
            gradient_clip: 1.0,
            finetune: true,
        }
    }
}

/// Activation recompute (`--recompute_granularity`, `--recompute_method`, `--recompute_num_layers`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecomputeSection {
    pub granularity: RecomputeGranularity,
    pub method: RecomputeMethod,
    /// Layers per recompute unit (uniform) or layers recomputed per stage (block).
    pub num_layers: usize,
}

impl Default for RecomputeSection {
    fn default() -> Self {
        RecomputeSection { granularity: RecomputeGranularity::None, method: RecomputeMethod::Uniform, num_layers: 1 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeGranularity {
    #[default]
    None,
    Full,
    Selective,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeMethod {
    #[default]
    Uniform,
    Block,
}

/// AdamW.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// Only `adamw`.
    pub name: OptimizerName,
    /// Peak learning rate (`--lr`).
    pub lr: f64,
    /// Floor of the decay (`--min_lr`).
    pub min_lr: f64,
    /// Decoupled weight decay (`--weight_decay`).
    pub weight_decay: f64,
    /// `--adam_beta1`.
    pub beta1: f64,
    /// `--adam_beta2`.
    pub beta2: f64,
    /// `--adam_eps`.
    pub eps: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection { name: OptimizerName::Adamw, lr: 1e-4, min_lr: 0.0, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    #[default]
    Adamw,
}

/// Learning-rate schedule: linear warmup, then decay to `optimizer.min_lr`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Warmup as a fraction of all steps (`--lr_warmup_fraction`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_fraction: Option<f64>,
    /// Warmup in steps (`--lr_warmup_iters`); not together with warmup_fraction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// `cosine`, `linear` or `constant` (`--lr_decay_style`).
    pub decay: Decay,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Training data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Sources with ms-swift's `name#N` sampling (`--dataset`): a hub id or a local file.
    pub datasets: Vec<String>,
    /// Fraction of each source held out for validation (`--split_dataset_ratio`).
    pub val_split: f64,
    /// Default system prompt (`--system`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Chat template; default: the model family's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Loader threads running ahead of the GPU (`--num_workers`).
    pub num_workers: usize,
    /// Tokenisation threads (`--dataset_num_proc`).
    pub num_proc: usize,
    /// Skip and count bad rows instead of stopping.
    pub skip_bad_rows: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection { datasets: vec![], val_split: 0.0, system: None, template: None, num_workers: 1, num_proc: 1, skip_bad_rows: false }
    }
}

/// One entry of `data.datasets`: a source and how many rows to sample from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    pub source: String,
    /// `name#N`: N rows (sampled without replacement below the source's size, repeated above).
    pub sample: Option<usize>,
}

impl DatasetSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (source, n) = match s.rsplit_once('#') {
            Some((src, n)) => (src, Some(n)),
            None => (s, None),
        };
        if source.trim().is_empty() {
            return Err(format!("`{s}` has no dataset name; expected `name` or `name#N`"));
        }
        let sample = match n {
            None => None,
            Some(n) => match n.parse::<usize>() {
                Ok(0) => return Err(format!("`{s}`: #0 samples nothing; use N >= 1 or drop the source")),
                Ok(n) => Some(n),
                Err(_) => return Err(format!("`{s}`: `#{n}` is not a row count; expected `name#N` with N >= 1")),
            },
        };
        Ok(DatasetSpec { source: source.to_string(), sample })
    }
}

/// Checkpoints (`--save`, `--save_interval`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Folder the run folders go in (`--save`).
    pub output_dir: String,
    /// Save every N steps, and at the end (`--save_interval`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_interval: Option<usize>,
    /// Save optimizer and scheduler state (`--no_save_optim` sets false).
    pub save_optimizer: bool,
    /// Save RNG and data-order state (`--no_save_rng` sets false).
    pub save_rng: bool,
    /// A run folder to resume from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection { output_dir: "runs".into(), save_interval: None, save_optimizer: true, save_rng: true, resume: None }
    }
}

/// Progress and metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Log every N steps (`--log_interval`).
    pub interval: usize,
    /// JSON-lines metrics file inside the run folder.
    pub metrics_file: String,
    /// Progress bar on a terminal.
    pub progress_bar: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection { interval: 1, metrics_file: "metrics.jsonl".into(), progress_bar: true }
    }
}
