//! What a checkpoint holds of a trainer, and back: the trained tensors under Hugging Face /
//! peft names with the adapter's config, and the optimizer's moments (with the f32 master copies
//! of parameters stored narrower).
//!
//! A checkpoint holds what one device would, whatever the layout: under tensor parallelism
//! ([`Shards`]) each sharded tensor is gathered from the group before it is written and sliced
//! back out when it is read, so `trainer export` needs no layout and a run can resume on
//! another one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use super::names::{expert_adapter_name, hf_name, module_path};
use crate::model::hf_names::{self, burn_paths};
use super::optimizer::Moments;
use super::trainer::Trainer;
use crate::backend::TrainBackend;
use crate::error::{Error, Result};
use crate::lora::{stacked_factor, ExpertAdapter, EXPERT_PROJECTIONS};
use crate::model::{CausalLm, ModelPlan};
use crate::parallel::regions::{Collective, GroupComm, RegionBackend};
use crate::parallel::tensor::{GradPlacement, TensorParallel};
use crate::recipe::{LoadedRecipe, Recipe, Tuning};
use crate::run::checkpoint::{self as ckpt, NamedTensor, TrainerState};
use crate::run::{self as rundir};

/// How this rank's parameters relate to the one-device model's: slices of them under tensor
/// parallelism (the group and where each parameter is split, [`GradPlacement::sharded`]), and
/// under expert parallelism a block of each MoE layer's experts (the expert group, each rank
/// holding the same number: rank `j`'s local expert `e` is expert `j * local + e`).
#[derive(Debug, Clone)]
pub struct Shards<'a, W: Backend> {
    pub tp: Option<(&'a TensorParallel<W>, &'a GradPlacement)>,
    pub ep: Option<&'a GroupComm<W>>,
}

impl<'a, W: Backend> Shards<'a, W> {
    /// The trainer's, when its layers or experts are split.
    pub fn of<B: TrainBackend<Wire = W>>(trainer: &'a Trainer<B>) -> Option<Self> {
        let s = Shards { tp: trainer.tensor_parallel().zip(trainer.grad_placement()), ep: trainer.expert_parallel() };
        (s.tp.is_some() || s.ep.is_some()).then_some(s)
    }

    /// `(dim, group size)` when `path` is split along `dim` of its stored `[in, out]` layout.
    fn split(&self, path: &str) -> Option<(usize, usize)> {
        let (tp, placement) = self.tp?;
        placement.split_dim(path).map(|d| (d, tp.size()))
    }

    /// This rank's block of the whole tensor of `path`.
    fn slice<B: Backend, const D: usize>(&self, path: &str, whole: Tensor<B, D>) -> Tensor<B, D> {
        match (self.split(path), self.tp) {
            (Some((dim, _)), Some((tp, _))) => {
                let rows = tp.comm.group().block(whole.dims()[dim]);
                whole.narrow(dim, rows.start, rows.len())
            }
            _ => whole,
        }
    }

    /// `(dim, group size)` of `path`'s split in the `[rows, cols]` view [`named_params`] gives
    /// (a 1-D parameter is `[1, n]`, split along its columns; `rank` is the parameter's).
    fn view_split(&self, path: &str, rank: usize) -> Option<(usize, usize)> {
        self.split(path).map(|(dim, size)| (if rank == 1 { 1 } else { dim }, size))
    }

    /// The whole tensor of `path` from every rank's slice `t` (as [`named_params`] views it).
    fn gather<B: RegionBackend<Wire = W>>(&self, path: &str, t: Tensor<B, 2>, rank: usize) -> Result<Tensor<B, 2>> {
        match (self.view_split(path, rank), self.tp) {
            (Some((dim, _)), Some((tp, _))) => Ok(B::collective(t, Collective::AllGather(dim), &tp.comm)?),
            _ => Ok(t),
        }
    }

