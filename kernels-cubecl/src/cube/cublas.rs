//! cuBLAS GEMMs for CubeCL's CUDA runtime (bf16 / f16 / f32 operands, f32 accumulation), on the
//! memory of Burn's own tensors: [`GemmRuntime`] for `CudaRuntime`, so every `CubeBackend` on
//! CUDA runs its linear layers, its batched and grouped expert GEMMs (`cublas_grouped.rs`) and
//! this crate's kernels' GEMMs here.
//!
//! Burn's CUDA matmul reaches 218 TFLOP/s on an H200 where cuBLAS reaches 783 on the same memory
//! (shared/PLATFORM.md). `TRAINER_CUBLAS=0` turns it off (CubeCL's matmul everywhere), for
//! comparisons.
//!
//! Ordering with CubeCL: each GEMM is queued on CubeCL's own compute stream of the calling thread
//! (found once through CUPTI, `compute_stream.rs`), from CubeCL's device thread behind the
//! launches queued before it, so the stream orders the GEMM with the kernels that produce and
//! consume its operands and the host never waits for the device. Where that stream cannot be
//! found (no libcupti, another profiler attached) or `TRAINER_GEMM_ORDER=sync` asks, a GEMM
//! waits for the device to finish the work queued before it (`Backend::sync`), runs on a cuBLAS
//! stream of the same primary context, and waits for that stream before returning.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::{result as blas, sys};
use cudarc::driver::{CudaContext, CudaStream};

use super::gemm::{cubecl_gemm, cubecl_gemm_batched, cubecl_gemm_grouped, cubecl_gemm_grouped_outer, GemmRuntime};
use super::float;

pub(super) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TRAINER_CUBLAS").map_or(true, |v| v != "0"))
}

/// The dtypes cuBLAS takes here, as operands and as output.
pub(super) fn handled(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16 | DType::F32)
}

impl GemmRuntime for CudaRuntime {
    fn gemm<F: FloatElement, I: IntElement, BT: BoolElement>(
        a: CubeTensor<Self>,
        ta: bool,
        b: CubeTensor<Self>,
        tb: bool,
        alpha: f64,
        out: DType,
        acc: Option<CubeTensor<Self>>,
    ) -> CubeTensor<Self> {
        if enabled() && handled(a.dtype) && a.dtype == b.dtype && handled(out) {
            match acc {
                // cuBLAS adds into the accumulator's memory: only when it is the sole owner
                // of a contiguous buffer; else the sum goes into new memory.
                Some(c) if !(c.is_contiguous() && c.can_mut()) => {
                    let y = gemm_general(a, ta, b, tb, alpha, out, None);
                    let sum = |t| burn::tensor::Tensor::<CubeBackend<Self, F, I, BT>, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(t));
                    (sum(c) + sum(y)).into_primitive().tensor()
                }
                acc => gemm_general(a, ta, b, tb, alpha, out, acc),
            }
        } else {
            cubecl_gemm::<Self, F, I, BT>(a, ta, b, tb, alpha, out, acc)
        }
    }

    fn gemm_batched<F: FloatElement, I: IntElement, BT: BoolElement>(a: CubeTensor<Self>, b: CubeTensor<Self>) -> CubeTensor<Self> {
        let (sa, sb) = (a.meta.shape(), b.meta.shape());
        let n = sa.len();
        let fits = n >= 2 && sb.len() == n && sa[..n - 2] == sb[..n - 2] && sa[n - 1] == sb[n - 2];
        if enabled() && handled(a.dtype) && a.dtype == b.dtype && fits {
            gemm_batched(a, b)
        } else {
            cubecl_gemm_batched::<Self, F, I, BT>(a, b)
        }
    }

    fn gemm_grouped<F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<Self>, w: CubeTensor<Self>, counts: &[usize]) -> CubeTensor<Self> {
        if enabled() && handled(x.dtype) && x.dtype == w.dtype {
            super::cublas_grouped::gemm_grouped(x, w, counts)
        } else {
            cubecl_gemm_grouped::<Self, F, I, BT>(x, w, counts)
        }
    }

    fn gemm_grouped_outer<F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<Self>, y: CubeTensor<Self>, counts: &[usize]) -> CubeTensor<Self> {
        if !(enabled() && handled(x.dtype) && x.dtype == y.dtype) {
            cubecl_gemm_grouped_outer::<Self, F, I, BT>(x, y, counts)
        } else if x.meta.shape()[1].min(y.meta.shape()[1]) <= SPREAD_WIDTH && spread_outer() {
            let (x, y) = (float::<Self, F, I, BT, 2>(x), float::<Self, F, I, BT, 2>(y));
            crate::grouped::gemm_grouped_outer_spread(x, y, counts).into_primitive().tensor()
        } else {
            super::cublas_grouped::gemm_grouped_outer(x, y, counts)
        }
    }
}

