//! NCCL collectives on the memory of Burn's CUDA tensors, one communicator per process group
//! (`ncclCommInitRank` with an id the caller carries between processes), for multi-process and
//! multi-node jobs: one process per GPU, as torchrun and Megatron run them.
//!
//! Ordering with CubeCL is cuBLAS's (`cublas.rs`): each collective is queued on CubeCL's compute
//! stream of the calling thread (found once through CUPTI, `compute_stream.rs`), from CubeCL's
//! device thread behind the launches queued before it, so the stream orders the collective with
//! the kernels that produce its input and consume its output, and the host never waits. Where
//! that stream cannot be found, a collective waits for the device, runs on a stream of its own
//! and waits for that stream.
//!
//! Tensors are flat and contiguous (`[n]`); outputs are new tensors of the input's dtype (bf16,
//! f16 or f32).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::cuda::CudaDevice;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result as nccl, sys};

use super::cublas::OnDeviceThread;

/// How a reduction combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclReduce {
    Sum,
    Max,
}

/// A new NCCL unique id (128 bytes): made by one rank of a group and handed to the others (the
/// rendezvous carries it), each of which passes it to [`NcclComm::new`].
pub fn unique_id() -> Result<Vec<u8>, String> {
    let id = nccl::get_uniqueid().map_err(|e| format!("ncclGetUniqueId: {e:?} (is libnccl on the loader's path?)"))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank's NCCL communicator of a process group, on one GPU.
#[derive(Debug)]
pub struct NcclComm {
    comm: Mutex<Comm>,
    rank: usize,
    size: usize,
    device: CudaDevice,
    ctx: Arc<CudaContext>,
}

#[derive(Debug)]
struct Comm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (the mutex).
unsafe impl Send for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = live.iter().position(|&c| c == self.0 as usize) {
            live.swap_remove(i);
            // SAFETY: a live communicator (not aborted: `abort_all` takes it out of `LIVE`),
            // destroyed once.
            let _ = unsafe { nccl::comm_destroy(self.0) };
        }
    }
}

/// This process's live communicators, for [`abort_all`]: a communicator may be aborted from any
/// thread while another waits on it.
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Abort every NCCL communicator of this process (`ncclCommAbort`), so that collectives
/// waiting on a peer that died end and the process can exit: what a watchdog does before it
/// ends a rank. The communicators are unusable afterwards.
pub fn abort_all() {
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    for comm in live.drain(..) {
        // SAFETY: a communicator NCCL made and nobody destroyed (it was still in `LIVE`).
        let _ = unsafe { nccl::comm_abort(comm as sys::ncclComm_t) };
    }
}

