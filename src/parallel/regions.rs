//! Megatron's region ops: the collectives that enter and leave the tensor- and sequence-parallel
//! regions of a layer, each one autodiff op whose backward is its dual collective.
//!
//! | region op | forward | backward |
//! | --- | --- | --- |
//! | [`Region::CopyToTensor`] | identity | all-reduce |
//! | [`Region::ReduceFromTensor`] | all-reduce | identity |
//! | [`Region::ScatterToSequence`] | this rank's block of `dim` | all-gather along `dim` |
//! | [`Region::GatherFromSequence`] | all-gather along `dim` | reduce-scatter along `dim` |
//! | [`Region::ReduceScatterToSequence`] | reduce-scatter along `dim` | all-gather along `dim` |
//! | [`Region::GatherFromTensor`] | all-gather along `dim` | this rank's block of `dim` |
//! | [`Region::GatherFromSequenceToReplicated`] | all-gather along `dim` | this rank's block of `dim` |
//! | [`Region::ScatterToTensor`] | this rank's block of `dim` | all-gather along `dim` |
//!
//! (`GatherFromSequence`'s backward reduce-scatters because what reads its output is
//! column-parallel: each rank's gradient is a partial sum, Megatron's
//! `tensor_parallel_output_grad=True`.) The collectives run on the backend's own tensors; on
//! `Autodiff<B>` on the inner backend's, with the output kept (a collective is never recomputed
//! by a checkpointing strategy: every rank would have to recompute it at once). A collective that
//! fails in a backward cannot return its error through Burn's backward pass: it is kept in the
//! [`GroupComm`] (the gradient is zeros) and [`GroupComm::check`] returns it after the backward.

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::comm::{CommError, Communicator, ReduceOp};
use super::tcp::TcpCommunicator;
use super::ProcessGroup;

/// One process group's communicator, shared by the layers that talk over it, with the first
/// collective failure of a backward kept for [`check`](Self::check).
#[derive(Debug, Clone)]
pub struct GroupComm<B: Backend> {
    comm: Arc<dyn Communicator<B>>,
    failure: Arc<Mutex<Option<CommError>>>,
}

impl<B: Backend> GroupComm<B> {
    pub fn new(comm: Arc<dyn Communicator<B>>) -> Self {
        GroupComm { comm, failure: Arc::new(Mutex::new(None)) }
    }

    pub fn group(&self) -> ProcessGroup {
        self.comm.group()
    }

    pub fn communicator(&self) -> &dyn Communicator<B> {
        self.comm.as_ref()
    }

    /// The first collective of a backward that failed since the last check, if any.
    pub fn check(&self) -> Result<(), CommError> {
        match self.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Keep `e` for [`check`](Self::check) (the first failure wins).
    pub fn latch(&self, e: CommError) {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
    }
}

/// A region op, named as Megatron names it (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    CopyToTensor,
    ReduceFromTensor,
    ScatterToSequence,
    GatherFromSequence,
    ReduceScatterToSequence,
    GatherFromTensor,
    /// The sequence shards gathered for a consumer every rank runs whole (a replicated LM
    /// head): each rank's gradient is already whole, so the backward keeps this rank's block
    /// (Megatron's `gather_from_sequence_parallel_region` with `tensor_parallel_output_grad`
    /// false).
    GatherFromSequenceToReplicated,
    ScatterToTensor,
}

/// One collective over a group, along one dimension where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    Identity,
    AllReduce,
    AllReduceMax,
    /// This rank's block of the dimension.
    Split(usize),
    AllGather(usize),
    ReduceScatter(usize),
    /// Rank `root`'s tensor on every rank (the others' give only the shape).
    Broadcast(usize),
}

impl Region {
    /// The forward's and the backward's collectives, along `dim`.
    pub fn collectives(self, dim: usize) -> (Collective, Collective) {
        use Collective::*;
        match self {
            Region::CopyToTensor => (Identity, AllReduce),
            Region::ReduceFromTensor => (AllReduce, Identity),
            Region::ScatterToSequence | Region::ScatterToTensor => (Split(dim), AllGather(dim)),
            Region::GatherFromSequence => (AllGather(dim), ReduceScatter(dim)),
            Region::ReduceScatterToSequence => (ReduceScatter(dim), AllGather(dim)),
            Region::GatherFromTensor | Region::GatherFromSequenceToReplicated => (AllGather(dim), Split(dim)),
        }
    }
}

