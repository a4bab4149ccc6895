//! `CubeBackend`'s device memory: what its allocator holds, and new tensors written from the host
//! ([`DeviceMemoryBackend::float_from_fill`]), per runtime through [`UploadRuntime`].
//!
//! Burn's `from_data` hands CubeCL one pageable buffer, which CubeCL copies again on one core
//! before the driver stages it through pinned memory of its own: Qwen3-30B-A3B's 61 GB of bf16
//! weights went up at 0.78 GB/s on an H100 (79 of the build's 101 s, benches/RESULTS.md session
//! 25). On CUDA the values are written by all cores straight into pinned staging buffers, each
//! copied by DMA while the next one is written.

use burn::tensor::{Shape, Tensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::device::{host_float_from_fill, DeviceMemory, DeviceMemoryBackend, Fill};

/// How a CubeCL runtime fills new tensors from the host.
pub trait UploadRuntime: CubeRuntime {
    /// A contiguous tensor of `shape` in `F`'s dtype on `device`, written by `fill` through the
    /// runtime's own staging; `None` where it has none (then the tensor comes through
    /// `Tensor::from_data`).
    fn staged_upload<F: FloatElement>(shape: &Shape, device: &Self::Device, fill: &Fill<'_, F>) -> Option<CubeTensor<Self>> {
        let _ = (shape, device, fill);
        None
    }
}

#[cfg(feature = "wgpu")]
impl UploadRuntime for cubecl::wgpu::WgpuRuntime {}

impl<R: UploadRuntime, F: FloatElement, I: IntElement, BT: BoolElement> DeviceMemoryBackend for CubeBackend<R, F, I, BT> {
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        let usage = <R as cubecl::Runtime>::client(device).memory_usage().ok()?;
        Some(DeviceMemory { in_use: usage.bytes_in_use, reserved: usage.bytes_reserved })
    }

    fn float_from_fill<const D: usize>(shape: Shape, device: &Self::Device, fill: &Fill<'_, F>) -> Tensor<Self, D> {
        assert_eq!(shape.num_dims(), D, "a {D}-dimensional tensor from the shape {shape:?}");
        match R::staged_upload(&shape, device, fill) {
            Some(t) => super::float(t),
            None => host_float_from_fill(shape, device, fill),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use burn::backend::cuda::CudaDevice;
    use burn::tensor::backend::Backend;
    use burn::tensor::Shape;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{CubeBackend, FloatElement};
    use cubecl::cuda::CudaRuntime;
    use cubecl::Runtime;
    use cudarc::driver::{result, sys, CudaContext, CudaStream};


    use super::UploadRuntime;
    use crate::device::{fill_on_all_cores, Fill};

    /// Bytes of one staging buffer: large against a copy's fixed cost, small enough that writing
    /// one on all cores overlaps the copy of the other.
    const STAGE_BYTES: usize = 64 << 20;

    /// Two pinned host buffers of [`STAGE_BYTES`], each with the event of its last copy, and the
    /// stream the copies run on; one a device, kept (128 MiB pinned) until the process ends.
    struct Stager {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        buffers: [(*mut u8, sys::CUevent); 2],
    }

    // SAFETY: the pinned buffers and events belong to the stager alone, used under its mutex;
    // CUDA handles may be used from any thread with the context bound.
    unsafe impl Send for Stager {}

    impl Stager {
        fn new(index: usize) -> Result<Self, String> {
            let ctx = CudaContext::new(index).map_err(|e| format!("CUDA device {index}: {e:?}"))?;
            ctx.bind_to_thread().map_err(|e| format!("CUDA context: {e:?}"))?;
            let stream = ctx.new_stream().map_err(|e| format!("CUDA stream: {e:?}"))?;
            let buffer = || -> Result<(*mut u8, sys::CUevent), String> {
                // SAFETY: a plain allocation of page-locked host memory, kept for the process.
                let host = unsafe { result::malloc_host(STAGE_BYTES, 0) }.map_err(|e| format!("pinned host memory: {e:?}"))?;
                let done = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| format!("CUDA event: {e:?}"))?;
                Ok((host.cast(), done))
            };
            Ok(Self { buffers: [buffer()?, buffer()?], ctx, stream })
        }
    }

    /// The stagers by device index; `Err` remembers why a device has none.
    static STAGERS: Mutex<BTreeMap<usize, Result<Stager, String>>> = Mutex::new(BTreeMap::new());

    impl UploadRuntime for CudaRuntime {
        fn staged_upload<F: FloatElement>(shape: &Shape, device: &CudaDevice, fill: &Fill<'_, F>) -> Option<CubeTensor<Self>> {
            if super::super::env_is("TRAINER_PINNED_UPLOAD", "0") {
                return None;
            }
            let mut stagers = STAGERS.lock().unwrap_or_else(|e| e.into_inner());
            let stager = stagers.entry(device.index).or_insert_with(|| {
                Stager::new(device.index).inspect_err(|why| eprintln!("weights uploaded through Burn's from_data: no pinned staging ({why})"))
            });
            let stager = stager.as_ref().ok()?;
            let client = Self::client(device);
            let t = empty_device_contiguous_dtype(client.clone(), device.clone(), shape.clone(), F::dtype());
            let n = shape.num_elements();
            if n == 0 {
                return Some(t);
            }
            // New memory may be a dropped tensor's that queued kernels still read: they finish
            // before the copies (on a stream of their own) overwrite it.
            if let Err(e) = <CubeBackend<CudaRuntime, f32, i32, u8> as Backend>::sync(device) {
                panic!("device sync before an upload failed: {e:?}");
            }
            let guard = client.get_resource(t.handle.clone()).unwrap_or_else(|e| panic!("device memory of an upload: {e:?}"));
            let base = guard.resource().ptr;
            if let Err(e) = stager.ctx.bind_to_thread() {
                panic!("CUDA context for an upload: {e:?}");
            }
            let per = STAGE_BYTES / size_of::<F>();
            let stream = stager.stream.cu_stream();
            for (i, start) in (0..n).step_by(per).enumerate() {
                let (host, done) = stager.buffers[i % 2];
                let len = per.min(n - start);
                // SAFETY: `done` is this buffer's last copy (or never recorded, then done at
                // once); after it the buffer is ours to write. The buffer holds STAGE_BYTES,
                // `len` values of F fit it, and pinned allocations are page-aligned.
                let values = unsafe {
                    result::event::synchronize(done).unwrap_or_else(|e| panic!("upload copy: {e:?}"));
                    std::slice::from_raw_parts_mut(host.cast::<F>(), len)
                };
                fill_on_all_cores(start, values, fill);
                // SAFETY: the destination is `t`'s contiguous memory (held by `guard`), `len`
                // values from `start` within it; the source stays untouched until `done`.
                unsafe {
                    result::memcpy_htod_async(base + (start * size_of::<F>()) as u64, &*values, stream).unwrap_or_else(|e| panic!("upload copy: {e:?}"));
                    result::event::record(done, stream).unwrap_or_else(|e| panic!("upload copy: {e:?}"));
                }
            }
            // The tensor is whole before CubeCL's kernels (on its own stream) read it.
            stager.stream.synchronize().unwrap_or_else(|e| panic!("upload copy: {e:?}"));
            drop(guard);
            Some(t)
        }
    }
}