impl NcclComm {
    /// Rank `rank` of `size` ranks that share `id` (from [`unique_id`]); blocks until every rank
    /// has joined (NCCL's `ncclCommInitRank`).
    pub fn new(device: &CudaDevice, rank: usize, size: usize, id: &[u8]) -> Result<Self, String> {
        if id.len() != 128 {
            return Err(format!("an NCCL unique id is 128 bytes, got {}", id.len()));
        }
        let ctx = CudaContext::new(device.index).map_err(|e| format!("CUDA device {}: {e:?}", device.index))?;
        ctx.bind_to_thread().map_err(|e| format!("CUDA context: {e:?}"))?;
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the id is the group's.
        unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), size as i32, uid, rank as i32) }
            .map_err(|e| format!("ncclCommInitRank (rank {rank} of {size}): {e:?}"))?;
        // SAFETY: initialised by the successful call above.
        let comm = Comm(unsafe { comm.assume_init() });
        LIVE.lock().unwrap_or_else(|p| p.into_inner()).push(comm.0 as usize);
        Ok(NcclComm { comm: Mutex::new(comm), rank, size, device: device.clone(), ctx })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Every rank's `x` combined by `op`: `[n]` → `[n]`.
    pub fn all_reduce(&self, x: CubeTensor<CudaRuntime>, op: NcclReduce) -> Result<CubeTensor<CudaRuntime>, String> {
        let n = x.shape().num_elements();
        self.collective(x, n, "ncclAllReduce", move |send, recv, dtype, comm, stream| unsafe {
            nccl::all_reduce(send as _, recv as _, n, dtype, reduce_op(op), comm, stream as _)
        })
    }

    /// The ranks' `x` end to end in rank order: `[n]` → `[size n]`.
    pub fn all_gather(&self, x: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>, String> {
        let n = x.shape().num_elements();
        self.collective(x, n * self.size, "ncclAllGather", move |send, recv, dtype, comm, stream| unsafe {
            nccl::all_gather(send as _, recv as _, n, dtype, comm, stream as _)
        })
    }

    /// Block `rank` of every rank's `x` combined by `op`: `[size n]` → `[n]`.
    pub fn reduce_scatter(&self, x: CubeTensor<CudaRuntime>, op: NcclReduce) -> Result<CubeTensor<CudaRuntime>, String> {
        let total = x.shape().num_elements();
        if total % self.size != 0 {
            return Err(format!("reduce-scatter of {total} elements over {} ranks", self.size));
        }
        let n = total / self.size;
        self.collective(x, n, "ncclReduceScatter", move |send, recv, dtype, comm, stream| unsafe {
            nccl::reduce_scatter(send as _, recv as _, n, dtype, reduce_op(op), comm, stream as _)
        })
    }

    /// Rank `root`'s `x` on every rank.
    pub fn broadcast(&self, x: CubeTensor<CudaRuntime>, root: usize) -> Result<CubeTensor<CudaRuntime>, String> {
        let n = x.shape().num_elements();
        self.collective(x, n, "ncclBroadcast", move |send, recv, dtype, comm, stream| unsafe {
            nccl::broadcast(send as _, recv as _, n, dtype, root as i32, comm, stream as _)
        })
    }

    /// Uneven all-to-all: `x` holds `send[j]` elements for rank `j` after one another; the result
    /// `recv[j]` elements from rank `j` after one another (one NCCL group of sends and receives).
    pub fn all_to_all(&self, x: CubeTensor<CudaRuntime>, send: &[usize], recv: &[usize]) -> Result<CubeTensor<CudaRuntime>, String> {
        if send.len() != self.size || recv.len() != self.size || send.iter().sum::<usize>() != x.shape().num_elements() {
            return Err(format!("all-to-all counts {send:?} / {recv:?} for {} elements over {} ranks", x.shape().num_elements(), self.size));
        }
        let (send, recv) = (send.to_vec(), recv.to_vec());
        let total: usize = recv.iter().sum();
        self.collective(x, total, "ncclSend/ncclRecv", move |s, r, dtype, comm, stream| {
            let width = dtype_size(dtype);
            nccl::group_start()?;
            let (mut so, mut ro) = (0, 0);
            for peer in 0..send.len() {
                // SAFETY: offsets inside the send and receive buffers (counts checked above).
                unsafe {
                    if send[peer] > 0 {
                        nccl::send((s + (so * width) as u64) as _, send[peer], dtype, peer as i32, comm, stream as _)?;
                    }
                    if recv[peer] > 0 {
                        nccl::recv((r + (ro * width) as u64) as _, recv[peer], dtype, peer as i32, comm, stream as _)?;
                    }
                }
                so += send[peer];
                ro += recv[peer];
            }
            nccl::group_end()
        })
    }

    /// Queue `call(send, recv, dtype, comm, stream)` over `x` (made contiguous) and a new output
    /// of `out_len` elements, ordered with CubeCL's kernels (see the module).
    fn collective(
        &self,
        x: CubeTensor<CudaRuntime>,
        out_len: usize,
        what: &'static str,
        call: impl FnOnce(u64, u64, sys::ncclDataType_t, sys::ncclComm_t, CUstream) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<CubeTensor<CudaRuntime>, String> {
        let x = into_contiguous(x);
        let dtype = nccl_type(x.dtype)?;
        let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([out_len]), x.dtype);
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let ordering = stream_for(&self.device);
        let enqueue = |stream: CUstream| {
            let resource = |t: &CubeTensor<CudaRuntime>| t.client.get_resource(t.handle.clone()).map_err(|e| format!("device memory of an NCCL buffer: {e:?}"));
            let (gx, go) = (resource(&x)?, resource(&out)?);
            self.ctx.bind_to_thread().map_err(|e| format!("CUDA context for {what}: {e:?}"))?;
            call(gx.resource().ptr, go.resource().ptr, dtype, comm.0, stream).map_err(|e| format!("{what} (rank {} of {}): {e:?}", self.rank, self.size))?;
            Ok::<_, String>((gx, go))
        };
        match ordering {
            Ok(stream) => {
                let task = OnDeviceThread(move || enqueue(stream).map(drop));
                x.client.exclusive(move || task.run()).map_err(|e| format!("CubeCL's device thread: {e:?}"))??;
            }
            Err(own) => {
                <CubeBackend<CudaRuntime, f32, i32, u8> as Backend>::sync(&self.device).map_err(|e| format!("device sync before {what}: {e:?}"))?;
                let guards = enqueue(own.cu_stream())?;
                own.synchronize().map_err(|e| format!("{what}'s stream: {e:?}"))?;
                drop(guards);
            }
        }
        Ok(out)
    }
}

/// CubeCL's compute stream of the calling thread on `device`, or (when it cannot be found) a
/// stream of this module's own, to be synchronised around each call.
fn stream_for(device: &CudaDevice) -> Result<CUstream, Arc<CudaStream>> {
    type Streams = HashMap<(usize, u64), Result<usize, Arc<CudaStream>>>;
    static STREAMS: OnceLock<Mutex<Streams>> = OnceLock::new();
    let key = (device.index, cubecl::stream_id::StreamId::current().value);
    let mut all = STREAMS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let found = all.entry(key).or_insert_with(|| match super::compute_stream::find(device) {
        Ok(stream) => Ok(stream as usize),
        Err(why) => {
            eprintln!("NCCL collectives synchronise the device around each call: CubeCL's stream not found ({why})");
            let ctx = CudaContext::new(device.index).unwrap_or_else(|e| panic!("CUDA device {}: {e:?}", device.index));
            Err(ctx.new_stream().unwrap_or_else(|e| panic!("CUDA stream: {e:?}")))
        }
    });
    match found {
        Ok(stream) => Ok(*stream as CUstream),
        Err(own) => Err(own.clone()),
    }
}

fn reduce_op(op: NcclReduce) -> sys::ncclRedOp_t {
    match op {
        NcclReduce::Sum => sys::ncclRedOp_t::ncclSum,
        NcclReduce::Max => sys::ncclRedOp_t::ncclMax,
    }
}

fn nccl_type(d: DType) -> Result<sys::ncclDataType_t, String> {
    match d {
        DType::F32 => Ok(sys::ncclDataType_t::ncclFloat32),
        DType::BF16 => Ok(sys::ncclDataType_t::ncclBfloat16),
        DType::F16 => Ok(sys::ncclDataType_t::ncclFloat16),
        other => Err(format!("NCCL collectives here move bf16, f16 or f32 tensors, not {other:?}")),
    }
}

fn dtype_size(d: sys::ncclDataType_t) -> usize {
    match d {
        sys::ncclDataType_t::ncclFloat32 => 4,
        _ => 2,
    }
}