/// The narrow side (columns) up to which the grouped outer GEMM takes
/// [`crate::grouped::gemm_grouped_outer_spread`]: LoRA ranks.
const SPREAD_WIDTH: usize = 64;

/// Whether the grouped outer GEMM of a narrow side runs as one spread dense GEMM (the default:
/// cuBLAS's grouped GEMM launches once a group there; 30b-mb4-L8 0.329 s/step against
/// 0.37-0.39, benches/RESULTS.md session 26); `KERNELS_CUBECL_GROUPED_OUTER=grouped` keeps
/// cuBLAS's grouped GEMM.
fn spread_outer() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !super::env_is("KERNELS_CUBECL_GROUPED_OUTER", "grouped"))
}

static HOST_SYNCS: AtomicU64 = AtomicU64::new(0);

/// Times a synchronised GEMM made the host wait for the device, since the process started (0
/// while GEMMs queue on CubeCL's stream).
pub fn gemm_host_syncs() -> u64 {
    HOST_SYNCS.load(std::sync::atomic::Ordering::Relaxed)
}

/// How one thread's GEMMs on one device are ordered with CubeCL's kernels.
enum Order {
    /// The handle queues on CubeCL's compute stream of the thread ([`super::compute_stream`]),
    /// each GEMM enqueued from CubeCL's device thread after the work queued before it: the
    /// stream orders both, nothing waits.
    ComputeStream,
    /// The handle queues on a stream of its own: the device is synchronised before each GEMM
    /// and this stream after it (CubeCL's stream could not be found, or `TRAINER_GEMM_ORDER=sync`).
    Synchronised(Arc<CudaStream>),
}

/// A cuBLAS handle with its stream, for one (device, CubeCL stream) pair.
pub(super) struct Blas {
    pub(super) handle: sys::cublasHandle_t,
    order: Order,
    ctx: Arc<CudaContext>,
    /// The stream the handle queues on.
    pub(super) stream: cudarc::driver::sys::CUstream,
    /// Device memory for the pointer arrays of grouped GEMMs (`cublas_grouped.rs`), reused
    /// call after call: each call's copy into it is queued behind the GEMM that read it last.
    pub(super) pointers: Option<(cudarc::driver::sys::CUdeviceptr, usize)>,
}

// SAFETY: the cuBLAS handle is only used under the mutex around each `Blas`, one GEMM at a time.
unsafe impl Send for Blas {}

/// Why GEMMs run synchronised (the first reason met), or `None` while every handle made so far
/// queues on CubeCL's stream; `trainer bench` reports it.
static SYNCHRONISED_BECAUSE: Mutex<Option<String>> = Mutex::new(None);

/// How GEMMs are ordered with CubeCL's kernels in this process so far: `"compute-stream"` or
/// `"synchronised: <why>"`.
pub fn gemm_ordering() -> String {
    match &*SYNCHRONISED_BECAUSE.lock().unwrap_or_else(|e| e.into_inner()) {
        None => "compute-stream".into(),
        Some(why) => format!("synchronised: {why}"),
    }
}

