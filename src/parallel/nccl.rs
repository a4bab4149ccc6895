//! The NCCL implementation of [`Communicator`] for Burn's CUDA backend: one NCCL communicator
//! per process group, its unique id made by the group's rank 0 and carried to the others over
//! the rendezvous's TCP links (`ncclCommInitRank`), so ranks in separate processes and on
//! separate nodes form it as torchrun's NCCL groups are formed. The collectives run on the
//! tensors' device memory, queued on CubeCL's compute stream (`kernels_cubecl::NcclComm`);
//! what the host must read (all-to-all counts, a barrier) goes over the group's TCP links.

use burn::backend::cuda::CudaDevice;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::cuda::CudaRuntime;
use kernels_cubecl::{NcclComm, NcclReduce};

use super::comm::{CommError, Communicator, ReduceOp};
use super::tcp::TcpCommunicator;
use super::ProcessGroup;

type Cuda<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// A process group's NCCL communicator and its host links.
#[derive(Debug)]
pub struct NcclCommunicator {
    nccl: NcclComm,
    host: TcpCommunicator,
    group: ProcessGroup,
}

impl NcclCommunicator {
    /// The NCCL communicator of the group `host` links (every member calls this at once), on
    /// this rank's GPU.
    pub fn new(host: TcpCommunicator, device: &CudaDevice) -> Result<Self, CommError> {
        let group = Communicator::<crate::backend::Cpu>::group(&host);
        let io = |message: String| CommError::Io { rank: None, message };
        let id = match group.rank {
            0 => kernels_cubecl::nccl_unique_id().map_err(io)?,
            _ => vec![0; 128],
        };
        let id = host.broadcast_bytes(&id, 0)?;
        let nccl = NcclComm::new(device, group.rank, group.size, &id).map_err(io)?;
        Ok(NcclCommunicator { nccl, host, group })
    }
}

fn cube<F: FloatElement, I: IntElement, BT: BoolElement>(x: Tensor<Cuda<F, I, BT>, 1>) -> burn_cubecl::tensor::CubeTensor<CudaRuntime> {
    x.into_primitive().tensor()
}

fn tensor<F: FloatElement, I: IntElement, BT: BoolElement>(t: Result<burn_cubecl::tensor::CubeTensor<CudaRuntime>, String>) -> Result<Tensor<Cuda<F, I, BT>, 1>, CommError> {
    t.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t))).map_err(|message| CommError::Io { rank: None, message })
}

fn reduce(op: ReduceOp) -> NcclReduce {
    match op {
        ReduceOp::Sum => NcclReduce::Sum,
        ReduceOp::Max => NcclReduce::Max,
    }
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> Communicator<Cuda<F, I, BT>> for NcclCommunicator {
    fn group(&self) -> ProcessGroup {
        self.group
    }

    fn all_reduce(&self, x: Tensor<Cuda<F, I, BT>, 1>, op: ReduceOp) -> Result<Tensor<Cuda<F, I, BT>, 1>, CommError> {
        tensor(self.nccl.all_reduce(cube(x), reduce(op)))
    }

    fn all_gather(&self, x: Tensor<Cuda<F, I, BT>, 1>) -> Result<Tensor<Cuda<F, I, BT>, 1>, CommError> {
        tensor(self.nccl.all_gather(cube(x)))
    }

    fn reduce_scatter(&self, x: Tensor<Cuda<F, I, BT>, 1>, op: ReduceOp) -> Result<Tensor<Cuda<F, I, BT>, 1>, CommError> {
        tensor(self.nccl.reduce_scatter(cube(x), reduce(op)))
    }

    fn all_to_all(&self, x: Tensor<Cuda<F, I, BT>, 1>, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor<Cuda<F, I, BT>, 1>, CommError> {
        tensor(self.nccl.all_to_all(cube(x), send_counts, recv_counts))
    }

    fn all_to_all_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>, CommError> {
        self.host.all_to_all_counts(send_counts)
    }

    fn all_to_all_count_blocks(&self, send: &[usize], per_rank: usize) -> Result<Vec<usize>, CommError> {
        self.host.all_to_all_count_blocks(send, per_rank)
    }

    fn broadcast(&self, x: Tensor<Cuda<F, I, BT>, 1>, root: usize) -> Result<Tensor<Cuda<F, I, BT>, 1>, CommError> {
        tensor(self.nccl.broadcast(cube(x), root))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.host.barrier_host()
    }
}
