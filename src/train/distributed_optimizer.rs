//! Megatron's distributed optimizer (ZeRO-1 and -2) over a data-parallel group, by parameter:
//! each trained parameter's optimizer state (moments, and the f32 master copy of a parameter
//! stored narrower) lives on one rank of the group, its owner. A step reduce-scatters the
//! gradients so that each owner alone receives its parameters' sums, the owners update them,
//! and every rank all-gathers the updated values: the same update as every rank applying it,
//! in 1/size of the optimizer's memory.
//!
//! Parameters are dealt whole, largest first, each to the rank holding the fewest elements so
//! far, as torch's `ZeroRedundancyOptimizer` partitions them (Megatron cuts one flat buffer into
//! equal ranges instead: evener, at the price of parameters split across ranks). Each rank's
//! parameters travel as one bucket, padded to the largest rank's, so every collective is one
//! call. Gradients travel in f32, gathered weights in their own dtype.

use std::collections::BTreeMap;

use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};

use super::optimizer::{parameters, put_back, Grads, Moments};
use crate::backend::TrainBackend;
use crate::error::{Error, Result};
use crate::parallel::regions::{Collective, GroupComm};

/// Which rank of a group owns each trained parameter's optimizer state.
pub struct Sharding<W: Backend> {
    group: GroupComm<W>,
    /// Owner by parameter path.
    owner: BTreeMap<String, usize>,
    /// The dtype the updated weights travel in ([`DistributedOptimizer::new`]).
    wire: DType,
}

/// Every trainable parameter of `module` (it requires a gradient) picked by `pick`: its path
/// and its number of elements, in the module's order.
pub fn trainable<AB: AutodiffBackend, M: Module<AB>>(module: &M, pick: impl Fn(&str) -> bool) -> Vec<(String, usize)> {
    struct Sizes<F: Fn(&str) -> bool>(Vec<String>, F, Vec<(String, usize)>);
    impl<B: AutodiffBackend, F: Fn(&str) -> bool> ModuleVisitor<B> for Sizes<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let path = self.0.join(".");
            if param.val().is_require_grad() && (self.1)(&path) {
                self.2.push((path, param.shape().num_elements()));
            }
        }
    }
    let mut sizes = Sizes(Vec::new(), pick, Vec::new());
    module.visit(&mut sizes);
    sizes.2
}

impl<W: Backend> Sharding<W> {
    /// `params` (path, elements) dealt over `group`'s ranks, their updated values gathered in
    /// `wire`; the same on every rank.
    pub fn new(group: GroupComm<W>, params: &[(String, usize)], wire: DType) -> Self {
        let size = group.group().size;
        let mut order: Vec<&(String, usize)> = params.iter().collect();
        order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut load = vec![0usize; size];
        let mut owner = BTreeMap::new();
        for (path, n) in order {
            let r = (0..size).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += n;
            owner.insert(path.clone(), r);
        }
        Sharding { group, owner, wire }
    }

    pub fn group(&self) -> &GroupComm<W> {
        &self.group
    }

    /// Whether this rank owns the parameter at `path`.
    pub fn owns(&self, path: &str) -> bool {
        self.owner.get(path) == Some(&self.group.group().rank)
    }

    /// Whether the parameter at `path` is dealt over this group.
    pub fn covers(&self, path: &str) -> bool {
        self.owner.contains_key(path)
    }

    /// Elements each rank owns, by rank.
    pub fn load(&self, sizes: &BTreeMap<String, usize>) -> Vec<usize> {
        let mut load = vec![0; self.group.group().size];
        for (path, &r) in &self.owner {
            load[r] += sizes.get(path).copied().unwrap_or(0);
        }
        load
    }

    fn owner_of(&self, path: &str) -> Result<usize> {
        self.owner.get(path).copied().ok_or_else(|| Error::Internal(format!("parameter `{path}` has a gradient but no owner in the distributed optimizer")))
    }

