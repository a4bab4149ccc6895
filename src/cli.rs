//! The `trainer` command line: `check`, `models`, `run`, `export`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::backend;
use crate::error::{Error, Result};
use crate::model::{self, hub::Fetch, summary, Registry};
use crate::recipe::{self, LoadedRecipe, Tuning};
use crate::train;

#[derive(Parser, Debug)]
#[command(name = "trainer", version, about = "Declarative LLM fine-tuning: recipes compiled into Burn models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a recipe and show what it builds: the resolved recipe, the model, its shards
    /// and memory per rank. Touches no weights.
    Check {
        recipe: PathBuf,
        /// Override a recipe key, e.g. `--set optimizer.lr=2e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Train as the recipe says: checkpoints and metrics go to a run folder under
    /// `checkpoint.output_dir`.
    Run {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue a run exactly where it stopped: its run folder or a checkpoint-N in it.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
    },
    /// Turn a run into Hugging Face / peft artifacts.
    Export {
        run_dir: PathBuf,
    },
    /// List the registered model families.
    Models,
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
    let cli = Cli::parse();
    match execute(cli, &registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub fn execute(cli: Cli, registry: &Registry) -> Result<()> {
    match cli.command {
        Command::Check { recipe, set } => {
            let loaded = recipe::load(&recipe, &set)?;
            let report = check(&loaded, registry)?;
            println!("{report}");
            Ok(())
        }
        Command::Models => {
            for f in registry.families() {
                println!("{:<12} {:<20} {}", f.name(), f.model_types().join(","), f.description());
            }
            Ok(())
        }
        Command::Run { recipe, set, resume } => {
            let loaded = recipe::load(&recipe, &set)?;
            let plan = model::plan(&loaded.recipe.model, registry, Fetch::All)?;
            model::check_layout(&plan.spec, &loaded.recipe.parallel)?;
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
        Command::Export { run_dir } => Err(Error::Unsupported(format!(
            "{}: export (merge LoRA, write Hugging Face / peft folders) is not in this build of trainer yet",
            run_dir.display()
        ))),
    }
}

/// Everything `trainer check` prints, in order.
pub fn check(loaded: &LoadedRecipe, registry: &Registry) -> Result<String> {
    let r = &loaded.recipe;
    let plan = model::plan(&r.model, registry, Fetch::Config)?;
    model::check_layout(&plan.spec, &r.parallel)?;
    let lora = match r.train.tuning {
        Tuning::Lora => Some((r.lora.rank, crate::lora::LoraTargets::parse(&r.lora.targets)?)),
        Tuning::Full => None,
    };
    let on_gpu = backend::resolve(r.device) == recipe::Device::Cuda;
    let run = summary::RunShape {
        tensor: r.parallel.tensor,
        expert: r.parallel.expert,
        context: r.parallel.context,
        sequence_parallel: r.parallel.sequence_parallel,
        micro_batch: r.train.micro_batch_size,
        seq_len: r.train.max_length,
        lora,
        weight_bytes: if on_gpu || r.device == recipe::Device::Cuda { r.model.dtype.bytes() } else { 4 },
        recompute: r.train.recompute.granularity != recipe::RecomputeGranularity::None,
        fused_cross_entropy: r.train.fused_cross_entropy,
    };
    let s = summary::ModelSummary::new(&plan.spec, &run)?;
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
    Ok(out)
}
