//! The model's large GEMMs through cuBLAS on CUDA (bf16 / f16 storage, f32 accumulation), on the
//! memory of Burn's own tensors, as a Burn autodiff op with its own backward.
//!
//! Burn's CUDA matmul reaches 218 TFLOP/s on an H200 where cuBLAS reaches 783 on the same memory
//! (shared/PLATFORM.md). The model stays generic over its backend: [`try_matmul`] recognises the
//! concrete CUDA backends at run time (a type check, no unsafe casts) and hands every other
//! backend back unchanged. `TRAINER_CUBLAS=0` turns it off (Burn's matmul everywhere), for
//! comparisons.
//!
//! Ordering with CubeCL: each GEMM is queued on CubeCL's own compute stream of the calling thread
//! (found once through CUPTI, `compute_stream.rs`), from CubeCL's device thread behind the
//! launches queued before it, so the stream orders the GEMM with the kernels that produce and
//! consume its operands and the host never waits for the device. Where that stream cannot be
//! found (no libcupti, another profiler attached) or `TRAINER_GEMM_ORDER=sync` asks, a GEMM
//! waits for the device to finish the work queued before it (`Backend::sync`), runs on a cuBLAS
//! stream of the same primary context, and waits for that stream before returning.

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorMetadata, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;

use super::{cast, same};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, FloatElement};
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::{result as blas, sys};
use cudarc::driver::{CudaContext, CudaStream};

type Cuda<E> = CubeBackend<CudaRuntime, E, i32, u8>;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TRAINER_CUBLAS").map_or(true, |v| v != "0"))
}

/// `x @ w` with `x: [..., k]`, `w: [k, n]` through cuBLAS when `B` is a CUDA backend storing
/// bf16 or f16 (with or without autodiff); `Err` hands the inputs back for Burn's matmul. The
/// operands may be bf16, f16 or f32 (LoRA's f32 factors on a bf16 model; f32 GEMMs without
/// TF32), one dtype for both.
pub fn try_matmul<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 2>)> {
    route::<B, Linear2d, D, 2>(x, w)
}

/// `x @ w` of `[batch, m, k]` x `[batch, k, n]` (the experts of a MoE block), one strided
/// batched cuBLAS GEMM, on the same terms as [`try_matmul`].
pub fn try_batched_matmul<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 3>) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)> {
    route::<B, Batched, 3, 3>(x, w)
}

/// One shape of GEMM op, with and without autodiff, for each stored dtype.
trait GemmOp<const D: usize, const DW: usize> {
    fn tracked<E: FloatElement>(x: Tensor<Autodiff<Cuda<E>>, D>, w: Tensor<Autodiff<Cuda<E>>, DW>) -> Tensor<Autodiff<Cuda<E>>, D>;
    fn untracked<E: FloatElement>(x: Tensor<Cuda<E>, D>, w: Tensor<Cuda<E>, DW>) -> Tensor<Cuda<E>, D>;
}

fn route<B: Backend, O: GemmOp<D, DW>, const D: usize, const DW: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, DW>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, DW>)> {
    let float = |d: DType| matches!(d, DType::BF16 | DType::F16 | DType::F32);
    if !enabled() || !float(x.dtype()) || x.dtype() != w.dtype() {
        return Err((x, w));
    }
    if same::<B, Autodiff<Cuda<half::bf16>>>() {
        return via::<B, Autodiff<Cuda<half::bf16>>, D, DW>(x, w, O::tracked::<half::bf16>);
    }
    if same::<B, Autodiff<Cuda<half::f16>>>() {
        return via::<B, Autodiff<Cuda<half::f16>>, D, DW>(x, w, O::tracked::<half::f16>);
    }
    if same::<B, Cuda<half::bf16>>() {
        return via::<B, Cuda<half::bf16>, D, DW>(x, w, O::untracked::<half::bf16>);
    }
    if same::<B, Cuda<half::f16>>() {
        return via::<B, Cuda<half::f16>, D, DW>(x, w, O::untracked::<half::f16>);
    }
    Err((x, w))
}

