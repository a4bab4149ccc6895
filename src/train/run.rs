//! `trainer run`: data, model, adapters, the step loop, evaluation, checkpoints and resume, as
//! a recipe describes them.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use crate::backend::TrainBackend;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoints::{self, load_optimizer, load_trained_sharded, Shards};
use super::interrupt;
use super::metrics::Metrics;
use super::optimizer::{AdamW, AdamWConfig};
use super::trainer::Trainer;
use super::{recompute, LrSchedule};
use crate::backend::{self, BackendJob};
use crate::data::{self, Batch};
use crate::error::{Error, Result};
use crate::lora::{self, LoraConfig, LoraTargets};
use crate::model::{self, ModelPlan};
use crate::parallel::launch::{self, RankEnv};
use crate::parallel::mesh::{Axis, DeviceMesh};
use crate::parallel::tensor::TensorParallel;
use crate::parallel::watchdog;
use crate::recipe::{self, LoadedRecipe, Recipe, Stop, Tuning};
use crate::run::checkpoint::{self as ckpt, ResumeFrom, TrainerState};
use crate::run::resume::{self, Placement};
use crate::run::{self as rundir, RunLock};

/// A training run to start or continue.
pub struct RunRequest<'a> {
    pub loaded: &'a LoadedRecipe,
    pub plan: &'a ModelPlan,
    /// `--resume DIR`: continue that run exactly (wins over `checkpoint.resume`).
    pub resume: Option<PathBuf>,
    /// Stop after this step as if killed right after its checkpoint (tests of resume).
    pub stop_after: Option<usize>,
}

/// What a finished run left behind.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    pub last_checkpoint: PathBuf,
    /// Steps completed (of `total_steps`).
    pub steps: usize,
    pub total_steps: usize,
    /// Loss of every step this process ran, in order.
    pub losses: Vec<f64>,
    pub eval_loss: Option<f64>,
}

pub fn run(req: RunRequest<'_>) -> Result<RunOutcome> {
    let r = &req.loaded.recipe;
    backend::dispatch(r.device, r.model.dtype, TrainJob { req })
}

struct TrainJob<'a> {
    req: RunRequest<'a>,
}

impl BackendJob for TrainJob<'_> {
    type Output = RunOutcome;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<RunOutcome> {
        let out = train::<B>(&self.req, device.clone());
        // Let queued device work finish before the process exits: CubeCL's CUDA threads panic
        // if the driver shuts down under them.
        B::sync(&device).map_err(|e| Error::Internal(format!("device sync failed: {e:?}")))?;
        out
    }
}

/// Which recipe features this build cannot train with, as one sentence each; and whether the
/// ranks started (`ranks`, from the launcher's variables) are the ones the layout names.
fn check_supported(r: &Recipe, ranks: Option<&RankEnv>) -> Result<()> {
    let p = &r.parallel;
    if p.context > 1 {
        return Err(Error::Unsupported(format!(
            "parallel.context = {}: this build splits a job over data-, tensor- (with sequence) and expert-parallel \
             ranks; context parallelism is not in the model yet: set it to 1",
            p.context
        )));
    }
    let world = p.world_size();
    let sizes = format!("parallel.data x parallel.tensor = {} x {}", p.data, p.tensor);
    match ranks {
        None if world > 1 => {
            return Err(Error::Parallel(format!(
                "the recipe's layout needs {world} ranks ({sizes}): start it with `trainer run RECIPE \
                 --nproc-per-node {world}`, or from a launcher that sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT"
            )))
        }
        Some(env) if env.world != world => {
            return Err(Error::Parallel(format!(
                "{} ranks were started but the recipe's layout needs {world} ({sizes}); start {world} ranks \
                 or change parallel.data / parallel.tensor so that their product is {}",
                env.world, env.world
            )))
        }
        _ => {}
    }
    if r.train.tuning == Tuning::Lora && !r.lora.modules_to_save.is_empty() {
        return Err(Error::Unsupported(format!(
            "lora.modules_to_save = {:?}: training whole modules beside the adapters is not supported yet; \
             remove it, or use train.tuning = \"full\"",
            r.lora.modules_to_save
        )));
    }
    Ok(())
}

