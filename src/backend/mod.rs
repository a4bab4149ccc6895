//! Picking the Burn backend a recipe runs on: `device = "cpu" | "cuda" | "auto"`.
//!
//! Model code is generic over the backend; this is the one place that names concrete ones.
//! CPU is burn-ndarray in f32. CUDA (built with `--features cuda`) stores and computes in the
//! recipe's `model.dtype`.

use kernels_cubecl::{
    DeviceMemoryBackend, ExpertRoutingBackend, FusedAttentionBackend, FusedCrossEntropyBackend, FusedLayerBackend, FusedOptimizerBackend, LinearBackend,
};

pub mod device_monitor;
#[cfg(feature = "cuda")]
pub mod gpu_check;
pub mod out_of_memory;
pub mod profile;

use crate::error::Result;
use crate::model::routing::RowRoutingBackend;
use crate::parallel::regions::RegionBackend;
use crate::recipe::{DType, Device};

/// The backends trainer's models run on: Burn's backend with the hot-path operations of
/// `kernels-cubecl` (the linear layers' GEMMs and the LoRA linear layer, blockwise attention,
/// the fused linear cross-entropy, RMSNorm, SwiGLU, rotary, the AdamW update and the gradients'
/// sum of squares) and its device memory, each a plain-Burn reference by default and a CubeCL
/// kernel or cuBLAS where the backend has one (CUDA in a `cuda` build, wgpu in kernels-cubecl's
/// tests), with its own backward on `Autodiff<B>`, and the collectives of parallel layouts
/// ([`RegionBackend`]: region ops whose backward is the dual collective). Which implementation
/// runs is the backend's declaration, not a run-time test.
pub trait TrainBackend:
    LinearBackend + FusedAttentionBackend + FusedCrossEntropyBackend + FusedLayerBackend + FusedOptimizerBackend + DeviceMemoryBackend + ExpertRoutingBackend + RegionBackend + RowRoutingBackend
{
}

impl<B> TrainBackend for B where
    B: LinearBackend
        + FusedAttentionBackend
        + FusedCrossEntropyBackend
        + FusedLayerBackend
        + FusedOptimizerBackend
        + DeviceMemoryBackend
        + ExpertRoutingBackend
        + RegionBackend
        + RowRoutingBackend
{
}

/// Work that can run on any backend.
pub trait BackendJob {
    type Output;
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Self::Output>;
}

pub type Cpu = burn::backend::NdArray<f32>;

/// Whether this binary can use CUDA and a driver is present.
pub fn cuda_available() -> bool {
    cfg!(feature = "cuda") && std::path::Path::new("/proc/driver/nvidia").exists()
}

/// The device `auto` resolves to on this machine.
pub fn resolve(device: Device) -> Device {
    match device {
        Device::Auto if cuda_available() => Device::Cuda,
        Device::Auto => Device::Cpu,
        d => d,
    }
}

