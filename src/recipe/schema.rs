//! The recipe schema: every key a job can set, its unit, its default and the ms-swift /
//! Megatron flag it replaces. Paths in the TOML match the struct paths here (`optimizer.lr` is
//! `Recipe::optimizer.lr`), so errors and `--set` name what a reader sees in the code.
//!
//! Every section is optional; a missing key takes the default written in its doc comment.
//! Enum values are lower-case strings (`device = "cuda"`, `init = "random"`).

use serde::{Deserialize, Serialize};

/// A whole fine-tuning job (`megatron sft ...` as one file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// A base recipe this one extends, relative to the file that names it. This file's keys
    /// override the base's, tables merge key by key, arrays replace whole; chains are allowed,
    /// cycles are an error. Removed from the resolved recipe. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Where to run. Default `auto`.
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

impl Recipe {
    /// Micro-batches accumulated per optimizer step on each data-parallel rank:
    /// `global_batch_size / (micro_batch_size x parallel.data)`. Exact once the recipe has been
    /// through [`load`](super::load) or [`validate`](fn@super::validate).
    pub fn gradient_accumulation_steps(&self) -> usize {
        let per_step = self.train.micro_batch_size.saturating_mul(self.parallel.data).max(1);
        self.train.global_batch_size.map_or(1, |g| (g / per_step).max(1))
    }
}

/// The device the job runs on (`device`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// CUDA when this binary was built with it and a GPU is present, else the CPU.
    #[default]
    Auto,
    /// The CPU backend (computes in f32).
    Cpu,
    /// NVIDIA GPUs; an error when the binary has no CUDA or no GPU is present.
    Cuda,
}

/// The model to fine-tune (`--model`, `--torch_dtype`, `--model_name`, `--model_author`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A local folder with `config.json` and safetensors (single or sharded), or a Hugging Face
    /// hub id such as `Qwen/Qwen2.5-7B-Instruct` (ms-swift `--model`). Relative folders are
    /// relative to the working directory. Default: none (then `[model.config]` is needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A `tokenizer.json` to tokenise the data with, relative to the working directory.
    /// Default: `tokenizer.json` in the `path` folder (needed when `init = "random"` has no
    /// folder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Registered model family (`qwen2`, `qwen3`, `qwen3_moe`, ...; `trainer models` lists
    /// them). Default: the config's `model_type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Hugging Face `config.json` fields written inline, under the same names
    /// (`hidden_size = 64`); with `path` they override the folder's config.json. Parsed by the
    /// model family, not by the recipe. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<toml::Table>,
    /// `pretrained` loads the weights under `path`; `random` builds the architecture with
    /// seeded random weights (benchmarks) and reads no weight file. Default `pretrained`.
    pub init: Init,
    /// Seed of `init = "random"`. Default 42.
    pub seed: u64,
    /// Storage and compute dtype of the frozen base weights on GPU (ms-swift `--torch_dtype`);
    /// the CPU backend computes in f32. Default `bf16`.
    pub dtype: DType,
    /// Model name for self-cognition rows, `[Chinese, English]`, or one value for both
    /// (ms-swift `--model_name`). Default: empty.
    pub model_name: Vec<String>,
    /// Model author for self-cognition rows, `[Chinese, English]`, or one value for both
    /// (ms-swift `--model_author`). Default: empty.
    pub model_author: Vec<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: None,
            tokenizer: None,
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

/// Where the base weights come from (`model.init`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// The safetensors under `model.path`.
    #[default]
    Pretrained,
    /// Seeded random weights (`model.seed`); needs only the architecture.
    Random,
}

/// Element type of the frozen base weights (`model.dtype`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// bfloat16.
    #[default]
    Bf16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

/// How ranks split the job. World size = data x tensor x pipeline x context; expert
/// parallelism reuses the data x context ranks for MoE layers. Rules that need the model
/// (heads divisible by `tensor`, experts by `expert`) are checked by the model code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSection {
    /// Data-parallel replicas (Megatron derives it from the world size). Default 1.
    pub data: usize,
    /// Tensor-parallel size (`--tensor_model_parallel_size`). Default 1.
    pub tensor: usize,
    /// Pipeline stages (`--pipeline_model_parallel_size`); only 1 is supported. Default 1.
    pub pipeline: usize,
    /// Expert-parallel size of MoE layers (`--expert_model_parallel_size`); must divide
    /// data x context. Default 1.
    pub expert: usize,
    /// Context-parallel size: each sequence split across this many ranks
    /// (`--context_parallel_size`). Default 1.
    pub context: usize,
    /// Megatron sequence parallelism inside the tensor-parallel group (`--sequence_parallel`);
    /// needs `tensor > 1`. Default false.
    pub sequence_parallel: bool,
    /// Megatron's distributed optimizer (`--use_distributed_optimizer`; ZeRO-1/2): each trained
    /// parameter's optimizer state (its moments, and its f32 master copy when it is stored
    /// narrower) lives on one data-parallel rank, which alone receives its summed gradient
    /// (reduce-scatter) and updates it, then every rank gathers the updated weights. The state
    /// takes 1/data of the memory; the updates are the same. Default false.
    pub distributed_optimizer: bool,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection { data: 1, tensor: 1, pipeline: 1, expert: 1, context: 1, sequence_parallel: false, distributed_optimizer: false }
    }
}