fn via<B: Backend, C: Backend, const D: usize, const DW: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, DW>,
    f: fn(Tensor<C, D>, Tensor<C, DW>) -> Tensor<C, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, DW>)> {
    match (cast::<_, Tensor<C, D>>(x), cast::<_, Tensor<C, DW>>(w)) {
        (Ok(x), Ok(w)) => match cast::<_, Tensor<B, D>>(f(x, w)) {
            Ok(y) => Ok(y),
            Err(_) => unreachable!("B is C"),
        },
        (Err(x), Err(w)) => Err((x, w)),
        _ => unreachable!("x and w share a backend"),
    }
}

/// Flatten `[..., k]` to `[m, k]`, run `f`, restore the leading dims with `n` last.
fn flat<C: Backend, const D: usize>(x: Tensor<C, D>, w: Tensor<C, 2>, f: impl FnOnce(Tensor<C, 2>, Tensor<C, 2>) -> Tensor<C, 2>) -> Tensor<C, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    let n = w.dims()[1];
    let y = f(x.reshape([m, k]), w);
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// `[..., k] x [k, n]`: a linear layer's GEMM.
struct Linear2d;

impl<const D: usize> GemmOp<D, 2> for Linear2d {
    fn untracked<E: FloatElement>(x: Tensor<Cuda<E>, D>, w: Tensor<Cuda<E>, 2>) -> Tensor<Cuda<E>, D> {
        flat(x, w, |x, w| {
            let y = gemm(x.into_primitive().tensor(), false, w.into_primitive().tensor(), false);
            Tensor::from_primitive(TensorPrimitive::Float(y))
        })
    }

    fn tracked<E: FloatElement>(x: Tensor<Autodiff<Cuda<E>>, D>, w: Tensor<Autodiff<Cuda<E>>, 2>) -> Tensor<Autodiff<Cuda<E>>, D> {
        flat(x, w, |x, w| tracked_gemm(x, w, false))
    }
}

/// `[batch, m, k] x [batch, k, n]`: one GEMM per batch entry.
struct Batched;

impl GemmOp<3, 3> for Batched {
    fn untracked<E: FloatElement>(x: Tensor<Cuda<E>, 3>, w: Tensor<Cuda<E>, 3>) -> Tensor<Cuda<E>, 3> {
        Tensor::from_primitive(TensorPrimitive::Float(gemm_batched(x.into_primitive().tensor(), w.into_primitive().tensor())))
    }

    fn tracked<E: FloatElement>(x: Tensor<Autodiff<Cuda<E>>, 3>, w: Tensor<Autodiff<Cuda<E>>, 3>) -> Tensor<Autodiff<Cuda<E>>, 3> {
        tracked_gemm(x, w, true)
    }
}

