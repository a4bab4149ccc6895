//! The `trainer` command line: `check`, `models`, `run`, `export`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::backend;
use crate::error::{Error, Result};
use crate::export;
use crate::infer;
use crate::model::{self, hub::Fetch, Registry};
use crate::recipe::{self, LoadedRecipe};
use crate::train;

#[derive(Parser, Debug)]
#[command(name = "trainer", version, about = "Declarative LLM fine-tuning: recipes compiled into Burn models", disable_help_subcommand = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a recipe and show what it builds: the resolved recipe, the model, its shards
    /// and memory per rank. Touches no weights.
    Check {
        /// The recipe (TOML).
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set optimizer.lr=2e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Skip the data dry run (reading, mixing and tokenising every row).
        #[arg(long)]
        no_data: bool,
        /// Show the first N rows as the model sees them (rendered text with the trained text
        /// marked, token ids, labels), as ms-swift logs [INPUT] and [LABELS]. Default 1.
        #[arg(long, value_name = "N", default_value_t = 1)]
        show_rows: usize,
        /// Print the shown rows as JSON (chat template, text, trained ranges, ids, labels)
        /// instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Train as the recipe says: checkpoints and metrics go to a run folder under
    /// `checkpoint.output_dir`. Ctrl-C (or SIGTERM) finishes the step in flight, saves a
    /// checkpoint and exits 130 (143); a second one exits at once.
    Run {
        /// The recipe (TOML). Optional with --resume: a run continues with the recipe it saved.
        #[arg(value_name = "RECIPE", required_unless_present = "resume")]
        recipe: Option<PathBuf>,
        /// Override a recipe key, e.g. `--set optimizer.lr=2e-4` (repeatable). On --resume only
        /// keys that keep the run exact may change: train.max_steps, train.max_epochs,
        /// train.eval_interval, checkpoint.save_interval, checkpoint.save_total_limit, logging.*.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue a run exactly where it stopped: its run folder (the newest checkpoint) or a
        /// checkpoint-N in it (an older one continues in a new run folder beside it).
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// Start N ranks on this machine, one process each, as torchrun does (the recipe's
        /// parallel layout must need N ranks). Rank 0 keeps this terminal; rank k writes
        /// `rank-logs/rank-k.log` under checkpoint.output_dir. Ranks started by another launcher
        /// read WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT instead.
        #[arg(long = "nproc-per-node", value_name = "N")]
        nproc_per_node: Option<usize>,
        /// The port rank 0 serves the ranks' rendezvous on, with --nproc-per-node (default: a
        /// free one on one node; required with --nnodes > 1).
        #[arg(long = "master-port", value_name = "PORT", requires = "nproc_per_node")]
        master_port: Option<u16>,
        /// Nodes in the job, each running this command with its --node-rank (as torchrun's
        /// --nnodes): the world is nnodes x nproc-per-node ranks.
        #[arg(long, value_name = "M", default_value_t = 1, requires = "nproc_per_node")]
        nnodes: usize,
        /// This node's place among the nodes, 0 to nnodes - 1; node 0's first rank serves the
        /// rendezvous.
        #[arg(long = "node-rank", value_name = "K", default_value_t = 0, requires = "nproc_per_node")]
        node_rank: usize,
        /// Node 0's address every node reaches it at (default 127.0.0.1: one node).
        #[arg(long = "master-addr", value_name = "HOST", requires = "nproc_per_node")]
        master_addr: Option<String>,
    },
    /// Turn a run into a merged Hugging Face model, a peft adapter, or a merged base for a
    /// further trainer stage. Reads the recipe the run saved: no flags to repeat.
    Export {
        /// A run folder (its latest complete checkpoint) or a checkpoint-N folder.
        run_dir: PathBuf,
        /// What to write.
        #[arg(long, value_enum)]
        to: export::Target,
        /// Folder to create (must not exist or be empty, unless --overwrite).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Stored dtype: default the recipe's model.dtype for hf, f32 for peft and native.
        #[arg(long, value_parser = ["bf16", "f16", "f32"])]
        dtype: Option<String>,
        /// Largest weight file, as transformers' max_shard_size: 5GB, 500MB, 2GiB, bytes.
        #[arg(long, default_value = "5GB", value_name = "SIZE")]
        max_shard_size: String,
        /// Replace a non-empty --out folder (only once the new export is complete).
        #[arg(long)]
        overwrite: bool,
        /// MoE expert adapters with --to peft: `fused` for transformers >= 5 (peft
        /// target_parameters), `per-expert` for transformers 4.x.
        #[arg(long, value_enum, default_value = "fused")]
        peft_experts: export::PeftExperts,
        /// Compare the trained model and the export on one chat sample; fail when the mean
        /// |logit diff| on label positions exceeds --precision-threshold.
        #[arg(long)]
        test_precision: bool,
        /// The largest mean |logit diff| on label positions the precision check accepts
        /// (with --test-precision); a number >= 0.
        #[arg(long, default_value_t = 0.1, value_name = "X", allow_negative_numbers = true)]
        precision_threshold: f64,
        /// Device of the precision check (cpu, cuda, auto); default the recipe's.
        #[arg(long)]
        device: Option<String>,
        /// Also write the precision sample's ids and both logits to this safetensors file.
        #[arg(long, value_name = "FILE", requires = "test_precision")]
        precision_logits: Option<PathBuf>,
    },
    /// Chat with a run's model as it trained (the base with the checkpoint's adapters applied
    /// unmerged, or its fully trained weights), or with a model folder: each --prompt answered
    /// in turn, every row of --data, or else a conversation read from standard input a line a
    /// turn (`clear` starts over, `exit` or the input's end stops). Prompts rendered by the recipe's (or the
    /// model's) chat template; answers streamed until its end of turn.
    Infer {
        /// A run folder (its latest complete checkpoint), a checkpoint-N folder, or a model
        /// folder (config.json, safetensors, tokenizer: `trainer export --to hf`'s, say).
        run_dir: PathBuf,
        /// A single-turn prompt to answer; repeat for several.
        #[arg(long, value_name = "TEXT")]
        prompt: Vec<String>,
        /// Answer every row of a dataset (a .jsonl/.json/.parquet file or hub id, in any format
        /// data.datasets reads): each row's messages up to its last assistant message are the
        /// prompt, that message the reference; one JSON line a row (messages, response, labels).
        #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
        data: Option<String>,
        /// With --data: the JSON-lines file to write (a new file); default standard output.
        #[arg(long, value_name = "FILE", requires = "data")]
        out: Option<PathBuf>,
        /// The system prompt; default the recipe's data.system.
        #[arg(long, value_name = "TEXT")]
        system: Option<String>,
        /// The most tokens an answer may have.
        #[arg(long, default_value_t = 512, value_name = "N")]
        max_new_tokens: usize,
        /// 0 takes the most likely token (greedy); above 0 draws from the softmax of
        /// logits / temperature.
        #[arg(long, default_value_t = 0.0, value_name = "T", allow_negative_numbers = true)]
        temperature: f64,
        /// With --temperature: draw among the K most likely tokens only (0: all).
        #[arg(long, default_value_t = 0, value_name = "K")]
        top_k: usize,
        /// With --temperature: draw among the fewest most likely tokens whose probabilities
        /// sum to P (1: all).
        #[arg(long, default_value_t = 1.0, value_name = "P", allow_negative_numbers = true)]
        top_p: f64,
        /// Seed of the draws.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Device (cpu, cuda, auto); default the recipe's.
        #[arg(long)]
        device: Option<String>,
        /// The run's base model alone, without what it trained (to compare).
        #[arg(long)]
        base: bool,
    },
    /// Time optimizer steps of the recipe's model on synthetic tokens (one micro batch of
    /// train.micro_batch_size x train.max_length per step) and print one JSON line: s/step,
    /// tokens/s, model FLOPs per token. `benches/` sets it beside the PyTorch baseline.
    Bench {
        /// The recipe (TOML) whose model, LoRA, batch and device are timed; its data is not
        /// read.
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set model.config.num_hidden_layers=4` or
        /// `--set train.micro_batch_size=16` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Untimed steps first (CubeCL autotunes each new shape).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// One more step after the timed ones with the device synchronised around each model
        /// op (attention projections, core, MLP, LoRA, head, backward, optimizer), printed as a
        /// per-op breakdown and added to the JSON line as `profile`.
        #[arg(long)]
        profile: bool,
        /// On CUDA in bf16, also check the attention (blockwise kernels, batched cuBLAS GEMMs)
        /// against the f32 reference on the CPU, forward and gradients, before the steps
        /// (`attention_check` in the JSON line; its kernels compile for minutes on a fresh
        /// machine).
        #[arg(long)]
        check_attention: bool,
    },
    /// Time the attention core alone (forward, and backward to dq, dk and dv) on random bf16
    /// inputs, causal or packed, and print one JSON line: ms and TFLOP/s each way and the path
    /// that ran. `benches/attention.sh` sets it beside torch's scaled_dot_product_attention.
    BenchAttention {
        /// Sequences of the batch.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Query heads (Qwen2.5-7B's by default).
        #[arg(long, default_value_t = 28)]
        heads: usize,
        /// Key/value heads; a divisor of --heads.
        #[arg(long, default_value_t = 4)]
        kv_heads: usize,
        /// Tokens of each sequence.
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Size of each head.
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Each row four segments (40%, 30%, 20%, 10%) attending within their own, as packed
        /// samples do; else one causal sequence a row.
        #[arg(long)]
        packed: bool,
        /// Which implementation: auto (the backend's choice, KERNELS_CUBECL_ATTENTION), blockwise,
        /// flash, or flash-forward (the flash forward, the blockwise backward).
        #[arg(long, default_value = "auto", value_parser = ["auto", "blockwise", "flash", "flash-forward"])]
        kernel: String,
        /// Untimed passes first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed passes (the median is reported).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Where to run: cpu, cuda, or auto (CUDA when this build has it and a GPU answers).
        #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "auto"])]
        device: String,
    },
    /// Time the LM-head cross-entropy alone (forward and backward to dh and dW) on random
    /// bf16 inputs, fused or through materialised logits, and print one JSON line: s/step and
    /// the device memory it took beyond its inputs. `benches/ce.sh` sets it beside PyTorch.
    BenchLoss {
        /// Rows of hidden states (tokens of the batch).
        #[arg(long, default_value_t = 16384)]
        tokens: usize,
        /// Hidden size (Qwen2.5-7B's by default).
        #[arg(long, default_value_t = 3584)]
        hidden: usize,
        /// Vocabulary size (Qwen2.5's by default).
        #[arg(long, default_value_t = 152064)]
        vocab: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Materialise the logits instead of the fused kernel.
        #[arg(long)]
        unfused: bool,
        /// The fused kernel's tokens per chunk (default: Liger's, a chunk's logits about the
        /// size of the hidden states), e.g. `--chunk-tokens 2048`.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        chunk_tokens: Option<u64>,
        /// Where to run: cpu, cuda, or auto (CUDA when this build has it and a GPU answers).
        #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "auto"])]
        device: String,
    },
    /// List the runs under a folder, one line each: state (running with its PID, finished, or
    /// stopped at its newest checkpoint's step), steps done / planned, last loss and eval loss,
    /// newest checkpoint, size on disk. Reads the folders only.
    Runs {
        /// A folder of runs (a recipe's checkpoint.output_dir) or one run folder.
        #[arg(default_value = "runs")]
        dir: PathBuf,
        /// One JSON object per run instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Draw runs' metrics as SVG charts: training loss (raw and smoothed), eval loss, learning
    /// rate, gradient norm, tokens/s and device memory against the step, several runs overlaid
    /// for comparing. A run draws its own into its `plots/` at each evaluation and at the end.
    Plot {
        /// Run folders (each with its metrics.jsonl), or metrics files.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The folder the charts go into (default: the run's `plots/` for one run, `plots` in
        /// the current folder for several).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a complete, commented recipe for a model and its data, with the parallel layout
    /// and batch sizes chosen for this machine's GPUs from the memory estimate `check` prints;
    /// `trainer check` accepts it as written. Never overwrites a file.
    Init {
        /// The model: a local folder with its config.json, or a Hugging Face hub id
        /// (`Qwen/Qwen2.5-7B-Instruct`).
        #[arg(long, value_name = "PATH_OR_HUB_ID")]
        model: String,
        /// Training data, in ms-swift's syntax: local files (.jsonl, .json, .csv, .parquet) or
        /// hub ids, each optionally `#N` to sample N rows (repeatable, or several after one
        /// --data).
        #[arg(long, value_name = "FILE", required = true, num_args = 1..)]
        data: Vec<String>,
        /// LoRA, rank 8, alpha 32, on every linear layer (the default).
        #[arg(long, conflicts_with = "full")]
        lora: bool,
        /// Full fine-tuning: every weight trains.
        #[arg(long)]
        full: bool,
        /// GPUs to lay the job out on (default: the ones this machine's CUDA sees; 0: the CPU).
        #[arg(long, value_name = "N")]
        gpus: Option<usize>,
        /// Memory of one GPU in GiB, for laying out a job for another machine (default: this
        /// machine's first GPU, or its RAM for the CPU).
        #[arg(long, value_name = "GIB")]
        gpu_memory: Option<f64>,
        /// Where the recipe goes.
        #[arg(long, default_value = "recipe.toml")]
        out: PathBuf,
    },
    /// List the registered model families.
    Models,
    /// Help on a subcommand (`trainer help run`), or on the recipe: `trainer help recipe` lists
    /// every key with its documentation, `trainer help recipe KEY` shows one key or section in
    /// full (unit, default, values, the ms-swift flag it replaces).
    Help {
        /// `recipe`, or a subcommand's name.
        topic: Option<String>,
        /// With `recipe`: a key (`optimizer.lr`) or section (`lora`).
        key: Option<String>,
    },
}