    /// Under expert parallelism, the copies of expert parameter `path` (local expert `e` of a
    /// layer with `local` experts a rank, this rank's first being `first`) every rank of the
    /// expert group holds, with their experts' global indices; without expert parallelism `t`
    /// alone, as expert `first + e`.
    fn expert_copies<B: RegionBackend<Wire = W>>(&self, t: Tensor<B, 2>, e: usize, local: usize, first: usize) -> Result<Vec<(usize, Tensor<B, 2>)>> {
        let Some(ep) = self.ep else { return Ok(vec![(first + e, t)]) };
        let rows = t.dims()[0];
        let all = self.expert_stack(t)?;
        Ok((0..ep.group().size).map(|j| (j * local + e, all.clone().narrow(0, j * rows, rows))).collect())
    }

    /// A tensor stacked along the local experts (`[local experts, ..]` as [`named_params`]
    /// views it) with every rank's experts, in global order, under expert parallelism; else `t`.
    fn expert_stack<B: RegionBackend<Wire = W>>(&self, t: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        match self.ep {
            Some(ep) => Ok(B::collective(t, Collective::AllGather(0), ep)?),
            None => Ok(t),
        }
    }
}

/// `(layer, expert, projection, factor)` of a Burn path of one expert's own adapter factor, as
/// checkpoints written before expert adapters were stacked key their moments
/// (`layers.3.moe.experts.5.up_proj.lora.lora_a`).
fn per_expert_adapter(path: &str) -> Option<(usize, usize, &str, &str)> {
    let (layer, e) = burn_paths::expert_of(path)?;
    let rest = path.split_once(".moe.experts.")?.1.split_once('.')?.1;
    let (projection, factor) = rest.split_once(".lora.")?;
    (EXPERT_PROJECTIONS.contains(&projection) && matches!(factor, "lora_a" | "lora_b")).then_some((layer, e, projection, factor))
}

/// `(local experts a rank, this rank's first)` of MoE layer `layer`.
fn expert_block<B: TrainBackend>(model: &CausalLm<B>, layer: usize) -> (usize, usize) {
    model.layers.get(layer).and_then(|l| l.moe.as_ref()).map_or((0, 0), |m| (m.experts.len(), m.first_expert))
}

/// Every float parameter of a module with its Burn path, on the host (`keep` picks them).
pub(super) fn named_params<B: TrainBackend, M: Module<B>>(m: &M, keep: &dyn Fn(&str) -> bool) -> Vec<(String, Tensor<B, 2>, usize)> {
    struct Collect<'a, B: Backend> {
        path: Vec<String>,
        keep: &'a dyn Fn(&str) -> bool,
        out: Vec<(String, Tensor<B, 2>, usize)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect<'_, B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let path = self.path.join(".");
            if (self.keep)(&path) {
                // Rank kept aside; 1-D parameters travel as [1, n].
                let t = param.val();
                let dims = t.dims();
                let t2: Tensor<B, 2> = if D == 1 { t.reshape([1, dims[0]]) } else { t.reshape([dims[0], dims[1..].iter().product()]) };
                self.out.push((path, t2, D));
            }
        }
    }
    let mut c = Collect { path: vec![], keep, out: vec![] };
    m.visit(&mut c);
    c.out
}

fn is_lora(path: &str) -> bool {
    path.ends_with(".lora.lora_a") || path.ends_with(".lora.lora_b") || stacked_factor(path).is_some()
}

/// The stacked expert adapter of layer `layer`'s `projection` and its global index of its first
/// local expert.
fn expert_adapter<'m, B: TrainBackend>(model: &'m CausalLm<B>, layer: usize, projection: &str) -> Result<(&'m ExpertAdapter<B>, usize)> {
    let moe = model.layers.get(layer).and_then(|l| l.moe.as_ref());
    moe.and_then(|m| m.expert_lora.get(projection).map(|a| (a, m.first_expert)))
        .ok_or_else(|| Error::Internal(format!("layer {layer} has no stacked {projection} adapter")))
}