    /// `items` (path, elements; the same on every rank, in the same order) by owner, in order.
    fn buckets<'a>(&self, items: impl IntoIterator<Item = (&'a str, usize)>) -> Result<Vec<Vec<(&'a str, usize)>>> {
        let mut buckets = vec![Vec::new(); self.group.group().size];
        for (path, n) in items {
            buckets[self.owner_of(path)?].push((path, n));
        }
        Ok(buckets)
    }

    /// The gradients summed over the group, each kept only by its owner: this rank's, with
    /// `extra` (a one-element f32 tensor, the loss sum) summed over the group too. Every rank
    /// must hold a gradient for the same parameters (as the replicated all-reduce needs).
    pub fn reduce_scatter<B: TrainBackend<Wire = W>>(&self, grads: Grads<B>, extra: Option<Tensor<B, 1>>) -> Result<(Option<Tensor<B, 1>>, Grads<B>)> {
        let Grads { mut by_path, scale } = grads;
        let sizes: Vec<(String, usize)> = by_path.iter().map(|(p, g)| (p.clone(), g.dims()[0])).collect();
        let buckets = self.buckets(sizes.iter().map(|(p, n)| (p.as_str(), *n)))?;
        let Some(device) = by_path.values().next().map(|g| g.device()).or_else(|| extra.as_ref().map(|e| e.device())) else {
            return Ok((extra, Grads { by_path, scale }));
        };
        let tail = usize::from(extra.is_some());
        let len = buckets.iter().map(|b| b.iter().map(|(_, n)| n).sum::<usize>()).max().unwrap_or(0) + tail;
        let mut parts = Vec::new();
        for bucket in &buckets {
            let n: usize = bucket.iter().map(|(_, n)| n).sum();
            parts.extend(bucket.iter().map(|(p, _)| by_path.remove(*p).expect("bucketed from these gradients")));
            if len - tail > n {
                parts.push(Tensor::zeros([len - tail - n], (&device, DType::F32)));
            }
            parts.extend(extra.clone());
        }
        let mine = B::collective(Tensor::cat(parts, 0), Collective::ReduceScatter(0), &self.group)?;
        let mut offset = 0;
        for &(path, n) in &buckets[self.group.group().rank] {
            by_path.insert(path.to_string(), mine.clone().narrow(0, offset, n));
            offset += n;
        }
        Ok((extra.map(|_| mine.narrow(0, len - 1, 1)), Grads { by_path, scale }))
    }

    /// `model` with each parameter of `updated` (path, elements: the step's gradients', the same
    /// on every rank) that another rank owns replaced by the value that rank's update gave it.
    pub fn all_gather<B: TrainBackend<Wire = W>, M: Module<Autodiff<B>>>(&self, model: M, updated: &[(String, usize)], device: &B::Device) -> Result<M> {
        let buckets = self.buckets(updated.iter().map(|(p, n)| (p.as_str(), *n)))?;
        let me = self.group.group().rank;
        let lens: Vec<usize> = buckets.iter().map(|b| b.iter().map(|(_, n)| n).sum()).collect();
        let len = lens.iter().copied().max().unwrap_or(0);
        if len == 0 {
            return Ok(model);
        }
        let wire = self.wire;
        let mut mine: BTreeMap<String, Tensor<B, 1>> =
            parameters::<Autodiff<B>, M>(&model, |p| self.owns(p)).into_iter().map(|t| (t.path, t.value)).collect();
        let mut parts = Vec::new();
        for &(path, _) in &buckets[me] {
            let value = mine.remove(path).ok_or_else(|| Error::Internal(format!("parameter `{path}` is not in the model")))?;
            parts.push(kernels_cubecl::layer_ops::to_dtype(value, wire));
        }
        if len > lens[me] {
            parts.push(Tensor::zeros([len - lens[me]], (device, wire)));
        }
        let all = B::collective(Tensor::cat(parts, 0), Collective::AllGather(0), &self.group)?;
        let mut values = BTreeMap::new();
        for (r, bucket) in buckets.iter().enumerate().filter(|&(r, _)| r != me) {
            let mut offset = r * len;
            for &(path, n) in bucket {
                values.insert(path.to_string(), all.clone().narrow(0, offset, n));
                offset += n;
            }
        }
        Ok(put_back::<Autodiff<B>, M>(model, &mut values))
    }

    /// Every owner's optimizer state on every rank (for a checkpoint), one parameter at a time
    /// from its owner: `state` is this rank's.
    pub fn gather_state<B: TrainBackend<Wire = W>>(&self, state: &BTreeMap<String, Moments<B>>, sizes: &BTreeMap<String, usize>, device: &B::Device) -> Result<BTreeMap<String, Moments<B>>> {
        let me = self.group.group().rank;
        let buckets = self.buckets(self.owner.keys().map(|p| (p.as_str(), sizes.get(p).copied().unwrap_or(0))))?;
        let mut out = BTreeMap::new();
        for (r, bucket) in buckets.iter().enumerate() {
            if bucket.is_empty() {
                continue;
            }
            // What the owner holds of each of its parameters: a step count (0: no state yet)
            // and whether there is a master copy.
            let header: Vec<f32> = bucket
                .iter()
                .flat_map(|&(p, _)| match state.get(p).filter(|_| r == me) {
                    Some(m) => [m.step as f32, f32::from(u8::from(m.master.is_some()))],
                    None => [0.0, 0.0],
                })
                .collect();
            let n = header.len();
            let header = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(header, [n]), (device, DType::F32));
            let header: Vec<f32> = B::collective(header, Collective::Broadcast(r), &self.group)?.into_data().convert::<f32>().to_vec().map_err(|e| Error::Internal(format!("{e:?}")))?;
            for (k, &(path, n)) in bucket.iter().enumerate() {
                let (step, master) = (header[2 * k] as u64, header[2 * k + 1] > 0.0);
                if step == 0 {
                    continue;
                }
                let own = state.get(path).filter(|_| r == me);
                let from_owner = |pick: fn(&Moments<B>) -> Option<&Tensor<B, 1>>| -> Result<Tensor<B, 1>> {
                    let x = own.and_then(pick).cloned().unwrap_or_else(|| Tensor::zeros([n], (device, DType::F32)));
                    Ok(B::collective(x, Collective::Broadcast(r), &self.group)?)
                };
                let exp_avg = from_owner(|m| Some(&m.exp_avg))?;
                let exp_avg_sq = from_owner(|m| Some(&m.exp_avg_sq))?;
                let master = if master { Some(from_owner(|m| m.master.as_ref())?) } else { None };
                out.insert(path.to_string(), Moments { exp_avg, exp_avg_sq, step, master });
            }
        }
        Ok(out)
    }
}

