//! Picking the Burn backend a recipe runs on: `device = "cpu" | "cuda" | "auto"`.
//!
//! Model code is generic over the backend; this is the one place that names concrete ones.
//! CPU is burn-ndarray in f32. CUDA (built with `--features cuda`) stores and computes in the
//! recipe's `model.dtype`.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use kernels_cubecl::{FusedAttentionBackend, FusedCrossEntropyBackend, FusedLayerBackend, FusedOptimizerBackend};

#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "cuda")]
mod compute_stream;
pub mod profile;

use crate::error::Result;
use crate::recipe::{DType, Device};

/// The backends trainer's models run on: Burn's backend with the hot-path operations of
/// `kernels-cubecl` (blockwise attention, the fused linear cross-entropy, RMSNorm, SwiGLU,
/// rotary, the AdamW update and the gradients' sum of squares), each a plain-Burn reference by default and a CubeCL kernel where the backend has one
/// (CUDA in a `cuda` build, wgpu in kernels-cubecl's tests), with its own backward on
/// `Autodiff<B>`. Which implementation runs is the backend's declaration, not a run-time test.
pub trait TrainBackend: FusedAttentionBackend + FusedCrossEntropyBackend + FusedLayerBackend + FusedOptimizerBackend {}

impl<B> TrainBackend for B where B: FusedAttentionBackend + FusedCrossEntropyBackend + FusedLayerBackend + FusedOptimizerBackend {}

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
    let device = CudaDevice::default();
    cublas::register_with_kernels();
    match dtype {
        DType::Bf16 => job.run::<Cuda<half::bf16>>(device),
        DType::F16 => job.run::<Cuda<half::f16>>(device),
        DType::F32 => job.run::<Cuda<f32>>(device),
    }
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

/// [`DeviceMemory`] of `device` on CUDA; `None` on backends without a device allocator (CPU).
pub fn device_memory<B: Backend>(device: &B::Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    {
        use cubecl::Runtime;
        let device = cast::<B::Device, cubecl::cuda::CudaDevice>(device.clone()).ok()?;
        let usage = cubecl::cuda::CudaRuntime::client(&device).memory_usage().ok()?;
        Some(DeviceMemory { in_use: usage.bytes_in_use, reserved: usage.bytes_reserved })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        None
    }
}

/// `x @ w` of a linear layer (`x: [..., in]`, `w: [in, out]`): cuBLAS on CUDA in bf16 / f16
/// (`cublas.rs`), Burn's matmul on every other backend.
pub fn linear_matmul<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    #[cfg(feature = "cuda")]
    let (x, w) = match cublas::try_matmul(x, w) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    x.matmul(w.unsqueeze())
}

/// `x @ w` for a batch of matrices (`x: [batch, m, k]`, `w: [batch, k, n]`; a MoE block's
/// experts): one strided batched cuBLAS GEMM on CUDA in bf16 / f16 / f32, Burn's matmul on every
/// other backend.
pub fn batched_matmul<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    let (x, w) = match cublas::try_batched_matmul(x, w) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    x.matmul(w)
}

pub(crate) fn same<T: 'static, U: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>()
}

/// `t` as a `U` when `T` is `U`, else `t` back: how generic model code reaches a kernel that
/// exists only for concrete backends (a type check, no unsafe casts).
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> std::result::Result<U, T> {
    use std::any::Any;
    let mut slot = Some(t);
    let taken = (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>().and_then(Option::take);
    match (taken, slot) {
        (Some(u), _) => Ok(u),
        (None, Some(t)) => Err(t),
        // `taken` is only None when the downcast failed, which leaves `slot` untouched.
        (None, None) => unreachable!("a failed downcast took the value"),
    }
}

static HOST_SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Times the host has waited for the device inside trainer's own code (a read of a value, a
/// synchronised GEMM), since the process started: `trainer bench` reports them per step.
pub fn host_syncs() -> u64 {
    HOST_SYNCS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn count_host_syncs(n: u64) {
    HOST_SYNCS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
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