/// The handle for the calling thread on `device`, made on first use: one per device and CubeCL
/// stream (CubeCL gives each thread its own stream).
fn blas_for(device: &burn::backend::cuda::CudaDevice) -> Arc<Mutex<Blas>> {
    type Handles = std::collections::HashMap<(usize, u64), Arc<Mutex<Blas>>>;
    static BLAS: OnceLock<Mutex<Handles>> = OnceLock::new();
    let key = (device.index, cubecl::stream_id::StreamId::current().value);
    let mut all = BLAS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    all.entry(key).or_insert_with(|| Arc::new(Mutex::new(new_blas(device)))).clone()
}

fn new_blas(device: &burn::backend::cuda::CudaDevice) -> Blas {
    let index = device.index;
    // The primary context of the device, which CubeCL uses too: same memory space.
    let ctx = CudaContext::new(index).unwrap_or_else(|e| panic!("CUDA device {index}: {e:?}"));
    let handle = blas::create_handle().unwrap_or_else(|e| panic!("cuBLAS (libcublas) could not start: {e:?}"));
    let forced = std::env::var("TRAINER_GEMM_ORDER").is_ok_and(|v| v == "sync");
    let found = if forced { Err("TRAINER_GEMM_ORDER=sync".to_string()) } else { super::compute_stream::find(device) };
    let (stream, order) = match found {
        Ok(stream) => (stream, Order::ComputeStream),
        Err(why) => {
            eprintln!("cuBLAS GEMMs synchronise the device around each call: CubeCL's stream not found ({why})");
            SYNCHRONISED_BECAUSE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
            let own = ctx.new_stream().unwrap_or_else(|e| panic!("CUDA stream: {e:?}"));
            (own.cu_stream(), Order::Synchronised(own))
        }
    };
    // SAFETY: a live handle and a live stream of the same context.
    unsafe { blas::set_stream(handle, stream as _) }.unwrap_or_else(|e| panic!("cublasSetStream: {e:?}"));
    Blas { handle, order, ctx, stream: stream as _, pointers: None }
}

/// One operand as cuBLAS reads it: `batch` matrices of `rows x cols`, `batch_stride` elements
/// apart, each row-major with leading dimension `ld` or, `col_major`, column-major with `ld`
/// (the transposed view of a row-major buffer, read as such instead of copied).
pub(super) struct View {
    pub(super) t: CubeTensor<CudaRuntime>,
    pub(super) batch: usize,
    pub(super) batch_stride: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) ld: usize,
    pub(super) col_major: bool,
}

impl View {
    /// `t` (`[..., rows, cols]`, any rank >= 2) with its leading dims as the batch, read through
    /// its strides where cuBLAS can, else from a contiguous copy.
    pub(super) fn of(t: CubeTensor<CudaRuntime>) -> View {
        if let Some(v) = Self::strided(&t) {
            return v;
        }
        let t = into_contiguous(t);
        Self::strided(&t).unwrap_or_else(|| unreachable!("a contiguous tensor is a strided view"))
    }

    fn strided(t: &CubeTensor<CudaRuntime>) -> Option<View> {
        let (shape, strides) = (t.meta.shape(), t.meta.strides());
        let n = shape.len();
        let (rows, cols, sr, sc) = (shape[n - 2], shape[n - 1], strides[n - 2], strides[n - 1]);
        // Leading dims flatten into one batch when each steps over the next (size-1 dims and
        // zero-stride broadcasts aside).
        let mut batch = 1;
        let mut batch_stride = 0;
        for d in (0..n - 2).rev() {
            if shape[d] == 1 {
                continue;
            }
            if batch == 1 {
                batch_stride = strides[d];
            } else if strides[d] != batch_stride * batch {
                return None;
            }
            batch *= shape[d];
        }
        let (ld, col_major) = if (sc == 1 || cols == 1) && (rows == 1 || sr >= cols) {
            (if rows == 1 { cols } else { sr }, false)
        } else if (sr == 1 || rows == 1) && (cols == 1 || sc >= rows) {
            (if cols == 1 { rows } else { sc }, true)
        } else {
            return None;
        };
        Some(View { t: t.clone(), batch, batch_stride, rows, cols, ld: ld.max(1), col_major })
    }