/// The order micro batches are visited in during `epoch`: a permutation seeded by the run's
/// seed and the epoch, so any step's batches are known without replaying the run.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xba7c_0000 ^ (epoch as u64).wrapping_mul(0x9e37_79b9)));
    order
}

fn train<B: TrainBackend>(req: &RunRequest<'_>, device: B::Device) -> Result<RunOutcome> {
    let loaded = req.loaded;
    let r = &loaded.recipe;
    let plan = req.plan;
    let ranks = RankEnv::from_env()?;
    check_supported(r, ranks.as_ref())?;
    // Rank 0 writes the run folder, the metrics and the checkpoints; every rank trains.
    let rank = ranks.as_ref().map_or(0, |e| e.rank);
    let writer = rank == 0;
    let mesh = DeviceMesh::from_recipe(&r.parallel).map_err(|e| Error::Parallel(format!("[parallel]: {e}")))?;
    let layout = mesh.layout(rank);
    let dp_size = layout.data.size;
    // Everything checkable, before any folder or weight.
    for note in super::preflight::model(loaded, plan, true)?.notes {
        println!("check: {note}");
    }
    super::preflight::settings(r)?;
    let tok = super::preflight::data(r, plan)?;
    // The ranks meet before any folder or weight: a rank with another recipe is refused here.
    let world = match &ranks {
        Some(env) => {
            println!("rank {} of {}: joining the job at {}:{}", env.rank, env.world, env.master_addr, env.master_port);
            let world = env.connect(&launch::fingerprint(&loaded.to_toml()))?;
            world.watch(move |failure| watchdog::end_rank(rank, &failure, B::abort_communicators));
            Some(world)
        }
        None => None,
    };

    // Where to start from. A run continued exactly takes the recipe it was trained with: only
    // keys that keep it exact may differ (run::resume), and its folder is locked first.
    let resume = match (&req.resume, &r.checkpoint.resume) {
        (Some(p), _) => Some(ckpt::resolve_resume(p, false)?),
        (None, Some(p)) => Some(ckpt::resolve_resume(Path::new(p), r.train.finetune)?),
        (None, None) => None,
    };
    let mut changes = Vec::new();
    let mut placement = None;
    let mut lock = None;
    if let Some(ResumeFrom::Checkpoint { dir, state }) = &resume {
        let saved_at = dir.join(rundir::RECIPE);
        if saved_at.is_file() {
            let saved = recipe::load(&saved_at, &[])?;
            changes = resume::changes(&saved.recipe, r, dir)?;
        }
        let p = resume::placement(dir, state.step)?;
        if let (Placement::Continue { run_dir }, true) = (&p, writer) {
            lock = Some(RunLock::acquire(run_dir)?);
            for gone in ckpt::clear_leftovers(run_dir)? {
                println!("removed {}, left by an interrupted checkpoint write", gone.display());
            }
        }
        placement = Some(p);
    }

    // Data first: a bad row should not wait for the weights.
    let prepared = data::prepare(r, &tok)?;
    for note in &prepared.notes {
        println!("data: {note}");
    }
    println!(
        "data: {} training rows, {} validation rows ({} bad rows skipped, {} too long dropped){}",
        prepared.train.len(),
        prepared.val.len(),
        prepared.skipped_bad_rows,
        prepared.dropped_too_long,
        if prepared.cache_hit { "; tokens from the cache" } else { "" }
    );
    let micro = r.train.micro_batch_size;
    let batches = prepared.train_batches(micro);
    let val_batches = prepared.val_batches(micro);
    // Micro batches per rank and step, and over all data-parallel ranks.
    let accum = r.gradient_accumulation_steps();
    let per_step = accum * dp_size;
    let steps_per_epoch = batches.len() / per_step;
    if steps_per_epoch == 0 {
        return Err(Error::data(format!(
            "{} micro batches of training data, but one optimizer step needs {per_step} (train.global_batch_size / \
             train.micro_batch_size); add data or lower train.global_batch_size",
            batches.len()
        )));
    }
    let total_steps = match r.train.stop() {
        Stop::Steps(n) => n,
        Stop::Epochs(e) => e * steps_per_epoch,
    };
    if r.train.eval_interval.is_some() && val_batches.is_empty() {
        return Err(Error::data("train.eval_interval is set but there are no validation rows; set data.val_split > 0"));
    }

    // The model and what is trained.
    // This rank's process groups: the data-parallel replicas and the tensor-parallel split,
    // each with the backend's communicator (NCCL on CUDA, TCP on CPU). A launched job of one
    // rank keeps its data group of one, so `--nproc-per-node 1` runs the collectives' path.
    // Every rank forms its groups in the same order (NCCL's init waits for the group's members).
    let (data_comm, tensor_parallel, expert_parallel) = match &world {
        Some(w) => {
            let group = |axis: Axis, tag: &str| B::group_communicator(w.split(tag, &mesh.group(rank, axis))?, &device);
            let data = group(Axis::Data, "data")?;
            let tensor = match layout.tensor.size > 1 {
                true => Some(TensorParallel::new(group(Axis::Tensor, "tensor")?, r.parallel.sequence_parallel)),
                false => None,
            };
            let expert = match layout.expert.size > 1 {
                true => Some((group(Axis::Expert, "expert")?, group(Axis::ExpertData, "expert-data")?)),
                false => None,
            };
            println!(
                "rank {rank} of {}: {} groups formed: data {} of {}, tensor {} of {}, expert {} of {}",
                mesh.world(),
                B::communicator_kind(),
                layout.data.rank,
                layout.data.size,
                layout.tensor.rank,
                layout.tensor.size,
                layout.expert.rank,
                layout.expert.size
            );
            (Some(data), tensor, expert)
        }
        None => (None, None, None),
    };
    let mut model = model::build::<Autodiff<B>>(plan, &r.model, layout, &device)?;
    if r.train.tuning == Tuning::Lora {
        let targets = LoraTargets::parse(&r.lora.targets)?;
        let cfg = LoraConfig { rank: r.lora.rank, scale: r.lora.scale(), dropout: r.lora.dropout, seed: r.train.seed };
        let (m, n) = lora::apply(model, &targets, &cfg)?;
        model = m;
        println!("lora: {n} adapted linear layers, rank {}, alpha {}", r.lora.rank, r.lora.alpha);
    }
    // A checkpoint holds the one-device tensors: this rank takes its slices.
    let grad_placement = tensor_parallel.as_ref().map(|tp| model.tensor_parallel_placement(tp.sequence_parallel));
    let shards = Shards { tp: tensor_parallel.as_ref().zip(grad_placement.as_ref()), ep: expert_parallel.as_ref().map(|(ep, _)| ep) };
    let shards = (shards.tp.is_some() || shards.ep.is_some()).then_some(shards);
    let (start_step, mut state, optimizer_state) = match &resume {
        Some(ResumeFrom::Checkpoint { dir, state }) => {
            model = load_trained_sharded(model, dir, r, shards.as_ref())?;
            let moments = load_optimizer::<B>(dir, state, &model, shards.as_ref(), &device)?;
            (state.step, state.clone(), moments)
        }
        Some(ResumeFrom::Weights { dir }) => {
            model = load_trained_sharded(model, dir, r, shards.as_ref())?;
            println!("starting from the weights in {}", dir.display());
            (0, fresh_state(r, total_steps), BTreeMap::new())
        }
        None => (0, fresh_state(r, total_steps), BTreeMap::new()),
    };
    if state.seed != r.train.seed {
        return Err(Error::Data(format!(
            "the checkpoint was trained with train.seed = {}, the recipe says {}: a resumed run must keep the seed",
            state.seed, r.train.seed
        )));
    }
    state.total_steps = total_steps;
    if start_step >= total_steps {
        return Err(Error::Data(format!(
            "the checkpoint is at step {start_step} and the recipe stops at step {total_steps}: nothing left to train; \
             raise train.max_steps (on resume: --set train.max_steps=N)"
        )));
    }

    // Everything checkable has passed: now the run folder (rank 0's, named to the others).
    let prints = base_prints(r, plan, resume.as_ref())?;
    let run_dir = match (&resume, placement) {
        _ if !writer => PathBuf::new(),
        (Some(ResumeFrom::Checkpoint { dir, .. }), Some(Placement::Continue { run_dir })) => {
            println!("resuming {} at step {start_step}", dir.display());
            if !changes.is_empty() {
                // The run's record follows what it now trains with.
                rundir::write_replacing(&run_dir.join(rundir::RECIPE), loaded.to_toml().as_bytes())?;
            }
            run_dir
        }
        (Some(ResumeFrom::Checkpoint { dir, .. }), Some(Placement::Branch { from_run, later })) => {
            let name = format!("{}-from-step-{start_step}", from_run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into()));
            let parent = from_run.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(&r.checkpoint.output_dir));
            let run_dir = rundir::new_run_dir(&parent, &name)?;
            lock = Some(RunLock::acquire(&run_dir)?);
            start_folder(&run_dir, loaded, prints.as_deref())?;
            let record = serde_json::json!({ "run": from_run, "checkpoint": dir, "step": start_step, "later_checkpoints_left_in_place": later });
            ckpt::write_synced(&run_dir.join(rundir::BRANCHED_FROM), serde_json::to_string_pretty(&record).unwrap_or_default().as_bytes())?;
            copy_metrics_through(&from_run.join(&r.logging.metrics_file), &run_dir.join(&r.logging.metrics_file), start_step)?;
            println!(
                "{} is older than the run's newest checkpoint{}: continuing at step {start_step} in a new run folder, {}, \
                 so they stay as they are",
                dir.display(),
                later.last().map(|s| format!(" (checkpoint-{s})")).unwrap_or_default(),
                run_dir.display()
            );
            run_dir
        }
        _ => {
            let stem = loaded.source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
            let run_dir = rundir::new_run_dir(Path::new(&r.checkpoint.output_dir), &format!("{stem}-{}", rundir::utc_stamp()))?;
            lock = Some(RunLock::acquire(&run_dir)?);
            start_folder(&run_dir, loaded, prints.as_deref())?;
            run_dir
        }
    };
    let _lock = lock;
    let run_dir = match &world {
        Some(comm) => {
            let name = comm.broadcast_bytes(run_dir.to_string_lossy().as_bytes(), 0)?;
            PathBuf::from(String::from_utf8_lossy(&name).into_owned())
        }
        None => run_dir,
    };
    for c in &changes {
        println!("resume: {c}");
    }

    let mut optimizer = AdamW::new(AdamWConfig::from(&r.optimizer));
    optimizer.state = optimizer_state;
    let schedule = LrSchedule::new(&r.optimizer, &r.schedule, total_steps);
    let groups: Vec<Range<usize>> = recompute::groups(&r.train.recompute, model.layers.len())?;
    let mut trainer = Trainer::new(model, optimizer, schedule, r.train.gradient_clip, r.train.seed, groups, device);
    trainer.fused_cross_entropy = r.train.fused_cross_entropy;
    trainer.router_aux_loss_coef = super::preflight::router_aux_loss_coef(r, &plan.spec)?;
    trainer.data_parallel = data_comm;
    if let Some((ep, expert_data)) = expert_parallel {
        trainer.set_expert_parallel(ep, expert_data);
    }
    if let Some(tp) = tensor_parallel {
        trainer.set_tensor_parallel(tp);
    }
    if r.parallel.distributed_optimizer {
        trainer.set_distributed_optimizer();
        if let Some(shares) = trainer.optimizer_shares() {
            let (least, most) = (shares.iter().min().unwrap_or(&0), shares.iter().max().unwrap_or(&0));
            println!("distributed optimizer: the trained weights' optimizer state dealt over {} data-parallel ranks, {least} to {most} weights' each", shares.len());
        }
    }
    // Micro batches go to data-parallel replicas; the ranks of one tensor group share theirs.
    let data_rank = layout.data.rank;
    trainer.micro_batch_place = (data_rank, dp_size);
    // The ranks that evaluate and gather checkpoints with rank 0 (who writes them): data
    // replica 0 (rank 0's tensor group), and under expert parallelism every rank (tokens travel
    // to all experts, and each rank holds its own).
    let with_rank0 = data_rank == 0 || layout.expert.size > 1;
    let mut metrics = match writer {
        true => Some(Metrics::open(&run_dir.join(&r.logging.metrics_file), start_step, total_steps, r.logging.interval, r.logging.progress_bar, r.logging.tensorboard)?),
        false => None,
    };
    if let Some(m) = metrics.as_mut() {
        m.watch_device(crate::backend::device_monitor(r.device));
    }
    let ranks_note = match (dp_size, layout.tensor.size) {
        (1, 1) => String::new(),
        (d, 1) => format!(" on each of {d} data-parallel ranks"),
        (1, t) => format!(", layers split over {t} tensor-parallel ranks{}", if r.parallel.sequence_parallel { " with sequence parallelism" } else { "" }),
        (d, t) => format!(" on each of {d} data-parallel replicas of {t} tensor-parallel ranks{}", if r.parallel.sequence_parallel { " with sequence parallelism" } else { "" }),
    } + &match layout.expert.size {
        1 => String::new(),
        e => format!(", experts split over {e} expert-parallel ranks"),
    };
    let note = format!(
        "training {total_steps} steps ({steps_per_epoch} per epoch, {accum} micro batches of {micro} each{ranks_note}) into {}",
        run_dir.display()
    );
    match metrics.as_mut() {
        Some(m) => m.note(&note),
        None => println!("rank {rank}: {note}"),
    }

    let stop_at = req.stop_after.unwrap_or(total_steps).min(total_steps);
    let mut losses = Vec::new();
    let mut eval_loss = None;
    // The checkpoint holding the newest step: the resumed one until this process saves.
    let mut last_checkpoint = match &resume {
        Some(ResumeFrom::Checkpoint { dir, .. }) => Some((start_step, dir.clone())),
        _ => None,
    };
    let mut order = (usize::MAX, Vec::new());
    let armed = interrupt::arm();
    for step in start_step + 1..=stop_at {
        let epoch = (step - 1) / steps_per_epoch;
        if order.0 != epoch {
            order = (epoch, epoch_order(batches.len(), r.train.seed, epoch));
        }
        let first = ((step - 1) % steps_per_epoch) * per_step;
        // This rank's share of the step's micro batches: every `dp_size`-th.
        let step_batches: Vec<Batch> =
            order.1[first..first + per_step].iter().skip(data_rank).step_by(dp_size).map(|&i| batches[i].clone()).collect();
        let stats = trainer.step(step, &step_batches)?;
        if !stats.loss.is_finite() {
            return Err(Error::Data(format!(
                "step {step}: the loss is {} (lr {:.3e}); lower optimizer.lr or check the data",
                stats.loss, stats.lr
            )));
        }
        losses.push(stats.loss);
        state.step = step;
        state.micro_batches_consumed = step * per_step;
        state.tokens_seen += stats.tokens as u64;
        state.loss = stats.loss;
        if let Some(m) = metrics.as_mut() {
            m.step(step, step as f64 / steps_per_epoch as f64, &stats)?;
        }
        let eval_now = r.train.eval_interval.is_some_and(|n| step % n == 0) || (step == total_steps && !val_batches.is_empty());
        if eval_now && with_rank0 {
            let (loss, tokens) = trainer.evaluate(&val_batches)?;
            if let Some(m) = metrics.as_mut() {
                m.eval(step, loss, tokens)?;
                m.draw_charts();
            }
            eval_loss = Some(loss);
        }
        // A stop asked of any rank stops them all at this step.
        let signal = match &world {
            Some(w) => {
                let asked = interrupt::requested().map_or(0, |s| s as usize + 1);
                w.all_to_all_counts(&vec![asked; mesh.world()])?.into_iter().max().filter(|&v| v > 0).map(|v| (v - 1) as i32)
            }
            None => interrupt::requested(),
        };
        let save_now = r.checkpoint.save_interval.is_some_and(|n| step % n == 0) || step == total_steps || signal.is_some();
        let with_optimizer = r.checkpoint.save_optimizer || signal.is_some();
        let gathered = match save_now {
            true => gather_checkpoint(&trainer, r.train.tuning, with_optimizer, with_rank0)?,
            false => None,
        };
        if let (Some(saved), Some(m)) = (gathered, metrics.as_mut()) {
            let dir = checkpoints::write(&run_dir, saved, &state, loaded, plan)?;
            m.note(&format!("saved {}", dir.display()));
            last_checkpoint = Some((step, dir));
            if let Some(keep) = r.checkpoint.save_total_limit {
                for gone in ckpt::prune(&run_dir, keep)? {
                    m.note(&format!("removed {} (checkpoint.save_total_limit = {keep})", gone.display()));
                }
            }
        } else if save_now {
            last_checkpoint = Some((step, ckpt::checkpoint_dir(&run_dir, step)));
        }
        if let Some(signal) = signal {
            // Every rank stops here: leaving is no failure now.
            if let Some(w) = &world {
                w.goodbye();
            }
            let resume_with = format!("trainer run --resume {}", run_dir.display());
            return Err(Error::Interrupted {
                signal,
                message: format!("interrupted at step {step} of {total_steps}: saved {}; continue with `{resume_with}`", ckpt::checkpoint_dir(&run_dir, step).display()),
            });
        }
    }
    drop(armed);
    if let Some(m) = metrics.as_mut() {
        m.draw_charts();
    }
    // The last step always saves; only a stop requested before the end (tests of resume)
    // leaves steps after the newest checkpoint, as a kill would.
    let last_checkpoint = match last_checkpoint {
        Some((_, dir)) => dir,
        None => match (gather_checkpoint(&trainer, r.train.tuning, r.checkpoint.save_optimizer, with_rank0)?, writer) {
            (Some(saved), true) => checkpoints::write(&run_dir, saved, &state, loaded, plan)?,
            _ => ckpt::checkpoint_dir(&run_dir, state.step),
        },
    };
    if let Some(w) = &world {
        w.goodbye();
    }
    Ok(RunOutcome { run_dir, last_checkpoint, steps: state.step, total_steps, losses, eval_loss })
}

