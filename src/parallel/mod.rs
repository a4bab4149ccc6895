//! Process groups and how a layer's weights are split across them.
//!
//! The model maths never reads a rank: a layer is built with a [`Partition`] that says which
//! slice of the full checkpoint tensor it owns, and (in later steps) a parallel wrapper applies
//! the collective that makes the sliced result whole, as Megatron's `ColumnParallelLinear` /
//! `RowParallelLinear` do.

use serde::Serialize;

pub mod comm;
pub mod launch;
pub mod layers;
pub mod mesh;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod regions;
pub mod rendezvous;
pub mod tcp;
pub mod tensor;
pub mod vocab;
pub mod watchdog;
#[cfg(test)]
mod comm_tests;
#[cfg(test)]
mod layers_tests;

/// A handle on a group of ranks that cooperate on one parallel dimension (tensor, expert, data).
///
/// Only the coordinates live here; the communicator that carries collectives is attached by the
/// parallel layer that needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessGroup {
    pub rank: usize,
    pub size: usize,
}

impl ProcessGroup {
    /// The trivial group of one rank: no splitting, no communication.
    pub const SINGLE: ProcessGroup = ProcessGroup { rank: 0, size: 1 };

    pub fn new(rank: usize, size: usize) -> Self {
        assert!(size >= 1 && rank < size, "rank {rank} outside a group of {size}");
        ProcessGroup { rank, size }
    }

    /// The contiguous block `[start, start + len)` of `n` items this rank owns when `n` is
    /// split evenly (callers check divisibility when the recipe is compiled).
    pub fn block(&self, n: usize) -> std::ops::Range<usize> {
        let len = n / self.size;
        self.rank * len..(self.rank + 1) * len
    }
}

/// Which slice of a full linear weight `W: [out, in]` (Hugging Face layout) a layer owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Partition {
    /// The whole weight.
    Replicated,
    /// `W` is split along its output dimension; each rank computes a slice of the outputs
    /// (Megatron's column-parallel linear). A bias is split the same way.
    Column(ProcessGroup),
    /// `W` is split along its input dimension; each rank computes a partial sum that an
    /// all-reduce completes (Megatron's row-parallel linear). A bias is kept whole.
    Row(ProcessGroup),
}

impl Partition {
    /// The slice `(dim, range)` of the HF-layout `[out, in]` weight this partition owns.
    pub fn weight_slice(&self, out: usize, inp: usize) -> Option<(usize, std::ops::Range<usize>)> {
        match self {
            Partition::Replicated => None,
            Partition::Column(g) if g.size > 1 => Some((0, g.block(out))),
            Partition::Row(g) if g.size > 1 => Some((1, g.block(inp))),
            _ => None,
        }
    }

    /// The slice of a bias of length `out` this partition owns.
    pub fn bias_slice(&self, out: usize) -> Option<(usize, std::ops::Range<usize>)> {
        match self {
            Partition::Column(g) if g.size > 1 => Some((0, g.block(out))),
            _ => None,
        }
    }

    /// Local `(out, in)` sizes.
    pub fn local_shape(&self, out: usize, inp: usize) -> (usize, usize) {
        match self {
            Partition::Column(g) => (out / g.size, inp),
            Partition::Row(g) => (out, inp / g.size),
            Partition::Replicated => (out, inp),
        }
    }
}

/// The process groups of one rank in a parallel layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub data: ProcessGroup,
    pub tensor: ProcessGroup,
    pub expert: ProcessGroup,
}

impl Layout {
    pub const SINGLE: Layout = Layout {
        data: ProcessGroup::SINGLE,
        tensor: ProcessGroup::SINGLE,
        expert: ProcessGroup::SINGLE,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_and_row_slices_cover_the_weight() {
        let (out, inp) = (12, 8);
        let mut rows = vec![];
        let mut cols = vec![];
        for r in 0..4 {
            let g = ProcessGroup::new(r, 4);
            rows.push(Partition::Column(g).weight_slice(out, inp).unwrap());
            cols.push(Partition::Row(g).weight_slice(out, inp).unwrap());
            assert_eq!(Partition::Column(g).local_shape(out, inp), (3, 8));
            assert_eq!(Partition::Row(g).local_shape(out, inp), (12, 2));
        }
        assert_eq!(rows.iter().map(|(d, r)| (*d, r.clone())).collect::<Vec<_>>(),
            vec![(0, 0..3), (0, 3..6), (0, 6..9), (0, 9..12)]);
        assert_eq!(cols.last().unwrap(), &(1, 6..8));
        assert_eq!(Partition::Row(ProcessGroup::new(1, 4)).bias_slice(12), None);
        assert_eq!(Partition::Replicated.weight_slice(out, inp), None);
    }
}