impl Collective {
    /// The shape the collective gives a tensor of `dims` over a group of `size` ranks.
    pub fn output_dims<const D: usize>(self, mut dims: [usize; D], size: usize) -> [usize; D] {
        match self {
            Collective::Split(d) | Collective::ReduceScatter(d) if d < D && size > 1 => dims[d] /= size,
            Collective::AllGather(d) if d < D && size > 1 => dims[d] *= size,
            _ => {}
        }
        dims
    }

    /// The collective on `x` over `comm`'s group (sums in the communicator's order).
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>, comm: &dyn Communicator<B>) -> Result<Tensor<B, D>, CommError> {
        let size = comm.group().size;
        let dims = x.dims();
        let check_dim = |dim: usize| {
            if dim >= D {
                return Err(CommError::Invalid(format!("dimension {dim} of a {D}-d tensor")));
            }
            Ok(dim)
        };
        match self {
            Collective::Identity => Ok(x),
            _ if size == 1 => Ok(x),
            Collective::AllReduce => Ok(comm.all_reduce(flat(x), ReduceOp::Sum)?.reshape(dims)),
            Collective::AllReduceMax => Ok(comm.all_reduce(flat(x), ReduceOp::Max)?.reshape(dims)),
            Collective::Split(dim) => {
                let dim = check_dim(dim)?;
                let len = divided(dims[dim], size, "split")?;
                Ok(x.narrow(dim, comm.group().rank * len, len))
            }
            Collective::AllGather(dim) => {
                let dim = check_dim(dim)?;
                let front = x.swap_dims(0, dim);
                let mut gathered = front.dims();
                gathered[0] *= size;
                Ok(comm.all_gather(flat(front))?.reshape(gathered).swap_dims(0, dim))
            }
            Collective::Broadcast(root) => Ok(comm.broadcast(flat(x), root)?.reshape(dims)),
            Collective::ReduceScatter(dim) => {
                let dim = check_dim(dim)?;
                let front = x.swap_dims(0, dim);
                let mut scattered = front.dims();
                scattered[0] = divided(scattered[0], size, "reduce-scatter")?;
                Ok(comm.reduce_scatter(flat(front), ReduceOp::Sum)?.reshape(scattered).swap_dims(0, dim))
            }
        }
    }
}

fn flat<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 1> {
    let n = x.dims().iter().product::<usize>();
    x.reshape([n])
}

fn divided(n: usize, size: usize, what: &str) -> Result<usize, CommError> {
    if !n.is_multiple_of(size) {
        return Err(CommError::Invalid(format!("{what} of {n} rows over {size} ranks: expected a multiple of {size}")));
    }
    Ok(n / size)
}

/// Backends that run region ops. `Wire` is the backend whose tensors the collectives move: the
/// backend itself, or (under autodiff) the innermost backend's.
pub trait RegionBackend: Backend {
    type Wire: Backend;

    /// `collective` on this backend's own tensors, untracked: what a region op runs forward, and
    /// on the inner backend its backward.
    fn collective<const D: usize>(x: Tensor<Self, D>, collective: Collective, comm: &GroupComm<Self::Wire>) -> Result<Tensor<Self, D>, CommError>;

    /// `region`'s forward collective along `dim` (see the module); on autodiff backends its
    /// backward is the dual collective.
    fn region<const D: usize>(x: Tensor<Self, D>, region: Region, dim: usize, comm: &GroupComm<Self::Wire>) -> Result<Tensor<Self, D>, CommError> {
        Self::collective(x, region.collectives(dim).0, comm)
    }

    /// The rows of `x` (`[rows, cols]`), `send[j]` of them for rank `j` after one another, traded
    /// for the rows every rank sends this one: `recv[j]` from rank `j`, in rank order. On
    /// autodiff backends the backward trades the gradient's rows back (the reverse all-to-all):
    /// the expert-parallel token dispatcher's collective, Megatron's `all_to_all`.
    fn all_to_all_rows(x: Tensor<Self, 2>, send: &[usize], recv: &[usize], comm: &GroupComm<Self::Wire>) -> Result<Tensor<Self, 2>, CommError>;