/// What a checkpoint holds, on the ranks that gather it with rank 0 (`with_rank0`); every rank
/// calls this at once, since a distributed optimizer's state comes from every data-parallel rank.
fn gather_checkpoint<B: TrainBackend>(trainer: &Trainer<B>, tuning: Tuning, with_optimizer: bool, with_rank0: bool) -> Result<Option<checkpoints::Gathered>> {
    let optimizer_state = match with_optimizer {
        true => trainer.gather_optimizer_state()?,
        false => None,
    };
    match with_rank0 {
        true => Ok(Some(checkpoints::gather(trainer, tuning, with_optimizer, optimizer_state.as_ref())?)),
        false => Ok(None),
    }
}

/// The base-weight fingerprints a new run folder records: the resumed checkpoint's (or its
/// run's) when there is one, else hashed from the base the plan reads (pretrained bases only).
fn base_prints(r: &Recipe, plan: &ModelPlan, resume: Option<&ResumeFrom>) -> Result<Option<Vec<u8>>> {
    if let Some(ResumeFrom::Checkpoint { dir, .. }) = resume {
        if let Some((file, _)) = rundir::saved_fingerprints(dir)? {
            return std::fs::read(&file).map(Some).map_err(|e| Error::file(&file, format!("cannot read: {e}")));
        }
    }
    match rundir::base_fingerprints(r, plan)? {
        Some(prints) => Ok(Some(serde_json::to_vec(&prints).map_err(|e| Error::Internal(e.to_string()))?)),
        None => Ok(None),
    }
}