/// peft's per-expert tensors of a stacked expert factor, `t` being the stack as
/// [`named_params`] views it (`[local experts, rows * cols]`): every rank's experts under expert
/// parallelism (every rank of the group calls this at once), only the experts the targets
/// adapted.
fn expert_factor_tensors<B: TrainBackend>(model: &CausalLm<B>, path: &str, t: Tensor<B, 2>, shards: Option<&Shards<'_, B::Wire>>) -> Result<Vec<NamedTensor>> {
    let Some((layer, projection, factor)) = stacked_factor(path) else { return Ok(vec![]) };
    let (adapter, first) = expert_adapter(model, layer, projection)?;
    let [_, rows, cols] = if factor == "lora_a" { adapter.lora_a.val().dims() } else { adapter.lora_b.val().dims() };
    let (t, first) = match shards.filter(|s| s.ep.is_some()) {
        Some(s) => (s.expert_stack(t)?, 0),
        None => (t, first),
    };
    let experts = t.dims()[0];
    // peft stores each expert's factor transposed, `[cols, rows]`: one read of the device.
    let data = t.reshape([experts, rows, cols]).swap_dims(1, 2).into_data();
    let width = data.as_bytes().len() / experts.max(1);
    let mut out = Vec::new();
    for (k, bytes) in data.as_bytes().chunks(width.max(1)).enumerate() {
        let g = first + k;
        if adapter.adapted.get(g).copied().unwrap_or(false) {
            out.push(NamedTensor { name: expert_adapter_name(layer, g, projection, factor), data: TensorData::from_bytes_vec(bytes.to_vec(), [cols, rows], data.dtype) });
        }
    }
    Ok(out)
}

/// The peft names of a stacked expert factor's adapted local experts, by local index.
fn expert_factor_names<B: TrainBackend>(model: &CausalLm<B>, path: &str) -> Vec<(usize, String)> {
    let Some((layer, projection, factor)) = stacked_factor(path) else { return vec![] };
    let Ok((adapter, first)) = expert_adapter(model, layer, projection) else { return vec![] };
    let local = adapter.lora_a.val().dims()[0];
    (0..local).filter(|k| adapter.adapted.get(first + k).copied().unwrap_or(false)).map(|k| (k, expert_adapter_name(layer, first + k, projection, factor))).collect()
}

/// Which parameters (by Burn path) `tuning` trains, and so checkpoints hold.
fn is_trained(tuning: Tuning) -> &'static dyn Fn(&str) -> bool {
    match tuning {
        Tuning::Lora => &is_lora,
        Tuning::Full => &|_| true,
    }
}

/// The trained tensors of `model` under their Hugging Face / peft names, whole (gathered from
/// the tensor-parallel group when `shards` says the model holds slices: every rank of the group
/// calls this at once).
fn hf_tensors<B: TrainBackend>(model: &CausalLm<B>, tuning: Tuning, shards: Option<&Shards<'_, B::Wire>>) -> Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    for (path, t, rank) in named_params(model, is_trained(tuning)) {
        if stacked_factor(&path).is_some() {
            out.extend(expert_factor_tensors(model, &path, t, shards)?);
            continue;
        }
        let t = match shards {
            Some(s) => s.gather(&path, t, rank)?,
            None => t,
        };
        let n = hf_name(model, &path);
        let copies = match (shards, burn_paths::expert_of(&path)) {
            (Some(s), Some((layer, e))) => {
                let (local, first) = expert_block(model, layer);
                s.expert_copies(t, e, local, first)?.into_iter().map(|(g, t)| (hf_names::renumber_expert(&n.name, first + e, g), t)).collect()
            }
            _ => vec![(n.name, t)],
        };
        for (name, t) in copies {
            let data = if rank == 1 {
                let d = t.into_data();
                let len = d.shape[1];
                TensorData::from_bytes_vec(d.as_bytes().to_vec(), [len], d.dtype)
            } else {
                ckpt::host_tensor(t, n.transposed)
            };
            out.push(NamedTensor { name, data });
        }
    }
    Ok(out)
}