    /// The 2-D view of `op(t)`: `t` contiguous, or the transposed view of a contiguous tensor.
    fn matrix(t: CubeTensor<CudaRuntime>, transpose: bool) -> View {
        let t = if transpose { burn_cubecl::ops::permute(t, &[1, 0]) } else { t };
        Self::of(t)
    }
}

/// `alpha op(a) @ op(b)` for 2-D tensors, `op` transposing when asked (through strides, no copy),
/// with output dtype `out` (bf16 / f16 / f32; the inputs bf16, f16 or f32), added in place to
/// `acc` (which is returned) when given: `C = alpha op(a) op(b) + C`, one rounding.
fn gemm_general(
    a: CubeTensor<CudaRuntime>,
    ta: bool,
    b: CubeTensor<CudaRuntime>,
    tb: bool,
    alpha: f64,
    out: DType,
    acc: Option<CubeTensor<CudaRuntime>>,
) -> CubeTensor<CudaRuntime> {
    let (a, b) = (View::matrix(a, ta), View::matrix(b, tb));
    let (m, n) = (a.rows, b.cols);
    let accumulating = acc.is_some();
    let c = match acc {
        Some(c) => {
            assert!(c.shape().dims::<2>() == [m, n] && c.dtype == out, "accumulator must be a [{m}, {n}] {out:?} tensor");
            c
        }
        None => empty_device_contiguous_dtype(a.t.client.clone(), a.t.device.clone(), Shape::new([m, n]), out),
    };
    if a.cols == 0 && !accumulating {
        // An empty sum: cuBLAS would not touch the output.
        return burn_cubecl::ops::numeric::zeros_client(c.client.clone(), c.device.clone(), c.shape(), out);
    }
    launch(&a, &b, &c, alpha as f32, accumulating);
    c
}

/// `a @ b` of `[..., m, k]` x `[..., k, n]` tensors with the same leading dims, one strided
/// batched GEMM, output `[..., m, n]` (contiguous) in the operands' dtype. Either operand may
/// be a strided view, the transposed view of its last two dims included.
fn gemm_batched(a: CubeTensor<CudaRuntime>, b: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    let dims: Vec<usize> = a.meta.shape().to_vec();
    let n_dims = dims.len();
    let mut out_dims = dims.clone();
    out_dims[n_dims - 1] = b.meta.shape()[n_dims - 1];
    let dtype = a.dtype;
    let (a, b) = (View::of(a), View::of(b));
    assert_eq!(a.batch, b.batch, "batched GEMM: {} against {} matrices", a.batch, b.batch);
    let shape = Shape::from(out_dims);
    if a.cols == 0 {
        return burn_cubecl::ops::numeric::zeros_client(a.t.client.clone(), a.t.device.clone(), shape, dtype);
    }
    let c = empty_device_contiguous_dtype(a.t.client.clone(), a.t.device.clone(), shape, dtype);
    launch(&a, &b, &c, 1.0, false);
    c
}