/// The distributed optimizer of a trainer: the dense parameters dealt over the data-parallel
/// group, and under expert parallelism the experts' over the group holding copies of this
/// rank's experts (where their gradients are summed).
pub struct DistributedOptimizer<W: Backend> {
    dense: Sharding<W>,
    experts: Option<Sharding<W>>,
    /// Every trainable parameter's elements, by path.
    sizes: BTreeMap<String, usize>,
}

impl<W: Backend> DistributedOptimizer<W> {
    /// The trainable parameters of `model` dealt over `data` (the data-parallel group), the
    /// experts' (`is_expert`) over `expert_data` instead where it is given.
    pub fn new<AB: AutodiffBackend, M: Module<AB>>(model: &M, data: GroupComm<W>, expert_data: Option<GroupComm<W>>, is_expert: impl Fn(&str) -> bool) -> Self {
        let sizes: BTreeMap<String, usize> = trainable::<AB, M>(model, |_| true).into_iter().collect();
        // The updated weights travel in the trained parameters' own dtype where they share one:
        // what the owners' updates left in the model (on a bf16 model, the masters' bf16 cast,
        // exactly), in half of f32's bytes; f32 otherwise. Every rank holds the same parameters,
        // so every rank picks the same.
        let dtypes: Vec<DType> = parameters::<AB, M>(model, |p| sizes.contains_key(p)).iter().map(|t| t.value.dtype()).collect();
        let wire = match dtypes.first() {
            Some(&d) if dtypes.iter().all(|&x| x == d) => d,
            _ => DType::F32,
        };
        let split = expert_data.is_some();
        let dense = Sharding::new(data, &trainable::<AB, M>(model, |p| !(split && is_expert(p))), wire);
        let experts = expert_data.map(|g| Sharding::new(g, &trainable::<AB, M>(model, &is_expert), wire));
        DistributedOptimizer { dense, experts, sizes }
    }

    /// The elements of the dense parameters each data-parallel rank owns, by rank.
    pub fn dense_load(&self) -> Vec<usize> {
        self.dense.load(&self.sizes)
    }

    /// The sharding that deals the parameter at `path`.
    fn of(&self, path: &str) -> &Sharding<W> {
        match &self.experts {
            Some(e) if e.covers(path) => e,
            _ => &self.dense,
        }
    }

    /// Whether this rank owns the parameter at `path` (keeps its state, updates it).
    pub fn owns(&self, path: &str) -> bool {
        self.of(path).owns(path)
    }

    /// The gradients summed over their groups, each kept by its owner only, and the loss sum
    /// (over the data-parallel group); the paths and sizes of every gradient, for
    /// [`all_gather`](Self::all_gather) after the update.
    #[allow(clippy::type_complexity)]
    pub fn reduce_scatter<B: TrainBackend<Wire = W>>(&self, grads: Grads<B>, loss_sum: Tensor<B, 1>) -> Result<(Tensor<B, 1>, Grads<B>, Vec<(String, usize)>)> {
        let updated = grads.by_path.iter().map(|(p, g)| (p.clone(), g.dims()[0])).collect();
        let (experts, dense) = match &self.experts {
            Some(e) => grads.split_off(|p| e.covers(p)),
            None => (Grads::default(), grads),
        };
        let (loss_sum, dense) = self.dense.reduce_scatter(dense, Some(loss_sum))?;
        let experts = match &self.experts {
            Some(e) => e.reduce_scatter(experts, None)?.1,
            None => experts,
        };
        Ok((loss_sum.expect("the loss went in"), dense.merged(experts), updated))
    }

    /// [`Sharding::all_gather`] over each group.
    pub fn all_gather<B: TrainBackend<Wire = W>, M: Module<Autodiff<B>>>(&self, model: M, updated: &[(String, usize)], device: &B::Device) -> Result<M> {
        let (experts, dense): (Vec<_>, Vec<_>) = updated.iter().cloned().partition(|(p, _)| self.experts.as_ref().is_some_and(|e| e.covers(p)));
        let model = self.dense.all_gather::<B, M>(model, &dense, device)?;
        match &self.experts {
            Some(e) => e.all_gather::<B, M>(model, &experts, device),
            None => Ok(model),
        }
    }

    /// [`Sharding::gather_state`] over each group.
    pub fn gather_state<B: TrainBackend<Wire = W>>(&self, state: &BTreeMap<String, Moments<B>>, device: &B::Device) -> Result<BTreeMap<String, Moments<B>>> {
        let mut out = self.dense.gather_state(state, &self.sizes, device)?;
        if let Some(e) = &self.experts {
            out.extend(e.gather_state(state, &self.sizes, device)?);
        }
        Ok(out)
    }
}