/// Replace the trainable parameters of `model` with the tensors of a Hugging Face / peft file.
///
/// Under tensor parallelism (`shards`) the file holds the whole tensors and each parameter takes
/// this rank's slice of its sharded ones.
fn load_hf_tensors<B: TrainBackend>(model: CausalLm<B>, file: &Path, tuning: Tuning, shards: Option<&Shards<'_, B::Wire>>) -> Result<CausalLm<B>> {
    let mut tensors = ckpt::read_safetensors(file)?;
    let trained = named_params(&model, is_trained(tuning));
    let names: BTreeMap<String, (String, bool)> = trained
        .iter()
        .filter(|(path, _, _)| stacked_factor(path).is_none())
        .map(|(path, _, _)| {
            let n = hf_name(&model, path);
            (path.clone(), (n.name, n.transposed))
        })
        .collect();
    // Stacked expert factors: each adapted local expert's block from its own peft tensor.
    let stacked: BTreeMap<String, Vec<(usize, String)>> =
        trained.iter().filter(|(path, _, _)| stacked_factor(path).is_some()).map(|(path, _, _)| (path.clone(), expert_factor_names(&model, path))).collect();
    for name in names.values().map(|(n, _)| n).chain(stacked.values().flatten().map(|(_, n)| n)) {
        if !tensors.contains_key(name) {
            let have: Vec<&String> = tensors.keys().take(3).collect();
            return Err(Error::file(
                file,
                format!("tensor `{name}` is missing (the file has {} tensors, e.g. {have:?}); it must hold every trained tensor of this model and recipe", tensors.len()),
            ));
        }
    }
    let wanted: std::collections::BTreeSet<&String> = names.values().map(|(n, _)| n).chain(stacked.values().flatten().map(|(_, n)| n)).collect();
    // Under expert parallelism the file holds every rank's experts; this rank reads its own.
    let others_experts = shards.is_some_and(|s| s.ep.is_some());
    if let Some(extra) = tensors.keys().find(|k| !wanted.contains(k) && !(others_experts && hf_names::is_expert(k))) {
        return Err(Error::file(file, format!("tensor `{extra}` matches no trained parameter of this model and recipe (check lora.targets and the model)")));
    }
    struct Load<'a, W: Backend> {
        shards: Option<&'a Shards<'a, W>>,
        path: Vec<String>,
        names: &'a BTreeMap<String, (String, bool)>,
        stacked: &'a BTreeMap<String, Vec<(usize, String)>>,
        tensors: &'a mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        file: &'a Path,
        error: Option<Error>,
    }
    impl<B: Backend, W: Backend> ModuleMapper<B> for Load<'_, W> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let path = self.path.join(".");
            if let Some(blocks) = self.stacked.get(&path) {
                return self.load_stacked(param, blocks);
            }
            let Some((name, transposed)) = self.names.get(&path) else { return param };
            let Some((shape, data)) = self.tensors.remove(name) else { return param };
            let (id, old, mapper) = param.consume();
            let mut dims = old.dims();
            if let Some((dim, size)) = self.shards.and_then(|s| s.split(&path)) {
                dims[dim] *= size;
            }
            let want: Vec<usize> = if *transposed { dims.iter().rev().copied().collect() } else { dims.to_vec() };
            if shape != want {
                self.error.get_or_insert(Error::file(
                    self.file,
                    format!("tensor `{name}` has shape {shape:?}; this model and recipe need {want:?}"),
                ));
                return Param::from_mapped_value(id, old, mapper);
            }
            let (dtype, grad) = (old.dtype(), old.is_require_grad());
            let device = old.device();
            let t = Tensor::<B, D>::from_data(TensorData::new(data, want), (&device, DType::F32));
            let t = if *transposed { t.swap_dims(0, 1) } else { t };
            let t = match self.shards {
                Some(s) => s.slice(&path, t),
                None => t,
            };
            let t = t.cast(dtype);
            // A new parameter: what was loaded beside it (a joined or stacked weight it was a
            // view of) no longer backs it.
            Param::from_mapped_value(ParamId::new(), if grad { t.require_grad() } else { t }, mapper)
        }
    }
    impl<W: Backend> Load<'_, W> {
        /// A stacked expert factor (`[local experts, rows, cols]`) with each of `blocks`' local
        /// experts read from its peft tensor (`[cols, rows]`); the others keep their values.
        fn load_stacked<B: Backend, const D: usize>(&mut self, param: Param<Tensor<B, D>>, blocks: &[(usize, String)]) -> Param<Tensor<B, D>> {
            let (id, old, mapper) = param.consume();
            let dims = old.dims();
            let (dtype, grad, device) = (old.dtype(), old.is_require_grad(), old.device());
            let [rows, cols] = [dims[1], dims[D - 1]];
            let Ok(mut data) = old.clone().into_data().convert::<f32>().into_vec::<f32>() else { return Param::from_mapped_value(id, old, mapper) };
            for (k, name) in blocks {
                let Some((shape, values)) = self.tensors.remove(name) else { continue };
                if shape != [cols, rows] {
                    self.error.get_or_insert(Error::file(self.file, format!("tensor `{name}` has shape {shape:?}; this model and recipe need {:?}", [cols, rows])));
                    return Param::from_mapped_value(id, old, mapper);
                }
                let block = &mut data[k * rows * cols..(k + 1) * rows * cols];
                for (i, row) in block.chunks_mut(cols).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = values[j * rows + i];
                    }
                }
            }
            let t = Tensor::<B, D>::from_data(TensorData::new(data, dims), (&device, DType::F32)).cast(dtype);
            Param::from_mapped_value(ParamId::new(), if grad { t.require_grad() } else { t }, mapper)
        }
    }
    let mut l = Load { shards, path: vec![], names: &names, stacked: &stacked, tensors: &mut tensors, file, error: None };
    let model = model.map(&mut l);
    match l.error {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// What a checkpoint of a trainer holds, gathered from its tensor-parallel group: the trained
/// tensors, the adapted modules (LoRA) and, when asked for, the optimizer's moments with each
/// parameter's step count.
pub struct Gathered {
    tensors: Vec<NamedTensor>,
    adapted: Vec<String>,
    moments: Option<(Vec<NamedTensor>, BTreeMap<String, u64>)>,
}

impl Gathered {
    /// The trained tensors under their Hugging Face / peft names, as the checkpoint stores them.
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }
}