/// A new run folder's first files: its recipe and what its base weights were.
fn start_folder(run_dir: &Path, loaded: &LoadedRecipe, prints: Option<&[u8]>) -> Result<()> {
    ckpt::write_synced(&run_dir.join(rundir::RECIPE), loaded.to_toml().as_bytes())?;
    if let Some(bytes) = prints {
        // What the base weights were, so export can tell when they changed under the run.
        ckpt::write_synced(&run_dir.join(rundir::BASE_WEIGHTS), bytes)?;
    }
    Ok(())
}

/// A branch's metrics start with the original run's lines up to the step it branched at.
fn copy_metrics_through(from: &Path, to: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(from) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step")?.as_u64()).is_some_and(|s| s as usize <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    ckpt::write_synced(to, kept.as_bytes())
}

fn fresh_state(r: &Recipe, total_steps: usize) -> TrainerState {
    TrainerState {
        step: 0,
        total_steps,
        micro_batches_consumed: 0,
        seed: r.train.seed,
        tokens_seen: 0,
        loss: f64::NAN,
        optimizer_steps: BTreeMap::new(),
        has_optimizer: false,
        rng: "dropout streams seeded by (train.seed, step, micro batch); batch order by (train.seed, epoch)".into(),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(10, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 1, 0));
        assert_ne!(a, epoch_order(10, 1, 1));
        assert_ne!(a, epoch_order(10, 2, 0));
    }
}
