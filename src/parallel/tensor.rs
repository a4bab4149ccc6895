//! Tensor (and sequence) parallelism as a model's layers meet it: the group and the four region
//! transitions a decoder layer makes, each a no-op on one rank.
//!
//! A block (attention, dense MLP) enters the tensor-parallel region before its column-parallel
//! projections and leaves it after its row-parallel one: Megatron's copy-to / reduce-from, or
//! with sequence parallelism gather-from / reduce-scatter-to the sequence shard, so norms,
//! residual adds and the MoE block run on `seq / tp` positions. The embeddings' output is
//! scattered to the sequence shards before the first layer and the final norm's output gathered
//! for the (replicated) head. Collectives that fail inside a forward are kept in the group's
//! [`GroupComm`] for [`GroupComm::check`] after the step.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::regions::{GroupComm, Region, RegionBackend};

/// Where the sequence is in the activations the layers pass along (`[batch, seq, hidden]`).
pub const SEQ_DIM: usize = 1;

/// The tensor-parallel group of this rank and whether sequence parallelism splits activations.
#[derive(Debug, Clone)]
pub struct TensorParallel<W: Backend> {
    pub comm: GroupComm<W>,
    pub sequence_parallel: bool,
}

impl<W: Backend> TensorParallel<W> {
    pub fn new(comm: GroupComm<W>, sequence_parallel: bool) -> Self {
        TensorParallel { comm, sequence_parallel }
    }

    pub fn size(&self) -> usize {
        self.comm.group().size
    }

    /// Into a block's tensor-parallel region (before its column-parallel projections): the
    /// whole sequence, every rank's gradient summed on the way back.
    pub fn enter<B: RegionBackend<Wire = W>, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.sequence_parallel {
            true => B::region_or_latch(x, Region::GatherFromSequence, SEQ_DIM, &self.comm),
            false => B::region_or_latch(x, Region::CopyToTensor, SEQ_DIM, &self.comm),
        }
    }

    /// Out of the region (after the row-parallel projection, before its bias): the ranks'
    /// partial sums added, kept whole or reduce-scattered to this rank's sequence shard.
    pub fn leave<B: RegionBackend<Wire = W>, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.sequence_parallel {
            true => B::region_or_latch(x, Region::ReduceScatterToSequence, SEQ_DIM, &self.comm),
            false => B::region_or_latch(x, Region::ReduceFromTensor, SEQ_DIM, &self.comm),
        }
    }

    /// This rank's sequence shard of activations every rank holds whole (the embeddings'
    /// output) under sequence parallelism; else `x`.
    pub fn scatter_sequence<B: RegionBackend<Wire = W>, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.sequence_parallel {
            true => B::region_or_latch(x, Region::ScatterToSequence, SEQ_DIM, &self.comm),
            false => x,
        }
    }

    /// The whole sequence from the shards, for a consumer every rank runs whole (the head)
    /// under sequence parallelism; else `x`.
    pub fn gather_sequence<B: RegionBackend<Wire = W>, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.sequence_parallel {
            true => B::region_or_latch(x, Region::GatherFromSequenceToReplicated, SEQ_DIM, &self.comm),
            false => x,
        }
    }
}

/// Where each trained parameter's gradient lives across the tensor-parallel group, by Burn
/// module path (`layers.3.self_attn.q_proj.lora.lora_a`):
/// - sharded: this rank holds a slice of the checkpoint tensor (a column-parallel layer's
///   weight, bias and LoRA B; a row-parallel layer's weight and LoRA A), its gradient that
///   slice's; `dim` is the split dimension of the stored `[in, out]` (or `[out]`) tensor;
/// - partial: every rank holds the tensor whole but saw only its share of the work, so the
///   gradients are summed over the group after the backward (a column layer's LoRA A, a row
///   layer's LoRA B, per-head norms that see only this rank's heads, and under sequence
///   parallelism everything inside the layers that sees only this rank's positions);
/// - whole: the rest (embeddings, the replicated head), identical on every rank already.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GradPlacement {
    pub sharded: std::collections::BTreeMap<String, usize>,
    /// Partial whatever the sequence split.
    pub partial: std::collections::BTreeSet<String>,
    /// Prefixes of the paths that run on this rank's sequence shard (the decoder layers, the
    /// final norm), partial under sequence parallelism unless sharded.
    pub sequence_sharded: Vec<String>,
    pub sequence_parallel: bool,
}

impl GradPlacement {
    /// The linear layer at `module` is split as `partition` (a group of one is not split).
    pub fn add_linear(&mut self, module: &str, partition: super::Partition) {
        use super::Partition;
        let (sharded, partial): (&[(&str, usize)], &str) = match partition {
            Partition::Column(g) if g.size > 1 => (&[("weight", 1), ("bias", 0), ("lora.lora_b", 1)], "lora.lora_a"),
            Partition::Row(g) if g.size > 1 => (&[("weight", 0), ("lora.lora_a", 0)], "lora.lora_b"),
            _ => return,
        };
        for (leaf, dim) in sharded {
            self.sharded.insert(format!("{module}.{leaf}"), *dim);
        }
        self.partial.insert(format!("{module}.{partial}"));
    }

    pub fn is_sharded(&self, path: &str) -> bool {
        self.sharded.contains_key(path)
    }

    /// Whether the gradient of `path` is summed over the group after the backward.
    pub fn is_partial(&self, path: &str) -> bool {
        if self.is_sharded(path) {
            return false;
        }
        self.partial.contains(path)
            || (self.sequence_parallel && self.sequence_sharded.iter().any(|p| path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))))
    }

    /// The dimension `path`'s stored tensor is split along over the group, if it is.
    pub fn split_dim(&self, path: &str) -> Option<usize> {
        self.sharded.get(path).copied()
    }
}