/// What a checkpoint of `trainer` holds (with the optimizer's moments when `with_optimizer`:
/// `optimizer_state` where the trainer's own is dealt over the ranks,
/// [`Trainer::gather_optimizer_state`]), whole: every rank of the tensor-parallel group calls
/// this at once; one of them writes it ([`write`]).
pub fn gather<B: TrainBackend>(trainer: &Trainer<B>, tuning: Tuning, with_optimizer: bool, optimizer_state: Option<&BTreeMap<String, Moments<B>>>) -> Result<Gathered> {
    let model = trainer.model().valid();
    let shards = Shards::of(trainer);
    let tensors = hf_tensors(&model, tuning, shards.as_ref())?;
    // The experts' adapters are stacked (every rank's experts named by the layer's `adapted`);
    // the other adapted modules hold their own.
    let mut adapted = Vec::new();
    for (layer, moe) in model.layers.iter().enumerate().filter_map(|(i, l)| Some((i, l.moe.as_ref()?))) {
        for projection in EXPERT_PROJECTIONS {
            if let Some(a) = moe.expert_lora.get(projection) {
                let chosen = a.adapted.iter().enumerate().filter(|&(_, &on)| on);
                adapted.extend(chosen.map(|(g, _)| hf_names::expert_projection(layer, g, projection)));
            }
        }
    }
    for (p, _, _) in named_params(&model, &|p| p.ends_with(".lora.lora_a")) {
        adapted.push(module_path(&model, p.trim_end_matches(".lora.lora_a")));
    }
    adapted.sort();
    let moments = match with_optimizer {
        true => {
            let views = param_views(&model);
            let (mut list, mut steps) = (Vec::new(), BTreeMap::new());
            for (path, m) in optimizer_state.unwrap_or(&trainer.optimizer.state) {
                // Experts' moments under their global indices (the Burn path's is local).
                let block = burn_paths::expert_of(path).map(|(layer, e)| (e, expert_block(&model, layer)));
                // A narrower parameter's f32 master copy too: resuming from the bf16 weights
                // alone would lose the updates below bf16's spacing.
                let master = m.master.as_ref().map(|v| ("master", v));
                for (suffix, v) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)].into_iter().chain(master) {
                    let v = match (shards.as_ref(), views.get(path)) {
                        (Some(s), Some(&(view, rank))) => s.gather(path, v.clone().reshape(view), rank)?,
                        _ => v.clone().reshape([1, v.dims()[0]]),
                    };
                    let v = match shards.as_ref() {
                        Some(s) if stacked_factor(path).is_some() => s.expert_stack(v)?,
                        _ => v,
                    };
                    let copies = match (shards.as_ref(), block) {
                        (Some(s), Some((e, (local, first)))) => s.expert_copies(v, e, local, first)?.into_iter().map(|(g, t)| (hf_names::renumber_expert(path, e, g), t)).collect(),
                        _ => vec![(path.clone(), v)],
                    };
                    for (key, t) in copies {
                        steps.insert(key.clone(), m.step);
                        let n = t.shape().num_elements();
                        list.push(NamedTensor { name: format!("{key}.{suffix}"), data: t.reshape([n]).into_data() });
                    }
                }
            }
            Some((list, steps))
        }
        false => None,
    };
    Ok(Gathered { tensors, adapted, moments })
}