/// Entry point of the `trainer` binary with the built-in families.
pub fn main() -> ExitCode {
    main_with(Registry::builtin())
}

/// Entry point with a caller's registry: a program that adds its own family (see
/// `examples/llama3_family.rs`) gets the whole CLI for it.
pub fn main_with(registry: Registry) -> ExitCode {
    #[cfg(unix)]
    // SAFETY: called first thing on the main thread, before any other thread exists; restores
    // the default disposition Rust's runtime replaced.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    crate::backend::out_of_memory::install_hook();
    let cli = Cli::parse();
    match execute(cli, &registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ Error::Interrupted { .. }) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub fn execute(cli: Cli, registry: &Registry) -> Result<()> {
    match cli.command {
        Command::Check { recipe, set, no_data, show_rows, json } => {
            let loaded = recipe::load(&recipe, &set)?;
            if json && no_data {
                return Err(Error::Unsupported("--json shows data rows; it cannot go with --no-data".into()));
            }
            let (report, rows) = check(&loaded, registry, !no_data, show_rows)?;
            if json {
                println!("{rows}");
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Bench { recipe, set, warmup, steps, profile, check_attention } => {
            let loaded = recipe::load(&recipe, &set)?;
            if steps == 0 {
                return Err(Error::Unsupported("--steps 0: expected 1 or more timed steps".into()));
            }
            let plan = plan(&loaded, registry, Fetch::All)?;
            train::preflight::model(&loaded, &plan, true)?;
            let extras = train::bench::BenchExtras { profile, check_attention };
            let report = train::bench::bench(&loaded, &plan, warmup, steps, extras)?;
            println!("{}", serde_json::to_string(&report).map_err(|e| Error::Internal(e.to_string()))?);
            Ok(())
        }
        Command::BenchAttention { batch, heads, kv_heads, seq, head_dim, packed, kernel, warmup, steps, device } => {
            let device = match device.as_str() {
                "cpu" => crate::recipe::Device::Cpu,
                "cuda" => crate::recipe::Device::Cuda,
                _ => crate::recipe::Device::Auto,
            };
            let kernel = match kernel.as_str() {
                "blockwise" => kernels_cubecl::AttentionKernel::Blockwise,
                "flash" => kernels_cubecl::AttentionKernel::Flash,
                "flash-forward" => kernels_cubecl::AttentionKernel::FlashForward,
                _ => kernels_cubecl::AttentionKernel::Auto,
            };
            let shape = train::bench_attention::AttentionShape { batch, heads, kv_heads, seq, head_dim, packed };
            let job = train::bench_attention::AttentionBench { shape, kernel, warmup, steps: steps.max(1) };
            let report = backend::dispatch(device, crate::recipe::DType::Bf16, job)?;
            println!("{}", serde_json::to_string(&report).map_err(|e| Error::Internal(e.to_string()))?);
            Ok(())
        }
        Command::BenchLoss { tokens, hidden, vocab, warmup, steps, unfused, chunk_tokens, device } => {
            let device = match device.as_str() {
                "cpu" => crate::recipe::Device::Cpu,
                "cuda" => crate::recipe::Device::Cuda,
                _ => crate::recipe::Device::Auto,
            };
            let job = train::bench_loss::LossBench { tokens, hidden, vocab, warmup, steps: steps.max(1), fused: !unfused, chunk_tokens: chunk_tokens.map(|c| c as usize) };
            let report = backend::dispatch(device, crate::recipe::DType::Bf16, job)?;
            println!("{}", serde_json::to_string(&report).map_err(|e| Error::Internal(e.to_string()))?);
            Ok(())
        }
        Command::Init { model, data, lora: _, full, gpus, gpu_memory, out } => {
            let gpus = gpus.unwrap_or_else(backend::gpu_count);
            let device = if gpus > 0 { crate::recipe::Device::Cuda } else { crate::recipe::Device::Cpu };
            let memory = match gpu_memory {
                Some(g) if g.is_finite() && g > 0.0 => Some((g * (1u64 << 30) as f64) as u64),
                Some(g) => return Err(Error::Unsupported(format!("--gpu-memory {g}: expected GiB, a positive number"))),
                None => backend::memory_capacity(device).map(|(bytes, _)| bytes),
            };
            let tuning = if full { crate::recipe::Tuning::Full } else { crate::recipe::Tuning::Lora };
            let req = crate::train::init::InitRequest { model, data, tuning, gpus, memory, out: out.clone() };
            let c = crate::train::init::init(&req, registry)?;
            println!(
                "wrote {}: {} rank(s) (data {} x tensor {}, expert {}), micro batch {}, global batch {}, recompute {}; estimate {:.1} GiB a rank{}",
                out.display(), c.data * c.tensor, c.data, c.tensor, c.expert, c.micro_batch, c.global_batch,
                if c.recompute { "full" } else { "none" }, c.estimate_gib,
                c.capacity_gib.map_or(String::new(), |g| format!(" of {g:.0} GiB"))
            );
            println!("next: trainer check {}", out.display());
            Ok(())
        }
        Command::Runs { dir, json } => {
            let runs = crate::run::listing::list(&dir)?;
            if json {
                for r in &runs {
                    println!("{}", serde_json::to_string(r).map_err(|e| Error::Internal(e.to_string()))?);
                }
            } else if runs.is_empty() {
                println!("no runs in {}", dir.display());
            } else {
                print!("{}", crate::run::listing::table(&runs));
            }
            Ok(())
        }
        Command::Plot { runs, out } => {
            let mut read = Vec::new();
            for run in &runs {
                let file = if run.is_dir() { run.join("metrics.jsonl") } else { run.clone() };
                if !file.is_file() {
                    return Err(Error::file(&file, "no such metrics file; give a run folder (it holds metrics.jsonl) or a metrics file"));
                }
                let label = crate::run::plots::run_label(if run.is_dir() { run } else { run.parent().unwrap_or(run) });
                read.push((label, crate::run::plots::read_metrics(&file)?));
            }
            let out = out.unwrap_or_else(|| match &runs[..] {
                [one] if one.is_dir() => one.join("plots"),
                _ => PathBuf::from("plots"),
            });
            for f in crate::run::plots::write_charts(&out, &read)? {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Help { topic, key } => {
            use clap::CommandFactory;
            let mut cli = Cli::command();
            match topic.as_deref() {
                Some("recipe") => print!("{}", recipe::explain::explain(key.as_deref())?),
                None => cli.print_help().map_err(|e| Error::Internal(e.to_string()))?,
                Some(name) => match cli.find_subcommand(name) {
                    // As `trainer NAME --help` prints it (usage line included).
                    Some(_) => {
                        if let Err(help) = Cli::command().try_get_matches_from(["trainer", name, "--help"]) {
                            help.print().map_err(|e| Error::Internal(e.to_string()))?;
                        }
                    }
                    None => {
                        let names: Vec<String> = cli.get_subcommands().map(|s| s.get_name().to_string()).collect();
                        return Err(Error::Unsupported(format!("no help on `{name}`; ask for `recipe` or one of: {}", names.join(", "))));
                    }
                },
            }
            Ok(())
        }
        Command::Models => {
            for f in registry.families() {
                println!("{:<12} {:<20} {}", f.name(), f.model_types().join(","), f.description());
            }
            Ok(())
        }
        Command::Run { recipe, set, resume, nproc_per_node, master_port, nnodes, node_rank, master_addr } => {
            let loaded = match (&resume, &recipe) {
                (Some(run), given) => crate::run::resume::recipe_for(run, given.as_deref(), &set)?,
                (None, Some(file)) => recipe::load(file, &set)?,
                (None, None) => return Err(Error::Unsupported("trainer run needs a RECIPE, or --resume RUN_DIR to continue a run".into())),
            };
            if let (Some(n), None) = (nproc_per_node, crate::parallel::launch::RankEnv::from_env()?) {
                // This process only launches: the ranks run this same command without the
                // launcher's flags.
                let args = launcher_free_args(std::env::args().skip(1));
                let logs = Path::new(&loaded.recipe.checkpoint.output_dir).join("rank-logs");
                let nodes = crate::parallel::launch::Nodes {
                    count: nnodes,
                    rank: node_rank,
                    master_addr: master_addr.unwrap_or_else(|| "127.0.0.1".into()),
                    master_port,
                };
                crate::parallel::launch::launch(n, &nodes, &args, &logs)?;
                println!("done: {n} ranks finished{}", if nnodes > 1 { format!(" on node {node_rank} of {nnodes}") } else { String::new() });
                return Ok(());
            }
            let plan = plan(&loaded, registry, Fetch::All)?;
            let out = train::run::run(train::run::RunRequest { loaded: &loaded, plan: &plan, resume, stop_after: None })?;
            let last = out.losses.last().copied().unwrap_or(f64::NAN);
            let first = out.losses.first().copied().unwrap_or(f64::NAN);
            println!(
                "done: {} steps, loss {first:.4} -> {last:.4}{}; checkpoint {}",
                out.steps,
                out.eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
                out.last_checkpoint.display()
            );
            Ok(())
        }
        Command::Infer { run_dir, prompt, data, out, system, max_new_tokens, temperature, top_k, top_p, seed, device, base } => {
            let req = infer::InferRequest {
                run: run_dir,
                prompts: prompt,
                data,
                out,
                system,
                max_new_tokens,
                sampling: infer::Sampling { temperature, top_k, top_p, seed },
                device: parse_device(device.as_deref())?,
                base,
            };
            let stdin = std::io::stdin();
            infer::infer(&req, registry, &mut stdin.lock(), &mut std::io::stdout().lock())
        }
        Command::Export {
            run_dir,
            to,
            out,
            dtype,
            max_shard_size,
            overwrite,
            peft_experts,
            test_precision,
            precision_threshold,
            device,
            precision_logits,
        } => {
            let dtype = dtype.map(|d| match d.as_str() {
                "f16" => recipe::DType::F16,
                "f32" => recipe::DType::F32,
                _ => recipe::DType::Bf16,
            });
            if test_precision && !(precision_threshold.is_finite() && precision_threshold >= 0.0) {
                return Err(Error::Unsupported(format!(
                    "--precision-threshold {precision_threshold}: expected a mean |logit diff| >= 0, such as 0.1"
                )));
            }
            let max_shard_bytes = export::shards::parse_size(&max_shard_size)
                .map_err(|e| Error::Unsupported(format!("--max-shard-size: {e}")))?;
            let device = parse_device(device.as_deref())?;
            let req = export::ExportRequest {
                run: run_dir,
                to,
                out,
                dtype,
                max_shard_bytes,
                overwrite,
                peft_experts,
                test_precision: test_precision.then_some(precision_threshold),
                device,
                precision_logits,
            };
            let report = export::export(&req, registry)?;
            for note in &report.notes {
                println!("note: {note}");
            }
            println!(
                "exported {} ({} tensors{}, {}) to {}: {}",
                report.checkpoint.display(),
                report.tensors,
                if report.merged > 0 { format!(", {} adapters merged", report.merged) } else { String::new() },
                format!("{:?}", report.dtype).to_lowercase(),
                report.out.display(),
                report.files.join(", ")
            );
            if let Some(p) = &report.precision {
                println!("{p}");
                if !p.passed() {
                    return Err(Error::Data(format!(
                        "precision check failed: mean |logit diff| on label positions {:.3e} > --precision-threshold {}; the export is in {}",
                        p.label_mean, p.threshold, report.out.display()
                    )));
                }
            }
            Ok(())
        }
    }
}

/// The recipe's model plan, its warnings printed.
/// `--device`'s value, if given.
fn parse_device(device: Option<&str>) -> Result<Option<recipe::Device>> {
    match device {
        None => Ok(None),
        Some("cpu") => Ok(Some(recipe::Device::Cpu)),
        Some("cuda") => Ok(Some(recipe::Device::Cuda)),
        Some("auto") => Ok(Some(recipe::Device::Auto)),
        Some(other) => Err(Error::Unsupported(format!("--device {other}: expected cpu, cuda or auto"))),
    }
}

fn plan(loaded: &LoadedRecipe, registry: &Registry, fetch: Fetch) -> Result<model::ModelPlan> {
    let plan = model::plan(&loaded.recipe.model, registry, fetch)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    Ok(plan)
}

/// Everything `trainer check` prints, in order: what `run` would refuse is an error here too;
/// with `with_data`, the data as the run would train on it and its first `show_rows` rows as
/// the model sees them (also as JSON, `Value::Null` without data).
pub fn check(loaded: &LoadedRecipe, registry: &Registry, with_data: bool, show_rows: usize) -> Result<(String, serde_json::Value)> {
    let r = &loaded.recipe;
    let plan = plan(loaded, registry, Fetch::Config)?;
    let checked = train::preflight::model(loaded, &plan, false)?;
    train::preflight::settings(r)?;
    let tokenizer = if with_data { Some(train::preflight::data(r, &plan)?) } else { None };
    let s = &checked.summary;
    let p = &r.parallel;
    let mut out = String::new();
    out.push_str(&format!("# resolved recipe ({})\n", loaded.source.display()));
    out.push_str(&loaded.to_toml());
    out.push_str("\n# model\n");
    out.push_str(&format!("config            {}\n", plan.config.source));
    out.push_str(&format!(
        "architecture      hidden {}, heads {} (kv {}), head_dim {}, vocab {}, tied embeddings {}\n",
        plan.spec.hidden_size, plan.spec.num_heads, plan.spec.num_kv_heads, plan.spec.head_dim,
        plan.spec.vocab_size, plan.spec.tie_word_embeddings
    ));
    out.push_str(&format!(
        "layout            world {} = data {} x tensor {} x pipeline {} x context {}; expert {}{}\n",
        p.world_size(), p.data, p.tensor, p.pipeline, p.context, p.expert,
        if p.sequence_parallel { ", sequence parallel" } else { "" }
    ));
    out.push_str(&s.to_string());
    for note in &checked.notes {
        out.push_str(&format!("\n{note}"));
    }
    let mut rows = serde_json::Value::Null;
    match tokenizer {
        Some(tok) => {
            out.push_str(&format!("\n\n# data (tokenizer {})\n", tok.display()));
            let (text, json) = train::preflight::dry_run(r, &tok, show_rows)?;
            out.push_str(&text);
            rows = json;
        }
        None => out.push_str("\n\n# data\nnot checked (--no-data): tokenizer, datasets and the dry run skipped"),
    }
    Ok((out, rows))
}

/// The command line without the launcher's own flags (`--nproc-per-node`, `--master-port`, in
/// either `--flag value` or `--flag=value` form): what each rank runs.
fn launcher_free_args(args: impl Iterator<Item = String>) -> Vec<String> {
    const FLAGS: [&str; 5] = ["--nproc-per-node", "--master-port", "--nnodes", "--node-rank", "--master-addr"];
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if FLAGS.contains(&a.as_str()) {
            skip_value = true;
        } else if !FLAGS.iter().any(|f| a.starts_with(&format!("{f}="))) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod launcher_tests {
    #[test]
    fn ranks_run_the_command_without_the_launchers_flags() {
        let args = ["run", "r.toml", "--nproc-per-node", "2", "--set", "a=1", "--master-port=29500", "--nnodes", "2", "--node-rank=1", "--master-addr", "h"].map(String::from);
        assert_eq!(super::launcher_free_args(args.into_iter()), ["run", "r.toml", "--set", "a=1"].map(String::from).to_vec());
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every subcommand and every one of its arguments says what it is in `--help`.
    #[test]
    fn every_flag_and_argument_is_described() {
        let cli = super::Cli::command();
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "`trainer {}` has no description", sub.get_name());
            for arg in sub.get_arguments().filter(|a| a.get_id() != "help") {
                assert!(arg.get_help().is_some(), "`trainer {} {}` has no description in --help", sub.get_name(), arg.get_id());
            }
        }
    }
}