/// Run `job` on the backend for `device` and `dtype`.
pub fn dispatch<J: BackendJob>(device: Device, dtype: DType, job: J) -> Result<J::Output> {
    match resolve(device) {
        Device::Cuda => run_cuda(dtype, job),
        _ => job.run::<Cpu>(Default::default()),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<J: BackendJob>(dtype: DType, job: J) -> Result<J::Output> {
    use burn::backend::cuda::{Cuda, CudaDevice};
    let device = CudaDevice::new(cuda_ordinal()?);
    match dtype {
        DType::Bf16 => job.run::<Cuda<half::bf16>>(device),
        DType::F16 => job.run::<Cuda<half::f16>>(device),
        DType::F32 => job.run::<Cuda<f32>>(device),
    }
}

/// The CUDA device this process trains on: ranks on one machine take one GPU each, by their
/// local rank, as torchrun's do; a single process takes the first.
#[cfg(feature = "cuda")]
fn cuda_ordinal() -> Result<usize> {
    Ok(crate::parallel::launch::RankEnv::from_env()?.map_or(0, |env| env.local_rank))
}

/// NVML's counters of the GPU this process trains on when `device` resolves to CUDA; `None` on
/// CPU, in a build without CUDA, or where NVML cannot be loaded.
pub fn device_monitor(device: Device) -> Option<device_monitor::DeviceMonitor> {
    #[cfg(feature = "cuda")]
    if resolve(device) == Device::Cuda {
        return device_monitor::nvml(cuda_ordinal().ok()?);
    }
    let _ = device;
    None
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: BackendJob>(_dtype: DType, _job: J) -> Result<J::Output> {
    Err(crate::error::Error::Unsupported(
        "device = \"cuda\", but this trainer binary was built without CUDA; rebuild with \
         `cargo build --release --features cuda`, or set device = \"cpu\" or \"auto\""
            .into(),
    ))
}

/// The device allocator's view of memory, in bytes: what live tensors hold and what its pools
/// reserve from the driver. Pools grow to a step's peak and are kept, so `reserved` after a step
/// is the step's high-water mark (torch's `max_memory_reserved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceMemory {
    pub in_use: u64,
    pub reserved: u64,
}

/// `bytes` in GiB (2^30 bytes).
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// [`DeviceMemory`] of `device` on CUDA; `None` on backends without a device allocator (CPU).
pub fn device_memory<B: TrainBackend>(device: &B::Device) -> Option<DeviceMemory> {
    B::device_memory(device).map(|m| DeviceMemory { in_use: m.in_use, reserved: m.reserved })
}

static HOST_SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Times the host has waited for the device inside trainer's own code (a read of a value, a
/// synchronised GEMM), since the process started: `trainer bench` reports them per step.
pub fn host_syncs() -> u64 {
    #[cfg(feature = "cuda")]
    let gemms = kernels_cubecl::gemm_host_syncs();
    #[cfg(not(feature = "cuda"))]
    let gemms = 0;
    HOST_SYNCS.load(std::sync::atomic::Ordering::Relaxed) + gemms
}

pub(crate) fn count_host_syncs(n: u64) {
    HOST_SYNCS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

static HOST_WAIT_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Seconds the host has spent blocked in the device reads that the model's layers make (a
/// mixture of experts' counts), since the process started: with the GPU's busy fraction it
/// tells a host-bound step (little waiting, GPU idle) from a device-bound one.
pub fn host_wait_seconds() -> f64 {
    HOST_WAIT_NANOS.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
}

/// `read` run as one counted host sync, its time added to [`host_wait_seconds`].
pub(crate) fn timed_read<T>(read: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let out = read();
    HOST_WAIT_NANOS.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    count_host_syncs(1);
    out
}

/// What one rank has to hold its share of a job, in bytes, and what it is: the machine's
/// memory for the CPU backend, the first GPU's for CUDA; `None` where this machine cannot tell
/// (CUDA asked for on a machine without a GPU or without CUDA in this binary).
pub fn memory_capacity(device: Device) -> Option<(u64, &'static str)> {
    match resolve(device) {
        Device::Cuda => gpu_memory().map(|b| (b, "GPU memory")),
        _ => host_memory().map(|b| (b, "host memory")),
    }
}

/// GPUs this machine's CUDA sees (0 without CUDA in this binary or without a GPU).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    if cuda_available() {
        use cudarc::driver::result;
        if result::init().is_ok() {
            return result::device::get_count().map_or(0, |n| n.max(0) as usize);
        }
    }
    0
}

/// `MemTotal` of /proc/meminfo (Linux).
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(feature = "cuda")]
fn gpu_memory() -> Option<u64> {
    if !cuda_available() {
        return None;
    }
    use cudarc::driver::result;
    result::init().ok()?;
    let dev = result::device::get(0).ok()?;
    // SAFETY: a device handle just returned by the driver.
    unsafe { result::device::total_mem(dev) }.ok().map(|b| b as u64)
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory() -> Option<u64> {
    None
}