/// Write `checkpoint-{state.step}` from what [`gather`] collected.
pub fn write(run_dir: &Path, saved: Gathered, state: &TrainerState, loaded: &LoadedRecipe, plan: &ModelPlan) -> Result<PathBuf> {
    let r = &loaded.recipe;
    ckpt::write_atomically(run_dir, state.step, |dir| {
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        match r.train.tuning {
            Tuning::Lora => {
                ckpt::write_safetensors(&dir.join(ckpt::ADAPTER_WEIGHTS), &saved.tensors, meta)?;
                let cfg = ckpt::adapter_config(&r.lora, r.model.path.as_deref(), &saved.adapted);
                ckpt::write_synced(&dir.join(ckpt::ADAPTER_CONFIG), serde_json::to_string_pretty(&cfg).unwrap_or_default().as_bytes())?;
            }
            Tuning::Full => {
                ckpt::write_safetensors(&dir.join(ckpt::MODEL_WEIGHTS), &saved.tensors, meta)?;
                let cfg = serde_json::Value::Object(plan.config.values.clone());
                ckpt::write_synced(&dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap_or_default().as_bytes())?;
            }
        }
        ckpt::write_synced(&dir.join(ckpt::RECIPE), loaded.to_toml().as_bytes())?;
        let prints = run_dir.join(rundir::BASE_WEIGHTS);
        if prints.is_file() {
            let bytes = std::fs::read(&prints).map_err(|e| Error::file(&prints, format!("cannot read: {e}")))?;
            ckpt::write_synced(&dir.join(rundir::BASE_WEIGHTS), &bytes)?;
        }
        let mut state = state.clone();
        if let Some((moments, steps)) = &saved.moments {
            state.optimizer_steps.extend(steps.iter().map(|(p, s)| (p.clone(), *s)));
            ckpt::write_safetensors(&dir.join(ckpt::OPTIMIZER), moments, BTreeMap::new())?;
            state.has_optimizer = true;
        }
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Internal(e.to_string()))?;
        ckpt::write_synced(&dir.join(ckpt::TRAINER_STATE), json.as_bytes())
    })
}