/// `x @ w` as an autodiff op: 2-D operands, or `[batch, ..]` ones when `batched`.
fn tracked_gemm<E: FloatElement, const D: usize>(x: Tensor<Autodiff<Cuda<E>>, D>, w: Tensor<Autodiff<Cuda<E>>, D>, batched: bool) -> Tensor<Autodiff<Cuda<E>>, D> {
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let forward = |x, w| if batched { gemm_batched(x, w) } else { gemm(x, false, w, false) };
    let y = match (GemmBackward { batched }).prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            // dX needs W, dW needs X: keep only what a tracked parent will ask for.
            let keep_w = x.is_tracked().then(|| w.primitive.clone());
            let keep_x = w.is_tracked().then(|| x.primitive.clone());
            let y = forward(x.primitive, w.primitive);
            prep.finish((keep_x, keep_w), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

#[derive(Debug)]
struct GemmBackward {
    batched: bool,
}

impl<E: FloatElement> Backward<Cuda<E>, 2> for GemmBackward {
    /// (x if w is tracked, w if x is tracked).
    type State = (Option<CubeTensor<CudaRuntime>>, Option<CubeTensor<CudaRuntime>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Cuda<E>>(&ops.node);
        let (x, w) = ops.state;
        // The batch's matrices transposed in place of their last two dims (a strided view).
        let t = |m: CubeTensor<CudaRuntime>| burn_cubecl::ops::permute(m, &[0, 2, 1]);
        if let (Some(node), Some(w)) = (node_x, w) {
            // dX = dY W^T
            let dx = if self.batched { gemm_batched(dy.clone(), t(w)) } else { gemm(dy.clone(), false, w, true) };
            grads.register::<Cuda<E>>(node.id, dx);
        }
        if let (Some(node), Some(x)) = (node_w, x) {
            // dW = X^T dY
            let dw = if self.batched { gemm_batched(t(x), dy) } else { gemm(x, true, dy, false) };
            grads.register::<Cuda<E>>(node.id, dw);
        }
    }
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
struct Blas {
    handle: sys::cublasHandle_t,
    order: Order,
    ctx: Arc<CudaContext>,
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
    Blas { handle, order, ctx }
}

/// `op(a) @ op(b)` for 2-D tensors, `op` transposing when asked; output in the inputs' dtype,
/// f32 accumulation.
fn gemm(a: CubeTensor<CudaRuntime>, ta: bool, b: CubeTensor<CudaRuntime>, tb: bool) -> CubeTensor<CudaRuntime> {
    let dtype = a.dtype;
    gemm_general(a, ta, b, tb, dtype, None)
}

/// One operand as cuBLAS reads it: `batch` matrices of `rows x cols`, `batch_stride` elements
/// apart, each row-major with leading dimension `ld` or, `col_major`, column-major with `ld`
/// (the transposed view of a row-major buffer, read as such instead of copied).
struct View {
    t: CubeTensor<CudaRuntime>,
    batch: usize,
    batch_stride: usize,
    rows: usize,
    cols: usize,
    ld: usize,
    col_major: bool,
}

impl View {
    /// `t` (`[..., rows, cols]`, any rank >= 2) with its leading dims as the batch, read through
    /// its strides where cuBLAS can, else from a contiguous copy.
    fn of(t: CubeTensor<CudaRuntime>) -> View {
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

/// `op(a) @ op(b)` for 2-D tensors, `op` transposing when asked (through strides, no copy), with
/// output dtype `out` (bf16 / f16 / f32; the inputs bf16, f16 or f32), added in place to `acc`
/// (which is returned) when given: `C = op(a) op(b) + C`, one rounding.
fn gemm_general(
    a: CubeTensor<CudaRuntime>,
    ta: bool,
    b: CubeTensor<CudaRuntime>,
    tb: bool,
    out: DType,
    acc: Option<CubeTensor<CudaRuntime>>,
) -> CubeTensor<CudaRuntime> {
    let (a, b) = (View::matrix(a, ta), View::matrix(b, tb));
    let (m, n) = (a.rows, b.cols);
    let accumulating = acc.is_some();
    let c = match acc {
        Some(c) => {
            assert!(c.is_contiguous() && c.shape().dims::<2>() == [m, n] && c.dtype == out, "accumulator must be a contiguous [{m}, {n}] {out:?} tensor");
            c
        }
        None => empty_device_contiguous_dtype(a.t.client.clone(), a.t.device.clone(), Shape::new([m, n]), out),
    };
    if a.cols == 0 && !accumulating {
        // An empty sum: cuBLAS would not touch the output.
        return burn_cubecl::ops::numeric::zeros_client(c.client.clone(), c.device.clone(), c.shape(), out);
    }
    launch(&a, &b, &c, accumulating);
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
    launch(&a, &b, &c, false);
    c
}

/// `C = op(A) op(B) (+ C when accumulate)` for every matrix of the batch, `C` contiguous
/// `[batch, m, n]` in its own dtype.
fn launch(a: &View, b: &View, c: &CubeTensor<CudaRuntime>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "GEMM inner dimensions: [{m}, {k}] x [{}, {n}]", b.rows);
    let cuda_type = |d: DType| match d {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        other => unreachable!("cuBLAS GEMMs are only routed for bf16 / f16 / f32, got {other:?}"),
    };
    let (data_type, out_type) = (cuda_type(a.t.dtype), cuda_type(c.dtype));
    let beta = if accumulate { 1.0f32 } else { 0.0 };
    if m == 0 || n == 0 || k == 0 || a.batch == 0 {
        return;
    }
    let alpha = 1.0f32;
    // cuBLAS is column-major: it computes C^T = op(B)^T op(A)^T into C's buffer read as the
    // column-major [n, m] matrix. A row-major operand is its own transpose column-major (op N);
    // a column-major one is read with op T.
    let op = |col_major: bool| if col_major { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    let blas = blas_for(&a.t.device);
    let blas = blas.lock().unwrap_or_else(|e| e.into_inner());
    let enqueue = || {
        let resource = |t: &CubeTensor<CudaRuntime>| {
            t.client.get_resource(t.handle.clone()).unwrap_or_else(|e| panic!("device memory of a GEMM operand: {e:?}"))
        };
        let (ga, gb, gc) = (resource(&a.t), resource(&b.t), resource(c));
        let (pa, pb, pc) = (ga.resource().ptr, gb.resource().ptr, gc.resource().ptr);
        if let Err(e) = blas.ctx.bind_to_thread() {
            panic!("CUDA context for a cuBLAS GEMM: {e:?}");
        }
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
    };
    match &blas.order {
        Order::ComputeStream => {
            // On CubeCL's device thread, behind every launch queued before this call.
            // The operands' guards drop right after: later work on them is behind the GEMM.
            let task = OnDeviceThread(enqueue);
            a.t.client.exclusive(move || drop(task.run())).unwrap_or_else(|e| panic!("CubeCL's device thread: {e:?}"));
        }
        Order::Synchronised(stream) => {
            // Work queued on CubeCL's streams (that produced a, b and c) must be done first.
            if let Err(e) = <Cuda<half::bf16> as Backend>::sync(&a.t.device) {
                panic!("device sync before a cuBLAS GEMM failed: {e:?}");
            }
            let guards = enqueue();
            if let Err(e) = stream.synchronize() {
                panic!("cuBLAS stream: {e:?}");
            }
            super::count_host_syncs(2);
            drop(guards);
        }
    }
}

/// A task for CubeCL's device thread, run while the calling thread waits for it
/// (`ComputeClient::exclusive`), so what it borrows stays alive and untouched meanwhile.
struct OnDeviceThread<F>(F);

// SAFETY: the caller blocks until the task has run; the cuBLAS handle it uses is held under its
// mutex by the caller for that time, and CUDA handles may be used from any thread.
unsafe impl<F> Send for OnDeviceThread<F> {}

impl<R, F: FnOnce() -> R> OnDeviceThread<F> {
    fn run(self) -> R {
        (self.0)()
    }
}

/// The GEMM `kernels-cubecl`'s kernels use on CUDA (bf16 / f16 operands; anything else goes
/// back to CubeCL's matmul). Registered once, before the first step.
pub fn register_with_kernels() {
    /// The operand dtypes the kernels' GEMMs hand to cuBLAS.
    fn low(d: DType) -> bool {
        matches!(d, DType::BF16 | DType::F16)
    }
    fn hook(a: &dyn Any, ta: bool, b: &dyn Any, tb: bool, out: DType, acc: Option<&dyn Any>) -> Option<Box<dyn Any>> {
        let a = a.downcast_ref::<CubeTensor<CudaRuntime>>()?;
        let b = b.downcast_ref::<CubeTensor<CudaRuntime>>()?;
        let acc = match acc {
            Some(c) => Some(c.downcast_ref::<CubeTensor<CudaRuntime>>()?.clone()),
            None => None,
        };
        if !enabled() || !low(a.dtype) || a.dtype != b.dtype || !matches!(out, DType::BF16 | DType::F16 | DType::F32) {
            return None;
        }
        Some(Box::new(gemm_general(a.clone(), ta, b.clone(), tb, out, acc)))
    }
    /// The blockwise attention's batched matmuls: bf16 / f16 operands of one dtype, 4-D.
    fn batched(a: &dyn Any, b: &dyn Any) -> Option<Box<dyn Any>> {
        let a = a.downcast_ref::<CubeTensor<CudaRuntime>>()?;
        let b = b.downcast_ref::<CubeTensor<CudaRuntime>>()?;
        let (sa, sb) = (a.meta.shape(), b.meta.shape());
        let fits = sa.len() == 4 && sb.len() == 4 && sa[..2] == sb[..2] && sa[3] == sb[2];
        if !enabled() || !low(a.dtype) || a.dtype != b.dtype || !fits {
            return None;
        }
        Some(Box::new(gemm_batched(a.clone(), b.clone())))
    }
    kernels_cubecl::set_gemm(hook);
    kernels_cubecl::set_batched_gemm(batched);
}

/// How far the cuBLAS path is from exact maths on random bf16 operands: forward and both
/// gradients, as max |diff| / max |reference|; and `ordering`, how far GEMMs queued between
/// CubeCL kernels with nothing waiting are from the same GEMMs with the device idle around them
/// (0 when the stream orders them; a GEMM that overtook its producer or consumer reads or leaves
/// other values).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GemmCheck {
    pub forward: f32,
    pub grad_x: f32,
    pub grad_w: f32,
    pub ordering: f32,
}

impl GemmCheck {
    /// Above this the check fails: bf16 operands are exact in f32 and each output is rounded
    /// once to bf16 (2^-8 relative); a race gives errors of order one.
    pub const TOLERANCE: f32 = 1e-2;

    /// The first measure above [`GemmCheck::TOLERANCE`] (or not a number), by name.
    pub fn failure(&self) -> Option<(&'static str, f32)> {
        first_above(Self::TOLERANCE, [("forward", self.forward), ("grad_x", self.grad_x), ("grad_w", self.grad_w), ("ordering", self.ordering)])
    }
}

/// Run `x [3, 37, 200] @ w [200, 72]` (odd sizes) with both tracked through the cuBLAS op in
/// bf16, against the same maths on the host in f64 from the same bf16 values (Burn's CUDA
/// matmul as the reference would autotune, ~30 s on a fresh machine).
pub fn self_check(device: &burn::backend::cuda::CudaDevice) -> GemmCheck {
    use burn::tensor::{Distribution, FloatDType};
    type B = Autodiff<Cuda<half::bf16>>;
    let (b, m, k, n) = (3, 37, 200, 72);
    let x = Tensor::<B, 3>::random([b, m, k], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 0.1), device);
    let r = Tensor::<B, 3>::random([b, m, n], Distribution::Normal(0.0, 1.0), device);
    let host = host_values::<B, 3>;
    let (hx, hw, hr) = (host(x.clone()), host(w.clone().unsqueeze()), host(r.clone()));
    // cuBLAS, bf16.
    let (xa, wa) = (x.require_grad(), w.require_grad());
    let y = crate::backend::linear_matmul(xa.clone(), wa.clone());
    let g = (y.clone().cast(FloatDType::F32) * r.cast(FloatDType::F32)).sum().backward();
    let gx = xa.grad(&g).map(|t| host(Tensor::<B, 3>::from_inner(t)));
    let gw = wa.grad(&g).map(|t| host(Tensor::<B, 3>::from_inner(t.unsqueeze())));
    // The host, f64: y = x w, dX = r w^T, dW = sum over rows of x^T r.
    let (mut ry, mut rgx, mut rgw) = (vec![0.0; b * m * n], vec![0.0; b * m * k], vec![0.0; k * n]);
    for row in 0..b * m {
        for i in 0..k {
            let xv = hx[row * k + i];
            for j in 0..n {
                ry[row * n + j] += xv * hw[i * n + j];
                rgx[row * k + i] += hr[row * n + j] * hw[i * n + j];
                rgw[i * n + j] += xv * hr[row * n + j];
            }
        }
    }
    GemmCheck {
        forward: max_rel_error(Some(host(y)), &ry),
        grad_x: max_rel_error(gx, &rgx),
        grad_w: max_rel_error(gw, &rgw),
        ordering: ordering_check(device),
    }
}

/// A GEMM between a producer and a consumer kernel with nothing waiting in between, against the
/// same maths with the device synchronised around the GEMM; max |diff| / max |reference| of
/// the consumer's output. The producer is a chain of element-wise kernels over 16 M elements
/// (longer than the launch of the GEMM behind it), the consumer reads the GEMM's output as
/// soon as it is queued.
fn ordering_check(device: &burn::backend::cuda::CudaDevice) -> f32 {
    use burn::tensor::Distribution;
    type B = Cuda<half::bf16>;
    let n = 4096;
    let x = Tensor::<B, 2>::random([n, n], Distribution::Uniform(-1.0, 1.0), device);
    let w = Tensor::<B, 2>::random([n, n], Distribution::Uniform(-0.02, 0.02), device);
    let produce = |x: Tensor<B, 2>| (0..8).fold(x, |t, i| t.mul_scalar(0.5).add_scalar(0.25 * i as f64));
    let consume = |y: Tensor<B, 2>| y.mul_scalar(3.0).add_scalar(1.0);
    let _ = B::sync(device);
    let raced = consume(crate::backend::linear_matmul(produce(x.clone()), w.clone()));
    let raced = host_values(raced);
    let _ = B::sync(device);
    let produced = produce(x);
    let _ = B::sync(device);
    let y = crate::backend::linear_matmul(produced, w);
    let _ = B::sync(device);
    let want = host_values(consume(y));
    max_rel_error(Some(raced), &want)
}

/// A float tensor's values on the host, as f64.
fn host_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    let t = t.cast(burn::tensor::FloatDType::F32);
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default().into_iter().map(f64::from).collect()
}

/// `max |got - want| / max |want|`; infinite when `got` is missing or of another length.
fn max_rel_error(got: Option<Vec<f64>>, want: &[f64]) -> f32 {
    let Some(got) = got.filter(|g| g.len() == want.len() && !want.is_empty()) else { return f32::INFINITY };
    let scale = want.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-12);
    (got.iter().zip(want).fold(0.0f64, |a, (g, w)| a.max((g - w).abs())) / scale) as f32
}

/// How far the CUDA attention (blockwise, cuBLAS batched GEMMs on strided views) is from the
/// plain-Burn reference in f32 on the CPU, on random bf16 q/k/v:
/// output and the three gradients, as max |diff| / max |reference|.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AttentionCheck {
    pub output: f32,
    pub grad_q: f32,
    pub grad_k: f32,
    pub grad_v: f32,
}