    /// What carries [`group_communicator`](Self::group_communicator)'s collectives, for the log.
    fn communicator_kind() -> &'static str {
        "TCP"
    }

    /// Abort this process's communicators so that a collective waiting on a dead peer ends (the
    /// watchdog's first act, [`super::watchdog`]); TCP collectives time out by themselves.
    fn abort_communicators() {}

    /// The communicator this backend's collectives take for the process group whose members'
    /// TCP links are `host` (every member calls this at once, on its `device`): by default the
    /// TCP links themselves (host copies, what CPU ranks use); NCCL on CUDA.
    fn group_communicator(host: TcpCommunicator, device: &Self::Device) -> Result<GroupComm<Self::Wire>, CommError> {
        let _ = device;
        Ok(GroupComm::new(Arc::new(host)))
    }

    /// [`region`](Self::region) inside a forward pass, which has no error to return: a failed
    /// collective is kept in `comm` for [`GroupComm::check`] after the step, and the output is
    /// zeros of the shape the collective would have given (so the step runs to its end, where
    /// the failure is reported; a peer that died fails the next collective too).
    fn region_or_latch<const D: usize>(x: Tensor<Self, D>, region: Region, dim: usize, comm: &GroupComm<Self::Wire>) -> Tensor<Self, D> {
        let (device, dtype) = (x.device(), x.dtype());
        let dims = region.collectives(dim).0.output_dims(x.dims(), comm.group().size);
        Self::region(x, region, dim, comm).unwrap_or_else(|e| {
            comm.latch(e);
            Tensor::zeros(dims, (&device, dtype))
        })
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> RegionBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    type Wire = Self;

    fn collective<const D: usize>(x: Tensor<Self, D>, collective: Collective, comm: &GroupComm<Self>) -> Result<Tensor<Self, D>, CommError> {
        collective.apply(x, comm.communicator())
    }

    fn all_to_all_rows(x: Tensor<Self, 2>, send: &[usize], recv: &[usize], comm: &GroupComm<Self>) -> Result<Tensor<Self, 2>, CommError> {
        rows_all_to_all(x, send, recv, comm.communicator())
    }
}

#[cfg(feature = "cuda")]
impl<F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> RegionBackend
    for burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, I, BT>
{
    type Wire = Self;

    fn collective<const D: usize>(x: Tensor<Self, D>, collective: Collective, comm: &GroupComm<Self>) -> Result<Tensor<Self, D>, CommError> {
        collective.apply(x, comm.communicator())
    }

    fn all_to_all_rows(x: Tensor<Self, 2>, send: &[usize], recv: &[usize], comm: &GroupComm<Self>) -> Result<Tensor<Self, 2>, CommError> {
        rows_all_to_all(x, send, recv, comm.communicator())
    }

    fn communicator_kind() -> &'static str {
        "NCCL"
    }

    fn abort_communicators() {
        kernels_cubecl::nccl_abort_all();
    }

    /// NCCL ([`super::nccl::NcclCommunicator`]).
    fn group_communicator(host: TcpCommunicator, device: &Self::Device) -> Result<GroupComm<Self>, CommError> {
        Ok(GroupComm::new(Arc::new(super::nccl::NcclCommunicator::new(host, device)?)))
    }
}

impl<B: RegionBackend, C: CheckpointStrategy> RegionBackend for Autodiff<B, C> {
    type Wire = B::Wire;

    /// Untracked: the collective of the inner tensor, its output a new leaf.
    fn collective<const D: usize>(x: Tensor<Self, D>, collective: Collective, comm: &GroupComm<B::Wire>) -> Result<Tensor<Self, D>, CommError> {
        Ok(Tensor::from_inner(B::collective(x.inner(), collective, comm)?))
    }

    fn group_communicator(host: TcpCommunicator, device: &Self::Device) -> Result<GroupComm<B::Wire>, CommError> {
        B::group_communicator(host, device)
    }

