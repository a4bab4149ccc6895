//! Grouped GEMMs on cuBLAS (`cublasGemmGroupedBatchedEx`, CUDA >= 12.5): every group of rows
//! its own problem of its own size in one call, so a mixture of experts runs each expert on
//! exactly its routed rows. cuBLAS reads the problems' matrices through arrays of device
//! pointers: they are copied into a buffer the handle keeps, on the handle's stream, right
//! before the GEMM (the copy from pageable host memory returns once staged).
//!
//! Row-major to cuBLAS's column-major as in `cublas.rs`: `C = A B` is computed as
//! `C^T = B^T A^T`, a row-major operand being its own transpose read column-major.

use burn::tensor::Shape;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::sys;
use cudarc::driver::result as driver;

use super::cublas::{cuda_type, op, resource, submit, Blas, View};
use crate::grouped::check;

/// One problem in cuBLAS's terms: `C (m x n) = op(A) (m x k) op(B) (k x n)`, column-major,
/// at element offsets into the three operands.
struct Problem {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    a: usize,
    b: usize,
    c: usize,
}

/// The element offset of row `row` of a 2-D view.
fn row_offset(v: &View, row: usize) -> usize {
    if v.col_major { row } else { row * v.ld }
}

/// `x_g @ w[g]` ([`crate::linear::LinearBackend::gemm_grouped`]) on cuBLAS: `x` `[rows, k]`
/// and `w` `[groups, k, n]` of one dtype (bf16 / f16 / f32), either a strided view.
pub(super) fn gemm_grouped(x: CubeTensor<CudaRuntime>, w: CubeTensor<CudaRuntime>, counts: &[usize]) -> CubeTensor<CudaRuntime> {
    let dtype = x.dtype;
    let (x, w) = (View::of(x), View::of(w));
    let (rows, k, n) = (x.rows, x.cols, w.cols);
    assert_eq!(x.batch, 1, "grouped GEMM: x is one matrix");
    check(rows, k, w.batch, w.rows, counts);
    let shape = Shape::new([rows, n]);
    if k == 0 || rows == 0 {
        return zeros_client(x.t.client.clone(), x.t.device.clone(), shape, dtype);
    }
    let c = empty_device_contiguous_dtype(x.t.client.clone(), x.t.device.clone(), shape, dtype);
    let mut problems = Vec::new();
    let mut row = 0;
    for (g, &m) in counts.iter().enumerate() {
        if m > 0 {
            // C_g^T (n x m) = W_g^T (n x k) X_g^T (k x m).
            problems.push(Problem {
                ta: w.col_major,
                tb: x.col_major,
                m: n,
                n: m,
                k,
                lda: w.ld,
                ldb: x.ld,
                ldc: n,
                a: g * w.batch_stride,
                b: row_offset(&x, row),
                c: row * n,
            });
            row += m;
        }
    }
    launch(&problems, [&w.t, &x.t, &c], false);
    c
}

/// `x_g^T @ y_g` ([`crate::linear::LinearBackend::gemm_grouped_outer`]) on cuBLAS: `x`
/// `[rows, k]`, `y` `[rows, n]`, output `[groups, k, n]` (zeros for a group without rows).
pub(super) fn gemm_grouped_outer(x: CubeTensor<CudaRuntime>, y: CubeTensor<CudaRuntime>, counts: &[usize]) -> CubeTensor<CudaRuntime> {
    let dtype = x.dtype;
    let (x, y) = (View::of(x), View::of(y));
    let (rows, k, n) = (x.rows, x.cols, y.cols);
    assert!(x.batch == 1 && y.batch == 1, "grouped outer GEMM: x and y are matrices");
    assert_eq!(y.rows, rows, "grouped outer GEMM: {rows} rows against {}", y.rows);
    check(rows, k, counts.len(), k, counts);
    // Contiguous (burn-cubecl's zeros may pad rows), zeroed on the stream before the GEMM:
    // cuBLAS does not visit the groups without rows.
    let c = empty_device_contiguous_dtype(x.t.client.clone(), x.t.device.clone(), Shape::new([counts.len(), k, n]), dtype);
    let mut problems = Vec::new();
    let mut row = 0;
    for (g, &m) in counts.iter().enumerate() {
        if m > 0 && k > 0 && n > 0 {
            // C_g^T (n x k) = Y_g^T (n x m) X_g (m x k).
            problems.push(Problem {
                ta: y.col_major,
                tb: !x.col_major,
                m: n,
                n: k,
                k: m,
                lda: y.ld,
                ldb: x.ld,
                ldc: n,
                a: row_offset(&y, row),
                b: row_offset(&x, row),
                c: g * k * n,
            });
        }
        row += m;
    }
    launch(&problems, [&y.t, &x.t, &c], true);
    c
}