/// The optimizer's moments of a checkpoint, for `model`'s parameters (this rank's slices under
/// tensor parallelism: `shards`).
pub fn load_optimizer<B: TrainBackend>(
    dir: &Path,
    state: &TrainerState,
    model: &CausalLm<burn::backend::Autodiff<B>>,
    shards: Option<&Shards<'_, B::Wire>>,
    device: &B::Device,
) -> Result<BTreeMap<String, Moments<B>>> {
    let file = dir.join(ckpt::OPTIMIZER);
    let mut tensors = ckpt::read_safetensors(&file)?;
    let views = param_views(model);
    let mut out = BTreeMap::new();
    let expert_parallel = shards.is_some_and(|s| s.ep.is_some());
    // Checkpoints written before expert adapters were stacked keep their moments an expert at
    // a time: each goes to its block of the stack (an expert with none keeps zeros).
    let mut stacked: BTreeMap<String, (Vec<f32>, Vec<f32>, u64)> = BTreeMap::new();
    for (saved, &step) in &state.optimizer_steps {
        let Some((layer, g, projection, factor)) = per_expert_adapter(saved) else { continue };
        let path = burn_paths::expert_lora(layer, projection, factor);
        let (Some(&([local, width], _)), (_, first)) = (views.get(&path), expert_block(model, layer)) else { continue };
        if !(first..first + local).contains(&g) {
            continue;
        }
        let entry = stacked.entry(path).or_insert_with(|| (vec![0.0; local * width], vec![0.0; local * width], 0));
        entry.2 = entry.2.max(step);
        for (suffix, into) in [("exp_avg", &mut entry.0), ("exp_avg_sq", &mut entry.1)] {
            let name = format!("{saved}.{suffix}");
            let (_, data) = tensors.remove(&name).ok_or_else(|| Error::file(&file, format!("tensor `{name}` is missing; the checkpoint is incomplete")))?;
            let block = &mut into[(g - first) * width..(g - first + 1) * width];
            if data.len() != width {
                return Err(Error::file(&file, format!("tensor `{name}` has {} values; an expert of `{saved}` needs {width}", data.len())));
            }
            block.copy_from_slice(&data);
        }
    }
    for (path, (exp_avg, exp_avg_sq, step)) in stacked {
        let flat = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (device, DType::F32))
        };
        out.insert(path, Moments { exp_avg: flat(exp_avg), exp_avg_sq: flat(exp_avg_sq), step, master: None });
    }
    for (saved, &step) in &state.optimizer_steps {
        if per_expert_adapter(saved).is_some() {
            continue;
        }
        // Under expert parallelism the file holds every rank's experts under their global
        // indices: this rank takes its block, under its local paths.
        let path = match burn_paths::expert_of(saved) {
            Some((layer, g)) if expert_parallel => {
                let (local, first) = expert_block(model, layer);
                if !(first..first + local).contains(&g) {
                    continue;
                }
                hf_names::renumber_expert(saved, g, g - first)
            }
            _ => saved.clone(),
        };
        let path = &path;
        // A master copy is saved for parameters stored below f32 (none on CPU).
        let has_master = tensors.contains_key(&format!("{saved}.master"));
        let mut take = |suffix: &str| -> Result<Tensor<B, 1>> {
            let name = format!("{saved}.{suffix}");
            let (_, data) = tensors
                .remove(&name)
                .ok_or_else(|| Error::file(&file, format!("tensor `{name}` is missing; the checkpoint is incomplete")))?;
            let n = data.len();
            let flat = Tensor::<B, 1>::from_data(TensorData::new(data, [n]), (device, DType::F32));
            let Some((s, &(view, rank))) = shards.zip(views.get(path)) else { return Ok(flat) };
            if let (Some(ep), Some(_)) = (s.ep, stacked_factor(path)) {
                // Every rank's experts' moments, in global order: this rank's block.
                let [local, width] = view;
                if n != ep.group().size * local * width {
                    return Err(Error::file(&file, format!("tensor `{name}` has {n} values; parameter `{path}` of this model needs {}", ep.group().size * local * width)));
                }
                let first = ep.group().rank * local;
                return Ok(flat.reshape([n / width, width]).narrow(0, first, local).reshape([local * width]));
            }
            let Some((dim, size)) = s.view_split(path, rank) else { return Ok(flat) };
            let mut whole = view;
            whole[dim] *= size;
            if whole[0] * whole[1] != n {
                return Err(Error::file(&file, format!("tensor `{name}` has {n} values; parameter `{path}` of this model needs {}", whole[0] * whole[1])));
            }
            let rows = s.tp.map_or(0..whole[dim], |(tp, _)| tp.comm.group().block(whole[dim]));
            Ok(flat.reshape(whole).narrow(dim, rows.start, rows.len()).reshape([view[0] * view[1]]))
        };
        let (exp_avg, exp_avg_sq) = (take("exp_avg")?, take("exp_avg_sq")?);
        let master = if has_master { Some(take("master")?) } else { None };
        out.insert(path.clone(), Moments { exp_avg, exp_avg_sq, step, master });
    }
    Ok(out)
}