impl ParallelSection {
    /// Ranks the job needs: data x tensor x pipeline x context (saturating).
    pub fn world_size(&self) -> usize {
        [self.tensor, self.pipeline, self.context].iter().fold(self.data, |acc, &n| acc.saturating_mul(n))
    }
}

/// LoRA adapters (`--train_type lora`). Ignored when `train.tuning = "full"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Adapter rank r, 1 or more (`--lora_rank`). Default 8.
    pub rank: usize,
    /// Alpha, > 0; the update `B A x` is scaled by alpha / r, or alpha / sqrt(r) with
    /// `rslora` (`--lora_alpha`). Default 32.
    pub alpha: f64,
    /// Dropout probability on the adapter's input, in [0, 1) (`--lora_dropout`). Default 0.05.
    pub dropout: f64,
    /// Rank-stabilised scaling alpha / sqrt(r) (`--use_rslora`). Default false.
    pub rslora: bool,
    /// Linears that get adapters: `all-linear` (every linear but the LM head and the MoE gates:
    /// router, `shared_expert_gate`), module names (`q_proj`), or `re:<regex>` matched against
    /// whole module paths (`--target_modules`). Default `["all-linear"]`.
    pub targets: Vec<String>,
    /// Modules trained in full beside the adapters, e.g. `embed_tokens`, `lm_head`
    /// (`--modules_to_save`). Default: empty.
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
    /// The factor multiplying `B A x`: alpha / r, or alpha / sqrt(r) with rslora.
    pub fn scale(&self) -> f64 {
        let rank = self.rank.max(1) as f64;
        if self.rslora {
            self.alpha / rank.sqrt()
        } else {
            self.alpha / rank
        }
    }
}

/// What is trained (`train.tuning`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tuning {
    /// Frozen base, LoRA adapters from `[lora]`.
    #[default]
    Lora,
    /// Every weight; `[lora]` is ignored.
    Full,
}

/// What happens to rows longer than `train.max_length` (`--truncation_strategy`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Drop the row.
    #[default]
    Delete,
    /// Cut tokens from the start.
    Left,
    /// Cut tokens from the end.
    Right,
}

/// When training stops, from `max_epochs` and `max_steps`.
impl Truncation {
    /// The name a recipe writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Truncation::Delete => "delete",
            Truncation::Left => "left",
            Truncation::Right => "right",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many optimizer steps.
    Steps(usize),
    /// After this many passes over the data.
    Epochs(usize),
}