/// `C = alpha op(A) op(B) (+ C when accumulate)` for every matrix of the batch, `C` contiguous
/// `[batch, m, n]` in its own dtype.
fn launch(a: &View, b: &View, c: &CubeTensor<CudaRuntime>, alpha: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "GEMM inner dimensions: [{m}, {k}] x [{}, {n}]", b.rows);
    let (data_type, out_type) = (cuda_type(a.t.dtype), cuda_type(c.dtype));
    let beta = if accumulate { 1.0f32 } else { 0.0 };
    if m == 0 || n == 0 || k == 0 || a.batch == 0 {
        return;
    }
    // cuBLAS is column-major: it computes C^T = op(B)^T op(A)^T into C's buffer read as the
    // column-major [n, m] matrix. A row-major operand is its own transpose column-major (op N);
    // a column-major one is read with op T.
    submit(&a.t, |blas| {
        let ((ga, pa), (gb, pb), (gc, pc)) = (resource(&a.t), resource(&b.t), resource(c));
        // SAFETY: the pointers are live device allocations holding the views' elements; the
        // GEMM is queued on a stream that every later use of them is ordered after (CubeCL's,
        // or ours, synchronised before the guards drop); alpha/beta are host f32 read at the
        // call.
        let status = unsafe {
            blas::gemm_strided_batched_ex(
                blas.handle,
                op(b.col_major),
                op(a.col_major),
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                pb as *const std::ffi::c_void,
                data_type,
                b.ld as i32,
                b.batch_stride as i64,
                pa as *const std::ffi::c_void,
                data_type,
                a.ld as i32,
                a.batch_stride as i64,
                (&beta as *const f32).cast(),
                pc as *mut std::ffi::c_void,
                out_type,
                n as i32,
                (m * n) as i64,
                a.batch as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = status {
            panic!("cuBLAS GEMM {} x [{m}, {k}] x [{k}, {n}] failed: {e:?}", a.batch);
        }
        (ga, gb, gc)
    });
}

/// cuBLAS's operation on an operand: `T` for a column-major buffer (read as the row-major
/// matrix's transpose), else `N`.
pub(super) fn op(col_major: bool) -> sys::cublasOperation_t {
    if col_major { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N }
}

/// cuBLAS's name of a dtype [`handled`] here.
pub(super) fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        other => unreachable!("cuBLAS GEMMs are only routed for bf16 / f16 / f32, got {other:?}"),
    }
}

/// The device memory of a GEMM operand (held while the guard lives) and its address.
pub(super) fn resource(t: &CubeTensor<CudaRuntime>) -> (impl Sized, u64) {
    let guard = t.client.get_resource(t.handle.clone()).unwrap_or_else(|e| panic!("device memory of a GEMM operand: {e:?}"));
    let ptr = guard.resource().ptr;
    (guard, ptr)
}

/// Runs `enqueue` (cuBLAS calls queued on the handle's stream for `on`'s device, returning the
/// guards of the memory they use) in order with CubeCL's kernels: on CubeCL's device thread,
/// behind every launch queued before this call, or with the device synchronised around it.
pub(super) fn submit<G>(on: &CubeTensor<CudaRuntime>, enqueue: impl FnOnce(&mut Blas) -> G) {
    let blas = blas_for(&on.device);
    let mut blas = blas.lock().unwrap_or_else(|e| e.into_inner());
    let enqueue = |blas: &mut Blas| {
        if let Err(e) = blas.ctx.bind_to_thread() {
            panic!("CUDA context for a cuBLAS GEMM: {e:?}");
        }
        enqueue(blas)
    };
    match &blas.order {
        Order::ComputeStream => {
            // The operands' guards drop right after: later work on them is behind the GEMM.
            let task = OnDeviceThread(|| drop(enqueue(&mut blas)));
            on.client.exclusive(move || task.run()).unwrap_or_else(|e| panic!("CubeCL's device thread: {e:?}"));
        }
        Order::Synchronised(stream) => {
            // Work queued on CubeCL's streams (that produced the operands) must be done first.
            if let Err(e) = <CubeBackend<CudaRuntime, f32, i32, u8> as Backend>::sync(&on.device) {
                panic!("device sync before a cuBLAS GEMM failed: {e:?}");
            }
            let stream = stream.clone();
            let guards = enqueue(&mut blas);
            if let Err(e) = stream.synchronize() {
                panic!("cuBLAS stream: {e:?}");
            }
            HOST_SYNCS.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
            drop(guards);
        }
    }
}

/// A task for CubeCL's device thread, run while the calling thread waits for it
/// (`ComputeClient::exclusive`), so what it borrows stays alive and untouched meanwhile.
pub(super) struct OnDeviceThread<F>(pub(super) F);

// SAFETY: the caller blocks until the task has run; the cuBLAS handle it uses is held under its
// mutex by the caller for that time, and CUDA handles may be used from any thread.
unsafe impl<F> Send for OnDeviceThread<F> {}

impl<R, F: FnOnce() -> R> OnDeviceThread<F> {
    pub(super) fn run(self) -> R {
        (self.0)()
    }
}