/// One `cublasGemmGroupedBatchedEx` over `problems` (a group each), operands `[a, b, c]` of
/// one dtype, `C = op(A) op(B)`; with `zero_c`, all of `c` (contiguous) zeroed first.
fn launch(problems: &[Problem], [a, b, c]: [&CubeTensor<CudaRuntime>; 3], zero_c: bool) {
    let dtype = cuda_type(a.dtype);
    assert!(a.dtype == b.dtype && b.dtype == c.dtype, "grouped GEMM operands of one dtype: {:?} {:?} {:?}", a.dtype, b.dtype, c.dtype);
    let size = c.dtype.size();
    let groups = problems.len();
    let ints = |f: fn(&Problem) -> usize| problems.iter().map(|p| f(p) as i32).collect::<Vec<i32>>();
    let (m, n, k) = (ints(|p| p.m), ints(|p| p.n), ints(|p| p.k));
    let (lda, ldb, ldc) = (ints(|p| p.lda.max(1)), ints(|p| p.ldb.max(1)), ints(|p| p.ldc.max(1)));
    let ta: Vec<sys::cublasOperation_t> = problems.iter().map(|p| op(p.ta)).collect();
    let tb: Vec<sys::cublasOperation_t> = problems.iter().map(|p| op(p.tb)).collect();
    let (alpha, beta) = (vec![1.0f32; groups], vec![0.0f32; groups]);
    let ones = vec![1i32; groups];
    submit(a, |blas: &mut Blas| {
        let ((ga, pa), (gb, pb), (gc, pc)) = (resource(a), resource(b), resource(c));
        if zero_c {
            let bytes = c.meta.shape().iter().product::<usize>() * size;
            // SAFETY: `c` is a live contiguous allocation of `bytes`, on the handle's stream.
            unsafe { driver::memset_d8_async(pc, 0, bytes, blas.stream) }.unwrap_or_else(|e| panic!("zeroing a grouped GEMM's output: {e:?}"));
        }
        if groups == 0 {
            return (ga, gb, gc);
        }
        let mut pointers: Vec<u64> = Vec::with_capacity(3 * groups);
        pointers.extend(problems.iter().map(|p| pa + (p.a * size) as u64));
        pointers.extend(problems.iter().map(|p| pb + (p.b * size) as u64));
        pointers.extend(problems.iter().map(|p| pc + (p.c * size) as u64));
        let device = pointer_buffer(blas, pointers.len());
        // SAFETY: `device` holds `3 * groups` pointers, on the handle's stream; the copy from
        // pageable memory returns once `pointers` is staged; the GEMM reads the operands' live
        // allocations (guards held until it is queued, later uses ordered behind it) at offsets
        // inside them; the host arrays are read at the call.
        let status = unsafe {
            if let Err(e) = driver::memcpy_htod_async(device, &pointers, blas.stream) {
                panic!("copying a grouped GEMM's pointers to the device: {e:?}");
            }
            let at = |i: usize| (device + (i * groups * 8) as u64) as *const *const std::ffi::c_void;
            sys::cublasGemmGroupedBatchedEx(
                blas.handle,
                ta.as_ptr(),
                tb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr().cast(),
                at(0),
                dtype,
                lda.as_ptr(),
                at(1),
                dtype,
                ldb.as_ptr(),
                beta.as_ptr().cast(),
                at(2) as *const *mut std::ffi::c_void,
                dtype,
                ldc.as_ptr(),
                groups as i32,
                ones.as_ptr(),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
            .result()
        };
        if let Err(e) = status {
            panic!("cuBLAS grouped GEMM of {groups} problems ({:?}) failed: {e:?}", c.dtype);
        }
        (ga, gb, gc)
    });
}

/// The handle's pointer buffer, grown to hold `count` pointers (the old one freed in stream
/// order, behind the GEMMs that read it).
fn pointer_buffer(blas: &mut Blas, count: usize) -> cudarc::driver::sys::CUdeviceptr {
    let bytes = count * 8;
    match blas.pointers {
        Some((ptr, capacity)) if capacity >= bytes => ptr,
        old => {
            let capacity = bytes.next_power_of_two().max(4096);
            // SAFETY: stream-ordered allocation and free on the handle's live stream.
            unsafe {
                if let Some((ptr, _)) = old {
                    driver::free_async(ptr, blas.stream).unwrap_or_else(|e| panic!("freeing a grouped GEMM's pointers: {e:?}"));
                }
                let ptr = driver::malloc_async(blas.stream, capacity).unwrap_or_else(|e| panic!("device memory for a grouped GEMM's pointers: {e:?}"));
                blas.pointers = Some((ptr, capacity));
                ptr
            }
        }
    }
}
