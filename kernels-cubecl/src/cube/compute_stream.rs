//! CubeCL's compute stream, found once per device and thread, so that cuBLAS can queue its GEMMs
//! on it in order with CubeCL's kernels instead of synchronising the device around each one.
//!
//! cubecl-cuda 0.10 runs each thread's kernels on a CUDA stream of its own, created and held
//! inside its server (`MultiStream`), and no public API names it. What is public is the CUDA
//! driver's profiling interface: CUPTI's callback API hands a subscriber the parameters of every
//! driver call, `cuLaunchKernel`'s `hStream` among them. [`find`] subscribes, launches one tiny
//! kernel through Burn on the calling thread, reads the stream that launch named, and
//! unsubscribes: a one-off probe, no callback stays installed. The stream is that thread's for
//! the life of the process (CubeCL keys streams by thread and never replaces them).
//!
//! Ordering on that stream still needs the host side in order: CubeCL issues its launches from a
//! device thread fed by a queue, so a GEMM enqueued from the caller's thread could overtake
//! kernels still in that queue. `cublas.rs` therefore enqueues each GEMM from the device thread
//! itself (`ComputeClient::exclusive`), after everything queued before it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use burn::backend::cuda::CudaDevice;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;
use cudarc::cupti::{result as cupti, sys as csys};
use cudarc::driver::sys::CUstream;

/// The streams `cuLaunchKernel` named while the probe listened: the first, and whether any other
/// was seen (then the probe cannot tell which is the thread's).
static SEEN: AtomicUsize = AtomicUsize::new(0);
static AMBIGUOUS: AtomicUsize = AtomicUsize::new(0);

/// The driver calls heard: `cuLaunchKernel` and its per-thread-default-stream twin, which take
/// the same parameters.
const LAUNCHES: [csys::CUpti_driver_api_trace_cbid; 2] = [
    csys::CUpti_driver_api_trace_cbid::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel,
    csys::CUpti_driver_api_trace_cbid::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz,
];

unsafe extern "C" fn on_driver_call(_: *mut std::ffi::c_void, domain: csys::CUpti_CallbackDomain, cbid: csys::CUpti_CallbackId, data: *const std::ffi::c_void) {
    if domain != csys::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API || !LAUNCHES.iter().any(|&l| l as u32 == cbid) || data.is_null() {
        return;
    }
    // SAFETY: CUPTI passes a `CUpti_CallbackData` for driver-API callbacks, whose
    // `functionParams` point at the called function's parameter struct (`cuLaunchKernel_params`
    // for these callback ids), valid for the duration of the callback.
    let stream = unsafe {
        let data = &*(data as *const csys::CUpti_CallbackData);
        if data.callbackSite != csys::CUpti_ApiCallbackSite::CUPTI_API_ENTER || data.functionParams.is_null() {
            return;
        }
        (*(data.functionParams as *const csys::cuLaunchKernel_params)).hStream as usize
    };
    if let Err(first) = SEEN.compare_exchange(0, stream, Ordering::SeqCst, Ordering::SeqCst) {
        if first != stream {
            AMBIGUOUS.store(1, Ordering::SeqCst);
        }
    }
}

/// CubeCL's compute stream of the calling thread on `device`, or why it could not be found.
pub fn find(device: &CudaDevice) -> Result<CUstream, String> {
    // One probe at a time: the callback's findings are process-wide.
    static PROBE: Mutex<()> = Mutex::new(());
    let _one = PROBE.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: a plain library presence check (dlopen of each candidate name).
    if !unsafe { csys::is_culib_present() } {
        return Err("libcupti not found (add CUDA's extras/CUPTI/lib64 to LD_LIBRARY_PATH)".into());
    }
    type Probe = CubeBackend<CudaRuntime, f32, i32, u8>;
    // The probe's kernel compiled and its input uploaded before listening, so the launch heard
    // is the one below.
    let x = Tensor::<Probe, 1>::from_floats([1.0, 2.0], device);
    let _ = x.clone().mul_scalar(3.0);
    Probe::sync(device).map_err(|e| format!("device sync: {e:?}"))?;
    SEEN.store(0, Ordering::SeqCst);
    AMBIGUOUS.store(0, Ordering::SeqCst);
    let mut subscriber: csys::CUpti_SubscriberHandle = std::ptr::null_mut();
    // SAFETY: `on_driver_call` matches CUPTI's callback signature and only reads the data CUPTI
    // hands it; the subscriber is released below on every path.
    unsafe { cupti::subscribe(&mut subscriber, Some(on_driver_call), std::ptr::null_mut()) }
        .map_err(|e| format!("cuptiSubscribe: {e:?} (another profiler attached?)"))?;
    let listened = (|| {
        for launch in LAUNCHES {
            // SAFETY: the subscriber was just created.
            unsafe { cupti::enable_callback(1, subscriber, csys::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API, launch as u32) }
                .map_err(|e| format!("cuptiEnableCallback: {e:?}"))?;
        }
        let y = x.mul_scalar(3.0);
        Probe::sync(device).map_err(|e| format!("device sync: {e:?}"))?;
        drop(y);
        Ok::<_, String>(())
    })();
    // SAFETY: the subscriber is live; unsubscribing also disables its callbacks.
    let released = unsafe { cupti::unsubscribe(subscriber) };
    listened?;
    released.map_err(|e| format!("cuptiUnsubscribe: {e:?}"))?;
    match (SEEN.load(Ordering::SeqCst), AMBIGUOUS.load(Ordering::SeqCst)) {
        (0, _) => Err("the probe kernel's launch was not seen".into()),
        (_, 1) => Err("launches on more than one stream during the probe".into()),
        (stream, _) => Ok(stream as CUstream),
    }
}