/// The training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// `lora` (adapters from `[lora]`) or `full` (every weight; `[lora]` is then ignored,
    /// whatever it says) (ms-swift `--train_type`). Default `lora`.
    pub tuning: Tuning,
    /// Sequences per rank per forward pass, 1 or more (`--micro_batch_size`). Default 1.
    pub micro_batch_size: usize,
    /// Sequences per optimizer step over all ranks (`--global_batch_size`); a multiple of
    /// micro_batch_size x parallel.data, the quotient being the gradient-accumulation steps.
    /// Default micro_batch_size x parallel.data (filled in by loading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<usize>,
    /// Passes over the data (`--max_epochs`); ignored when `max_steps` is set. Default 1.
    pub max_epochs: usize,
    /// Optimizer steps; when set it wins over `max_epochs` (`--train_iters`). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Tokens per sequence, 16 or more (`--max_length`). Default 2048.
    pub max_length: usize,
    /// Rows longer than max_length: `delete`, `left` or `right` (`--truncation_strategy`).
    /// Default `delete`.
    pub truncation: Truncation,
    /// Pack short rows into max_length sequences (`--packing`). Default false.
    pub packing: bool,
    /// Concatenate a micro-batch without padding (`--padding_free`). Default false.
    pub padding_free: bool,
    /// Seed of data order, dropout and adapter init (`--seed`). Default 42.
    pub seed: u64,
    /// Activation recompute (`--recompute_granularity`, `--recompute_method`,
    /// `--recompute_num_layers`). Default: off.
    pub recompute: RecomputeSection,
    /// Fused (chunked) cross-entropy that never materialises full logits
    /// (`--cross_entropy_loss_fusion`). Default true.
    pub fused_cross_entropy: bool,
    /// Evaluate on the `data.val_split` hold-out every N optimizer steps (`--eval_interval`);
    /// needs val_split > 0. Default: none (no evaluation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<usize>,
    /// Clip gradients to this global L2 norm; 0 turns clipping off (`--clip_grad`). Default 1.0.
    pub gradient_clip: f64,
    /// Weight of the MoE routers' load-balancing loss (transformers' `router_aux_loss_coef`,
    /// ms-swift `--router_aux_loss_coef`): Switch Transformer's loss over every MoE layer's
    /// router, added to the training loss. Default: the model config's `router_aux_loss_coef`
    /// (0.001 if absent) where the routers are trained (`tuning = "full"`), else 0 (frozen
    /// routers need none); 0 turns it off. Only for mixture-of-experts models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    /// With `checkpoint.resume`: load only the weights (adapter, or model with full tuning) and
    /// start a new run at step 0 with a fresh optimizer (Megatron `--finetune`); false continues
    /// the run exactly where the checkpoint stopped. `trainer run --resume DIR` always
    /// continues. Default true.
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
            router_aux_loss_coef: None,
            finetune: true,
        }
    }
}

impl TrainSection {
    /// When to stop: `max_steps` when set, else `max_epochs`.
    pub fn stop(&self) -> Stop {
        match self.max_steps {
            Some(n) => Stop::Steps(n),
            None => Stop::Epochs(self.max_epochs),
        }
    }
}

/// Activation recompute (`[train.recompute]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecomputeSection {
    /// `none`, `full` (whole layers) or `selective` (attention core only)
    /// (`--recompute_granularity`). Default `none`.
    pub granularity: RecomputeGranularity,
    /// With `full`: `uniform` (layers in groups of num_layers) or `block` (the first num_layers
    /// layers) (`--recompute_method`). Default `uniform`.
    pub method: RecomputeMethod,
    /// Layers per recompute group (uniform) or layers recomputed (block), 1 or more
    /// (`--recompute_num_layers`). Default 1.
    pub num_layers: usize,
}

impl Default for RecomputeSection {
    fn default() -> Self {
        RecomputeSection { granularity: RecomputeGranularity::None, method: RecomputeMethod::Uniform, num_layers: 1 }
    }
}

/// How much of the forward pass is recomputed in backward (`train.recompute.granularity`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeGranularity {
    /// Keep every activation.
    #[default]
    None,
    /// Recompute whole transformer layers.
    Full,
    /// Recompute the attention core only.
    Selective,
}

/// Which layers are recomputed with `granularity = "full"` (`train.recompute.method`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeMethod {
    /// Every layer, checkpointed in groups of `num_layers`.
    #[default]
    Uniform,
    /// The first `num_layers` layers.
    Block,
}

/// The optimizer (AdamW with decoupled weight decay).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// Only `adamw` (`--optimizer adam`, which Megatron runs as AdamW). Default `adamw`.
    pub name: OptimizerName,
    /// Peak learning rate, > 0 (`--lr`). Default 1e-4.
    pub lr: f64,
    /// Learning rate at the end of the decay, in [0, lr] (`--min_lr`). Default 0.
    pub min_lr: f64,
    /// Decoupled weight decay, >= 0 (`--weight_decay`). Default 0.1.
    pub weight_decay: f64,
    /// First-moment decay, in [0, 1) (`--adam_beta1`). Default 0.9.
    pub beta1: f64,
    /// Second-moment decay, in [0, 1) (`--adam_beta2`). Default 0.95.
    pub beta2: f64,
    /// Denominator epsilon, > 0 (`--adam_eps`). Default 1e-8.
    pub eps: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        OptimizerSection {
            name: OptimizerName::Adamw,
            lr: 1e-4,
            min_lr: 0.0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        }
    }
}

/// The optimizer algorithm (`optimizer.name`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    /// Adam with decoupled weight decay.
    #[default]
    Adamw,
}

/// Learning-rate schedule: linear warmup from 0 to `optimizer.lr`, then decay to
/// `optimizer.min_lr` by the last step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Warmup as a fraction of all optimizer steps, in [0, 1] (`--lr_warmup_fraction`); not
    /// together with warmup_steps. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_fraction: Option<f64>,
    /// Warmup in optimizer steps (`--lr_warmup_iters`); not together with warmup_fraction.
    /// Default: none. With neither set there is no warmup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// Shape of the decay after warmup: `cosine`, `linear` or `constant`
    /// (`--lr_decay_style`). Default `cosine`.
    pub decay: Decay,
}