/// Every float parameter's `[rows, cols]` view ([`named_params`]) and rank, by Burn path.
fn param_views<B: TrainBackend, M: Module<B>>(m: &M) -> BTreeMap<String, ([usize; 2], usize)> {
    named_params(m, &|_| true).into_iter().map(|(p, t, rank)| (p, (t.dims(), rank))).collect()
}

/// `model` as the run in `dir` trained it: the recipe's LoRA adapters attached (unmerged) when
/// it trained adapters, then the checkpoint's trained tensors loaded ([`load_trained`]).
pub fn with_trained<B: TrainBackend>(model: CausalLm<B>, dir: &Path, r: &Recipe) -> Result<CausalLm<B>> {
    let model = match r.train.tuning {
        Tuning::Lora => {
            let targets = crate::lora::LoraTargets::parse(&r.lora.targets)?;
            let cfg = crate::lora::LoraConfig { rank: r.lora.rank, scale: r.lora.scale(), dropout: r.lora.dropout, seed: r.train.seed };
            crate::lora::apply(model, &targets, &cfg)?.0
        }
        Tuning::Full => model,
    };
    load_trained(model, dir, r)
}

/// Load the trained tensors of a checkpoint or adapter folder into `model`.
pub fn load_trained<B: TrainBackend>(model: CausalLm<B>, dir: &Path, r: &Recipe) -> Result<CausalLm<B>> {
    load_trained_sharded(model, dir, r, None)
}

/// [`load_trained`] into a model that holds this rank's slices (`shards`) of the checkpoint's
/// tensors.
pub fn load_trained_sharded<B: TrainBackend>(model: CausalLm<B>, dir: &Path, r: &Recipe, shards: Option<&Shards<'_, B::Wire>>) -> Result<CausalLm<B>> {
    let (file, what) = match r.train.tuning {
        Tuning::Lora => (dir.join(ckpt::ADAPTER_WEIGHTS), "an adapter (train.tuning = \"lora\")"),
        Tuning::Full => (dir.join(ckpt::MODEL_WEIGHTS), "full weights (train.tuning = \"full\")"),
    };
    if !file.is_file() {
        return Err(Error::file(&file, format!("no such file: the recipe trains {what}, so the checkpoint must hold it")));
    }
    if r.train.tuning == Tuning::Lora {
        ckpt::check_adapter_config(dir, &r.lora)?;
    }
    load_hf_tensors(model, &file, r.train.tuning, shards)
}
