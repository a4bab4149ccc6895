//! The device mesh: which world ranks form each process group of a parallel layout.
//!
//! Megatron-Core's order ("tp-cp-ep-dp"): tensor-parallel ranks are innermost (neighbours on a
//! node, where NVLink is), then context, then data. Expert parallelism reuses the data x context
//! ranks of MoE layers: with the experts' tensor parallelism equal to the dense layers' (as
//! Megatron's default `expert_tensor_parallel_size`), a rank is
//! `tensor + tensor_size (expert + expert_size · expert_data)`, so an expert group is a block of
//! `expert` consecutive data x context indices at one tensor rank, and the rest of the data x
//! context ranks (`expert_data`) hold copies of the same experts.

use super::{Layout, ProcessGroup};
use crate::recipe::ParallelSection;

/// A named axis of the mesh; each names one kind of process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Replicas of the dense layers (gradients all-reduced over it).
    Data,
    /// Ranks that split each sequence (reserved: only 1 is built today).
    Context,
    /// Ranks that split each layer's weights (and, with sequence parallelism, its activations).
    Tensor,
    /// Ranks that split a MoE layer's experts (tokens travel by all-to-all over it).
    Expert,
    /// Replicas of the same experts (the experts' gradients all-reduced over it).
    ExpertData,
}

/// One rank's coordinates on every axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCoords {
    pub data: usize,
    pub context: usize,
    pub tensor: usize,
    pub expert: usize,
    pub expert_data: usize,
}

/// The sizes of a parallel layout's axes; `world()` ranks in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMesh {
    pub data: usize,
    pub context: usize,
    pub tensor: usize,
    pub expert: usize,
}

impl DeviceMesh {
    /// A mesh of these sizes, or why not (a size of 0, or experts that do not divide the data x
    /// context ranks).
    pub fn new(data: usize, context: usize, tensor: usize, expert: usize) -> Result<DeviceMesh, String> {
        if [data, context, tensor, expert].contains(&0) {
            return Err(format!("every parallel size must be 1 or more, got data {data}, context {context}, tensor {tensor}, expert {expert}"));
        }
        let dc = data * context;
        if !dc.is_multiple_of(expert) {
            return Err(format!("expert parallelism {expert} must divide data x context = {data} x {context} = {dc}"));
        }
        Ok(DeviceMesh { data, context, tensor, expert })
    }

    /// The mesh a recipe's `[parallel]` section names (the recipe's validation has checked it).
    pub fn from_recipe(p: &ParallelSection) -> Result<DeviceMesh, String> {
        DeviceMesh::new(p.data, p.context, p.tensor, p.expert)
    }

    /// Ranks in the job.
    pub fn world(&self) -> usize {
        self.data * self.context * self.tensor
    }