/// Shape of the learning-rate decay (`schedule.decay`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Half a cosine from lr to min_lr.
    #[default]
    Cosine,
    /// A straight line from lr to min_lr.
    Linear,
    /// lr throughout (min_lr unused).
    Constant,
}

/// Training data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Sources in ms-swift syntax (`--dataset`): a hub id or a local file, optionally `#N` to
    /// sample N rows, e.g. `AI-ModelScope/alpaca-gpt4-data-en#500`. See [`DatasetSpec`].
    /// Default: empty.
    pub datasets: Vec<String>,
    /// Fraction of each source held out for validation, in [0, 1)
    /// (`--split_dataset_ratio`). Default 0.
    pub val_split: f64,
    /// Default system prompt for rows without one (`--system`). Default: the template's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Chat template (`--template`): a built-in name (`qwen2_5`, `qwen2`, `qwen3`,
    /// `chatml`, `llama3_1`) or a `.jinja` file. Default: the model's
    /// own (`chat_template.jinja` or `tokenizer_config.json` beside the tokenizer), else
    /// `qwen2_5`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Extra variables for the chat template, as transformers' `apply_chat_template(**kwargs)`
    /// passes them, e.g. `{ enable_thinking = false }` for Qwen3. Default: none.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Leave an empty `<think>\n\n</think>\n\n` block (Qwen3's template writes one before a
    /// reply without reasoning) out of the loss, as ms-swift's `--loss_scale
    /// ignore_empty_think`. Default false: the whole reply is trained, as ms-swift's default.
    pub ignore_empty_think: bool,
    /// Data-loader threads, 1 or more (`--num_workers`). Accepted for ms-swift recipes; trainer
    /// tokenises every row before step 1 (on `num_proc` threads) and takes batches from memory,
    /// so no loader runs beside the training loop. Default 1.
    pub num_workers: usize,
    /// Tokenisation threads, 1 or more (`--dataset_num_proc`). Default 1.
    pub num_proc: usize,
    /// Skip (and count) rows that fail to parse or tokenise instead of stopping. Default false.
    pub skip_bad_rows: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            datasets: vec![],
            val_split: 0.0,
            system: None,
            template: None,
            template_kwargs: serde_json::Map::new(),
            ignore_empty_think: false,
            num_workers: 1,
            num_proc: 1,
            skip_bad_rows: false,
        }
    }
}

impl DataSection {
    /// What the chat template is rendered with.
    pub fn template_options(&self) -> crate::data::template::Options {
        crate::data::template::Options {
            template: self.template.clone(),
            kwargs: self.template_kwargs.clone(),
            ignore_empty_think: self.ignore_empty_think,
        }
    }

    /// `datasets` parsed; the first bad entry is reported with its index.
    pub fn specs(&self) -> Result<Vec<DatasetSpec>, String> {
        self.datasets
            .iter()
            .enumerate()
            .map(|(i, s)| DatasetSpec::parse(s).map_err(|e| format!("data.datasets[{i}]: {e}")))
            .collect()
    }
}

/// One entry of `data.datasets`: a source and how many rows to sample from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// Hub id or local path, without the `#N` suffix.
    pub source: String,
    /// `name#N`: N rows (sampled without replacement below the source's size, repeated
    /// above it). None: every row.
    pub sample: Option<usize>,
}

impl DatasetSpec {
    /// Parse ms-swift's `name` or `name#N` (N >= 1; the last `#` splits).
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
                Ok(0) => {
                    return Err(format!("`{s}`: `#0` samples nothing; expected `name#N` with N >= 1, or drop the source"))
                }
                Ok(n) => Some(n),
                Err(_) => return Err(format!("`{s}`: `#{n}` is not a row count; expected `name#N` with N >= 1")),
            },
        };
        Ok(DatasetSpec { source: source.to_string(), sample })
    }
}

/// Checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Folder the run folders are created in (`--save`). Default `runs`.
    pub output_dir: String,
    /// Save every N optimizer steps, and at the end (`--save_interval`). Default: none (only
    /// at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_interval: Option<usize>,
    /// Keep only the newest N complete checkpoints, removing older ones after each save
    /// (transformers' `save_total_limit`). Default: none (keep all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    /// Save optimizer and scheduler state (`--no_save_optim true` is `false` here). Default true.
    /// A checkpoint written on an interrupt (Ctrl-C, SIGTERM) always has it, so it resumes.
    pub save_optimizer: bool,
    /// Save RNG and data-order state (`--no_save_rng true` is `false` here). Default true.
    pub save_rng: bool,
    /// A run folder (its latest checkpoint), a `checkpoint-N` folder, or a peft adapter folder
    /// to start from (`--load`); see `train.finetune`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            output_dir: "runs".into(),
            save_interval: None,
            save_total_limit: None,
            save_optimizer: true,
            save_rng: true,
            resume: None,
        }
    }
}

/// Progress and metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Log every N optimizer steps, 1 or more (`--log_interval`). Default 1.
    pub interval: usize,
    /// JSON-lines metrics file, relative to the run folder. Default `metrics.jsonl`.
    pub metrics_file: String,
    /// Show a progress bar when stderr is a terminal. Default true.
    pub progress_bar: bool,
    /// Also write TensorBoard event files into the run folder (`--report_to tensorboard`), the
    /// scalars under transformers' tags (`train/loss`, `eval/loss`, ...). Default false.
    pub tensorboard: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        LoggingSection { interval: 1, metrics_file: "metrics.jsonl".into(), progress_bar: true, tensorboard: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_specs_parse_name_and_count() {
        assert_eq!(DatasetSpec::parse("a#500"), Ok(DatasetSpec { source: "a".into(), sample: Some(500) }));
        assert_eq!(DatasetSpec::parse("org/a"), Ok(DatasetSpec { source: "org/a".into(), sample: None }));
        assert_eq!(DatasetSpec::parse("x#y#3").map(|d| d.source), Ok("x#y".to_string()));
        assert!(DatasetSpec::parse("a#0").unwrap_err().contains("`#0`"));
        assert!(DatasetSpec::parse("a#x").unwrap_err().contains("not a row count"));
        assert!(DatasetSpec::parse("a#-1").is_err());
        assert!(DatasetSpec::parse("a#").is_err());
        assert!(DatasetSpec::parse("#5").unwrap_err().contains("no dataset name"));
        assert!(DatasetSpec::parse("").is_err());
        let data = DataSection { datasets: vec!["a#1".into(), "b#zz".into()], ..Default::default() };
        assert!(data.specs().unwrap_err().starts_with("data.datasets[1]"));
    }

    #[test]
    fn lora_scale_and_world_size() {
        let lora = LoraSection { rank: 16, alpha: 32.0, ..Default::default() };
        assert_eq!(lora.scale(), 2.0);
        assert_eq!(LoraSection { rslora: true, ..lora }.scale(), 8.0);
        let p = ParallelSection { data: 2, tensor: 2, pipeline: 1, context: 3, expert: 6, sequence_parallel: true, ..Default::default() };
        assert_eq!(p.world_size(), 12);
        assert_eq!(ParallelSection { data: usize::MAX, tensor: 2, ..Default::default() }.world_size(), usize::MAX);
    }

    #[test]
    fn max_steps_wins_over_epochs() {
        let t = TrainSection { max_epochs: 3, ..Default::default() };
        assert_eq!(t.stop(), Stop::Epochs(3));
        assert_eq!(TrainSection { max_steps: Some(10), ..t }.stop(), Stop::Steps(10));
    }

    #[test]
    fn enums_are_lower_case_strings() {
        let r: Recipe = toml::from_str(
            "device = \"cuda\"\n[model]\ninit = \"random\"\ndtype = \"f16\"\n[train]\ntuning = \"full\"\ntruncation = \"left\"\n\
             [train.recompute]\ngranularity = \"selective\"\nmethod = \"block\"\n[schedule]\ndecay = \"constant\"\n",
        )
        .unwrap();
        assert_eq!((r.device, r.model.init, r.model.dtype), (Device::Cuda, Init::Random, DType::F16));
        assert_eq!((r.train.tuning, r.train.truncation), (Tuning::Full, Truncation::Left));
        assert_eq!(r.train.recompute.granularity, RecomputeGranularity::Selective);
        assert_eq!(r.train.recompute.method, RecomputeMethod::Block);
        assert_eq!(r.schedule.decay, Decay::Constant);
        assert!(toml::from_str::<Recipe>("device = \"CUDA\"\n").is_err());
    }

    #[test]
    fn accumulation_steps_follow_global_batch() {
        let mut r = Recipe::default();
        r.train.micro_batch_size = 2;
        r.parallel.data = 4;
        r.train.global_batch_size = Some(32);
        assert_eq!(r.gradient_accumulation_steps(), 4);
    }
}
