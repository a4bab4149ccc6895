//! The collectives a parallel layout needs, as one trait over the backend's tensors.
//!
//! A [`Communicator`] belongs to one process group (the tensor-parallel ranks of a data-parallel
//! replica, say) and carries that group's collectives: every rank of the group calls the same
//! collectives in the same order, as NCCL and `torch.distributed` require. Tensors are flat
//! (`[n]`): callers reshape, and the rank-ordered pieces of a gather or scatter are blocks of
//! that one dimension. Two implementations: NCCL on CUDA (the parallel issue's next step) and
//! [`super::tcp::TcpCommunicator`], ranks on CPUs over TCP, which runs every parallel path in
//! `cargo test`.

use std::fmt;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::ProcessGroup;

/// How an all-reduce or reduce-scatter combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

impl ReduceOp {
    pub(crate) fn apply(self, acc: &mut [f32], x: &[f32]) {
        match self {
            ReduceOp::Sum => acc.iter_mut().zip(x).for_each(|(a, b)| *a += b),
            ReduceOp::Max => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.max(*b)),
        }
    }
}

/// Why a collective or the rendezvous failed. Each names the rank or address concerned and,
/// where the user can act, what would be valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommError {
    /// Rank 0 could not listen on the master address (a port in use, an address not of this host).
    Bind { addr: String, message: String },
    /// The master (or a peer's listener) did not answer before the deadline.
    Unreachable { addr: String, seconds: u64 },
    /// A rank's launch does not match rank 0's: world size, rank, recipe or binary.
    Mismatch(String),
    /// A peer closed its connection: its process ended or failed.
    PeerClosed { rank: usize },
    /// No message from a peer before the deadline: it hangs, or is far slower than this rank.
    Timeout { rank: usize, seconds: u64, waiting_for: String },
    /// A peer sent a collective other than the one this rank runs: the ranks run different
    /// programs (or different recipes).
    OutOfStep { rank: usize, expected: String, got: String },
    /// Arguments no rank could serve (split sizes that do not add up, say): a bug in the caller.
    Invalid(String),
    /// A socket error other than the above.
    Io { rank: Option<usize>, message: String },
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommError::Bind { addr, message } => write!(f, "cannot listen on the master address {addr}: {message} (choose another --master-port, or an address of this machine)"),
            CommError::Unreachable { addr, seconds } => write!(f, "no answer from {addr} within {seconds} s: is rank 0 started, and are --master-addr / --master-port (MASTER_ADDR / MASTER_PORT) the same on every node?"),
            CommError::Mismatch(m) => write!(f, "{m}"),
            CommError::PeerClosed { rank } => write!(f, "rank {rank} closed its connection: its process ended (see rank {rank}'s log)"),
            CommError::Timeout { rank, seconds, waiting_for } => write!(f, "no message from rank {rank} within {seconds} s while waiting for {waiting_for}: rank {rank} hangs or died"),
            CommError::OutOfStep { rank, expected, got } => write!(f, "rank {rank} sent {got} while this rank runs {expected}: the ranks run different programs"),
            CommError::Invalid(m) => write!(f, "invalid collective: {m}"),
            CommError::Io { rank: Some(r), message } => write!(f, "connection to rank {r}: {message}"),
            CommError::Io { rank: None, message } => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for CommError {}

impl From<CommError> for crate::Error {
    fn from(e: CommError) -> Self {
        match e {
            CommError::Invalid(m) => crate::Error::Internal(format!("invalid collective: {m}")),
            e => crate::Error::Parallel(e.to_string()),
        }
    }
}

/// One process group's collectives over flat tensors of backend `B`. Every rank of the group
/// calls the same methods in the same order; results are the same on every rank (bit for bit on
/// the TCP implementation: sums run in rank order).
pub trait Communicator<B: Backend>: Send + Sync + fmt::Debug {
    /// This rank's place in the group.
    fn group(&self) -> ProcessGroup;

    /// Every rank's `x` combined by `op`: `[n]` → `[n]`.
    fn all_reduce(&self, x: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>, CommError>;

    /// The ranks' `x` end to end in rank order: `[n]` → `[size · n]`.
    fn all_gather(&self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CommError>;

    /// Block `rank` of every rank's `x` combined by `op`: `[size · n]` → `[n]`.
    fn reduce_scatter(&self, x: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>, CommError>;

    /// Uneven all-to-all: `x` is `send_counts[j]` elements for rank `j` after one another; the
    /// result is `recv_counts[j]` elements from rank `j` after one another (the counts come from
    /// [`all_to_all_counts`](Self::all_to_all_counts)).
    fn all_to_all(&self, x: Tensor<B, 1>, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor<B, 1>, CommError>;

    /// What every rank will send this one: `send_counts[j]` is this rank's count for rank `j`;
    /// the result's `[j]` is rank `j`'s count for this rank. Read on the host (the token
    /// dispatcher sizes its buffers from it, as Megatron's does).
    fn all_to_all_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>, CommError>;

    /// [`all_to_all_counts`](Self::all_to_all_counts) of `per_rank` counts for each rank:
    /// `send[j * per_rank..][..per_rank]` go to rank `j`, and the result's block `j` is what rank
    /// `j` sent this one (the token dispatcher's counts per rank and local expert).
    fn all_to_all_count_blocks(&self, send: &[usize], per_rank: usize) -> Result<Vec<usize>, CommError> {
        let size = self.group().size;
        if send.len() != size * per_rank {
            return Err(CommError::Invalid(format!("{} counts for {size} ranks of {per_rank} each", send.len())));
        }
        let mut out = vec![0; send.len()];
        for k in 0..per_rank {
            let column: Vec<usize> = (0..size).map(|j| send[j * per_rank + k]).collect();
            for (j, c) in self.all_to_all_counts(&column)?.into_iter().enumerate() {
                out[j * per_rank + k] = c;
            }
        }
        Ok(out)
    }

    /// Rank `root`'s `x` on every rank; the others' `x` give only the shape.
    fn broadcast(&self, x: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, CommError>;

    /// Returns when every rank of the group has called it.
    fn barrier(&self) -> Result<(), CommError>;
}

/// The trivial communicator of a group of one: every collective returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl<B: Backend> Communicator<B> for SingleRank {
    fn group(&self) -> ProcessGroup {
        ProcessGroup::SINGLE
    }
    fn all_reduce(&self, x: Tensor<B, 1>, _: ReduceOp) -> Result<Tensor<B, 1>, CommError> {
        Ok(x)
    }
    fn all_gather(&self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CommError> {
        Ok(x)
    }
    fn reduce_scatter(&self, x: Tensor<B, 1>, _: ReduceOp) -> Result<Tensor<B, 1>, CommError> {
        Ok(x)
    }
    fn all_to_all(&self, x: Tensor<B, 1>, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor<B, 1>, CommError> {
        let n = x.dims()[0];
        if send_counts != [n] || recv_counts != [n] {
            return Err(CommError::Invalid(format!("one rank sends all its {n} elements to itself, not {send_counts:?} / {recv_counts:?}")));
        }
        Ok(x)
    }
    fn all_to_all_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>, CommError> {
        Ok(send_counts.to_vec())
    }
    fn broadcast(&self, x: Tensor<B, 1>, _: usize) -> Result<Tensor<B, 1>, CommError> {
        Ok(x)
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}