    fn communicator_kind() -> &'static str {
        B::communicator_kind()
    }

    fn abort_communicators() {
        B::abort_communicators();
    }

    fn all_to_all_rows(x: Tensor<Self, 2>, send: &[usize], recv: &[usize], comm: &GroupComm<B::Wire>) -> Result<Tensor<Self, 2>, CommError> {
        let x = x.into_primitive().tensor();
        let inner = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
        let cols = inner.dims()[1];
        let y = B::all_to_all_rows(inner, send, recv, comm)?.into_primitive().tensor();
        let state = AllToAllState { send: send.to_vec(), recv: recv.to_vec(), cols, comm: comm.clone() };
        let out = match AllToAllBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn region<const D: usize>(x: Tensor<Self, D>, region: Region, dim: usize, comm: &GroupComm<B::Wire>) -> Result<Tensor<Self, D>, CommError> {
        let (forward, backward) = region.collectives(dim);
        let x = x.into_primitive().tensor();
        let inner = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
        let dims = inner.dims();
        let y = B::collective(inner, forward, comm)?.into_primitive().tensor();
        let out = match RegionBackward::<D>.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(RegionState { backward, comm: comm.clone(), dims }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }
}

/// `x`'s rows traded over `comm` ([`RegionBackend::all_to_all_rows`]) on the backend's own
/// tensors.
fn rows_all_to_all<B: Backend>(x: Tensor<B, 2>, send: &[usize], recv: &[usize], comm: &dyn Communicator<B>) -> Result<Tensor<B, 2>, CommError> {
    let [rows, cols] = x.dims();
    if send.iter().sum::<usize>() != rows {
        return Err(CommError::Invalid(format!("all-to-all of {rows} rows with send counts {send:?}")));
    }
    if comm.group().size == 1 {
        return Ok(x);
    }
    let scaled = |c: &[usize]| c.iter().map(|&n| n * cols).collect::<Vec<_>>();
    let y = comm.all_to_all(x.reshape([rows * cols]), &scaled(send), &scaled(recv))?;
    Ok(y.reshape([recv.iter().sum::<usize>(), cols]))
}

/// What the all-to-all's backward needs: the counts to trade back and the group.
#[derive(Debug, Clone)]
struct AllToAllState<W: Backend> {
    send: Vec<usize>,
    recv: Vec<usize>,
    cols: usize,
    comm: GroupComm<W>,
}

#[derive(Debug)]
struct AllToAllBackward;

impl<B: RegionBackend> Backward<B, 1> for AllToAllBackward {
    type State = AllToAllState<B::Wire>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let Some(node) = node else { return };
        let AllToAllState { send, recv, cols, comm } = ops.state;
        let (device, dtype) = (grad.device(), grad.dtype());
        // The rows came in by `recv` and go back by it; this rank's own rows return by `send`.
        let dx = B::all_to_all_rows(grad, &recv, &send, &comm).unwrap_or_else(|e| {
            comm.latch(e);
            Tensor::zeros([send.iter().sum::<usize>(), cols], (&device, dtype))
        });
        grads.register::<B>(node.id, dx.into_primitive().tensor());
    }
}

/// What a region op's backward needs: its collective, the group, and the input's shape (for
/// the zeros it hands back when the collective fails).
#[derive(Debug, Clone)]
struct RegionState<B: RegionBackend, const D: usize> {
    backward: Collective,
    comm: GroupComm<B::Wire>,
    dims: [usize; D],
}

#[derive(Debug)]
struct RegionBackward<const D: usize>;

impl<B: RegionBackend, const D: usize> Backward<B, 1> for RegionBackward<D> {
    type State = RegionState<B, D>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let Some(node) = node else { return };
        let RegionState { backward, comm, dims } = ops.state;
        let (device, dtype) = (grad.device(), grad.dtype());
        let dx = B::collective(grad, backward, &comm).unwrap_or_else(|e| {
            comm.latch(e);
            Tensor::zeros(dims, (&device, dtype))
        });
        grads.register::<B>(node.id, dx.into_primitive().tensor());
    }
}