impl AttentionCheck {
    /// Above this the check fails: bf16 inputs against an f32 reference measured 3.6e-3
    /// (output) to 1.0e-2 (dQ, through two bf16 GEMMs and the softmax's backward) when right
    /// (RESULTS.md); the broken row kernels gave 1.8e2.
    pub const TOLERANCE: f32 = 3e-2;

    /// The first measure above [`AttentionCheck::TOLERANCE`] (or not a number), by name.
    pub fn failure(&self) -> Option<(&'static str, f32)> {
        first_above(Self::TOLERANCE, [("output", self.output), ("grad_q", self.grad_q), ("grad_k", self.grad_k), ("grad_v", self.grad_v)])
    }
}

/// The first named error at or above `tolerance`, or not a number.
fn first_above<const N: usize>(tolerance: f32, errors: [(&'static str, f32); N]) -> Option<(&'static str, f32)> {
    errors.into_iter().find(|(_, e)| !(*e < tolerance))
}

/// Causal GQA attention, batch 2, 4 query heads on 2 kv heads, 300 positions (the second row
/// packed as two segments), head dim 64, query blocks of 64 rows (five blocks, the last
/// partial), through kernels-cubecl on CUDA in bf16, against `reference::attention` on NdArray
/// in f32 from the same bf16 values, forward and backward.
pub fn attention_check(device: &burn::backend::cuda::CudaDevice) -> AttentionCheck {
    use burn::tensor::{Distribution, FloatDType, Int, TensorData};
    use kernels_cubecl::{attention_mask, memory_efficient_attention, reference, AttentionOptions};
    type G = Autodiff<Cuda<half::bf16>>;
    type C = Autodiff<burn::backend::NdArray<f32>>;
    let (b, hq, hkv, s, d) = (2, 4, 2, 300, 64);
    let scale = (d as f64).powf(-0.5);
    let segments: Vec<i64> = (0..b * s).map(|i| if i >= s && i % s >= 170 { 2 } else { 1 }).collect();
    let cpu = Default::default();
    let to_cpu = |t: &Tensor<G, 4>| {
        let values: Vec<f32> = host_values(t.clone()).into_iter().map(|v| v as f32).collect();
        Tensor::<C, 4>::from_data(TensorData::new(values, t.dims()), &cpu)
    };
    let q = Tensor::<G, 4>::random([b, hq, s, d], Distribution::Normal(0.0, 1.0), device);
    let k = Tensor::<G, 4>::random([b, hkv, s, d], Distribution::Normal(0.0, 1.0), device);
    let v = Tensor::<G, 4>::random([b, hkv, s, d], Distribution::Normal(0.0, 1.0), device);
    let r = Tensor::<G, 4>::random([b, hq, s, d], Distribution::Normal(0.0, 1.0), device);
    let (cq, ck, cv, cr) = (to_cpu(&q), to_cpu(&k), to_cpu(&v), to_cpu(&r));
    // CUDA, bf16.
    let seg = || TensorData::new(segments.clone(), [b, s]);
    let mask = attention_mask::<G>(Some(Tensor::<G, 2, Int>::from_data(seg(), device)), b, s, device);
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let options = AttentionOptions { block_q: Some(64), causal: true };
    let y = memory_efficient_attention(q.clone(), k.clone(), v.clone(), scale, mask, options);
    let g = (y.clone().cast(FloatDType::F32) * r.cast(FloatDType::F32)).sum().backward();
    let grad = |t: &Tensor<G, 4>| t.grad(&g).map(|t| host_values(Tensor::<G, 4>::from_inner(t)));
    // CPU, f32.
    let cmask = attention_mask::<C>(Some(Tensor::<C, 2, Int>::from_data(seg(), &cpu)), b, s, &cpu);
    let (cq, ck, cv) = (cq.require_grad(), ck.require_grad(), cv.require_grad());
    let cy = reference::attention(cq.clone(), ck.clone(), cv.clone(), scale, cmask);
    let cg = (cy.clone() * cr).sum().backward();
    let cgrad = |t: &Tensor<C, 4>| t.grad(&cg).map(|t| host_values(t)).unwrap_or_default();
    AttentionCheck {
        output: max_rel_error(Some(host_values(y)), &host_values(cy)),
        grad_q: max_rel_error(grad(&q), &cgrad(&cq)),
        grad_k: max_rel_error(grad(&k), &cgrad(&ck)),
        grad_v: max_rel_error(grad(&v), &cgrad(&cv)),
    }
}