    fn size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Data => self.data,
            Axis::Context => self.context,
            Axis::Tensor => self.tensor,
            Axis::Expert => self.expert,
            Axis::ExpertData => self.data * self.context / self.expert,
        }
    }

    /// `rank`'s coordinates.
    ///
    /// # Panics
    /// When `rank` is not below [`world`](Self::world) (the launcher hands out ranks from it).
    pub fn coords(&self, rank: usize) -> MeshCoords {
        assert!(rank < self.world(), "rank {rank} outside a mesh of {} ranks", self.world());
        let tensor = rank % self.tensor;
        let dc = rank / self.tensor;
        MeshCoords { data: dc / self.context, context: dc % self.context, tensor, expert: dc % self.expert, expert_data: dc / self.expert }
    }

    /// The world rank at these coordinates of the dense layout.
    fn rank_of(&self, data: usize, context: usize, tensor: usize) -> usize {
        tensor + self.tensor * (context + self.context * data)
    }

    /// The world ranks of `rank`'s group on `axis`, in group-rank order (`rank` among them).
    pub fn group(&self, rank: usize, axis: Axis) -> Vec<usize> {
        let c = self.coords(rank);
        let dc = |index: usize| index * self.tensor + c.tensor;
        match axis {
            Axis::Tensor => (0..self.tensor).map(|t| self.rank_of(c.data, c.context, t)).collect(),
            Axis::Context => (0..self.context).map(|x| self.rank_of(c.data, x, c.tensor)).collect(),
            Axis::Data => (0..self.data).map(|d| self.rank_of(d, c.context, c.tensor)).collect(),
            Axis::Expert => (0..self.expert).map(|e| dc(e + self.expert * c.expert_data)).collect(),
            Axis::ExpertData => (0..self.size(Axis::ExpertData)).map(|d| dc(c.expert + self.expert * d)).collect(),
        }
    }

    /// Every group on `axis`, each rank in exactly one, ordered by their lowest rank.
    pub fn groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        let mut seen = vec![false; self.world()];
        let mut out = Vec::new();
        for rank in 0..self.world() {
            if !seen[rank] {
                let g = self.group(rank, axis);
                g.iter().for_each(|&r| seen[r] = true);
                out.push(g);
            }
        }
        out
    }

    /// `rank`'s place in its group on `axis`.
    pub fn process_group(&self, rank: usize, axis: Axis) -> ProcessGroup {
        let group = self.group(rank, axis);
        let index = group.iter().position(|&r| r == rank).unwrap_or_else(|| unreachable!("a rank's group holds it"));
        ProcessGroup::new(index, group.len())
    }

    /// The process groups the model is built with on `rank`.
    pub fn layout(&self, rank: usize) -> Layout {
        Layout {
            data: self.process_group(rank, Axis::Data),
            tensor: self.process_group(rank, Axis::Tensor),
            expert: self.process_group(rank, Axis::Expert),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every axis's groups partition the world, each group has its axis's size, and a rank's
    /// group holds it.
    fn check_partitions(m: DeviceMesh) {
        for axis in [Axis::Data, Axis::Context, Axis::Tensor, Axis::Expert, Axis::ExpertData] {
            let groups = m.groups(axis);
            let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..m.world()).collect::<Vec<_>>(), "{axis:?} of {m:?}");
            assert!(groups.iter().all(|g| g.len() == m.size(axis)), "{axis:?} of {m:?}: {groups:?}");
            for rank in 0..m.world() {
                assert!(m.group(rank, axis).contains(&rank));
                assert_eq!(m.groups(axis).iter().filter(|g| g.contains(&rank)).count(), 1);
            }
        }
    }

    #[test]
    fn megatron_order_tensor_innermost() {
        // data 4 x tensor 2, expert 4: the seed's MoE recipe on 8 GPUs.
        let m = DeviceMesh::new(4, 1, 2, 4).unwrap();
        assert_eq!(m.world(), 8);
        assert_eq!(m.groups(Axis::Tensor), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        assert_eq!(m.groups(Axis::Data), vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        assert_eq!(m.groups(Axis::Expert), vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
        assert_eq!(m.groups(Axis::ExpertData), vec![vec![0], vec![1], vec![2], vec![3], vec![4], vec![5], vec![6], vec![7]]);
        assert_eq!(m.layout(5), Layout { data: ProcessGroup::new(2, 4), tensor: ProcessGroup::new(1, 2), expert: ProcessGroup::new(2, 4) });
        check_partitions(m);
    }

    #[test]
    fn expert_groups_are_blocks_of_the_data_ranks() {
        // data 4 x tensor 2, expert 2: experts split in pairs of data ranks, each pair's copy
        // held by the other pair.
        let m = DeviceMesh::new(4, 1, 2, 2).unwrap();
        assert_eq!(m.groups(Axis::Expert), vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]);
        assert_eq!(m.groups(Axis::ExpertData), vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        assert_eq!(m.coords(6), MeshCoords { data: 3, context: 0, tensor: 0, expert: 1, expert_data: 1 });
        check_partitions(m);
        for (d, c, t, e) in [(1, 1, 1, 1), (2, 1, 1, 2), (2, 2, 2, 4), (3, 1, 4, 3), (1, 1, 8, 1), (8, 1, 1, 8)] {
            check_partitions(DeviceMesh::new(d, c, t, e).unwrap());
        }
    }

    #[test]
    fn bad_sizes_say_what_would_be_valid() {
        let e = DeviceMesh::new(3, 1, 2, 2).unwrap_err();
        assert!(e.contains("must divide data x context = 3 x 1 = 3"), "{e}");
        assert!(DeviceMesh::new(2, 1, 0, 1).unwrap_err().contains("1 or more"));
    }
}
