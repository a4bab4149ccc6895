//! Grouped GEMMs: the rows of `x` in consecutive groups (a mixture of experts' routed slots laid
//! out expert after expert), each group multiplied by its own matrix, no group padded to
//! another's size. [`LinearBackend::gemm_grouped`] and [`LinearBackend::gemm_grouped_outer`] are
//! the primitives (defaults here: a GEMM a group in Burn's ops; cuBLAS's grouped GEMM on CUDA,
//! `cube/cublas_grouped.rs`); [`LinearBackend::grouped_matmul`] is the differentiable op, its
//! backward two more grouped GEMMs:
//! - `dX_g = dY_g W_g^T` (the same grouped GEMM over `W`'s transposed view),
//! - `dW_g = X_g^T dY_g` (the outer form, `k` summed over the group's rows).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::autodiff::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::layer_ops::{float, primitive, to_dtype};
use crate::linear::{product_backward, tracked_product, LinearBackend, ProductState};

/// The definition of [`LinearBackend::gemm_grouped`]: `x_g @ w[g]` for each group, in f32,
/// returned in `x`'s dtype.
///
/// # Shapes
/// - `x`: `[sum(counts), k]`, `w`: `[counts.len(), k, n]` → `[sum(counts), n]`
pub fn reference_gemm_grouped<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 3>, counts: &[usize]) -> Tensor<B, 2> {
    let ([rows, k], [groups, wk, n]) = (x.dims(), w.dims());
    check(rows, k, groups, wk, counts);
    let dtype = x.dtype();
    let mut parts = Vec::new();
    let mut offset = 0;
    for (g, &count) in counts.iter().enumerate() {
        if count > 0 {
            let xg = to_dtype(x.clone().narrow(0, offset, count), DType::F32);
            let wg = to_dtype(w.clone().narrow(0, g, 1).reshape([k, n]), DType::F32);
            parts.push(to_dtype(xg.matmul(wg), dtype));
            offset += count;
        }
    }
    match parts.is_empty() {
        true => Tensor::zeros([0, n], (&x.device(), dtype)),
        false => Tensor::cat(parts, 0),
    }
}

/// The definition of [`LinearBackend::gemm_grouped_outer`]: `x_g^T @ y_g` for each group (zero
/// for a group without rows), in f32, returned in `x`'s dtype.
///
/// # Shapes
/// - `x`: `[sum(counts), k]`, `y`: `[sum(counts), n]` → `[counts.len(), k, n]`
pub fn reference_gemm_grouped_outer<B: Backend>(x: Tensor<B, 2>, y: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 3> {
    let ([rows, k], [y_rows, n]) = (x.dims(), y.dims());
    check(rows, k, counts.len(), k, counts);
    assert_eq!(rows, y_rows, "grouped outer GEMM: {rows} rows against {y_rows}");
    let dtype = x.dtype();
    let device = x.device();
    let mut offset = 0;
    let blocks = counts.iter().map(|&count| {
        let block = match count {
            0 => Tensor::zeros([k, n], (&device, DType::F32)),
            _ => to_dtype(x.clone().narrow(0, offset, count), DType::F32).transpose().matmul(to_dtype(y.clone().narrow(0, offset, count), DType::F32)),
        };
        offset += count;
        block
    });
    to_dtype(Tensor::stack(blocks.collect(), 0), dtype)
}

/// [`LinearBackend::gemm_grouped_outer`] as one dense GEMM, for a narrow side (a LoRA factor's
/// rank): the narrower operand spread block-diagonally over the groups (row `i` of group `g` in
/// columns `g * w .. (g + 1) * w`, zeros elsewhere), then `x^T @ spread` (or `spread^T @ y`)
/// through [`LinearBackend::gemm`], `groups` times the narrow width wide. One GEMM where
/// cuBLAS's grouped GEMM runs a launch a group when the inner dimension is each group's rows
/// (the experts' LoRA factor gradients: ~620 launches a layer of Qwen3-30B-A3B, session 26).
/// Equal to [`reference_gemm_grouped_outer`] up to the order of the f32 accumulation (the
/// zeros add nothing); costs `groups` times the grouped GEMM's multiply-adds, worth it only
/// while the narrow width is a few columns. CUDA takes it for widths up to 64 (`cube/cublas.rs`).
///
/// # Shapes
/// - `x`: `[sum(counts), k]`, `y`: `[sum(counts), n]` → `[counts.len(), k, n]`
pub fn gemm_grouped_outer_spread<B: LinearBackend>(x: Tensor<B, 2>, y: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 3> {
    let ([rows, k], [y_rows, n]) = (x.dims(), y.dims());
    check(rows, k, counts.len(), k, counts);
    assert_eq!(rows, y_rows, "grouped outer GEMM: {rows} rows against {y_rows}");
    let (groups, dtype, device) = (counts.len(), x.dtype(), x.device());
    if rows == 0 || k == 0 || n == 0 {
        return Tensor::zeros([groups, k, n], (&device, dtype));
    }
    // Each row's group, one-hot `[rows, groups, 1]` in the operands' dtype.
    let owner: Vec<i64> = counts.iter().enumerate().flat_map(|(g, &c)| std::iter::repeat_n(g as i64, c)).collect();
    let owner = Tensor::<B, 1, Int>::from_data(TensorData::new(owner, [rows]), &device);
    let one_hot = to_dtype(owner.one_hot::<2>(groups).float(), dtype).unsqueeze_dim::<3>(2);
    let spread = |t: Tensor<B, 2>, w: usize| (one_hot.clone() * t.unsqueeze_dim::<3>(1)).reshape([rows, groups * w]);
    if n <= k {
        // [k, groups * n] -> [groups, k, n].
        B::gemm(x, true, spread(y, n), false, dtype, None).reshape([k, groups, n]).swap_dims(0, 1)
    } else {
        B::gemm(spread(x, k), true, y, false, dtype, None).reshape([groups, k, n])
    }
}

/// `counts` describes `rows` rows in `groups` groups, and `x`'s `k` columns meet the matrices'
/// `wk` rows: every grouped GEMM's contract.
pub(crate) fn check(rows: usize, k: usize, groups: usize, wk: usize, counts: &[usize]) {
    assert_eq!(counts.iter().sum::<usize>(), rows, "grouped GEMM: the groups' rows {counts:?} do not add up to x's {rows}");
    assert_eq!(groups, counts.len(), "grouped GEMM: {} groups of rows against {groups} matrices", counts.len());
    assert_eq!(k, wk, "grouped GEMM: x has {k} columns, the matrices {wk} rows");
}

/// [`LinearBackend::grouped_matmul`] on `Autodiff<B>`: one autodiff op over the inner backend's
/// grouped GEMMs, keeping `w` for `dX` and `x` for `dW` only where a parent is tracked.
pub(crate) fn tracked<B: LinearBackend, C: CheckpointStrategy>(x: Tensor<Autodiff<B, C>, 2>, w: Tensor<Autodiff<B, C>, 3>, counts: &[usize]) -> Tensor<Autodiff<B, C>, 2> {
    let forward = |x: FloatTensor<B>, w: FloatTensor<B>| primitive(B::gemm_grouped(float::<B, 2>(x), float(w), counts));
    float(tracked_product::<B, C, _>(GroupedBackward { counts: counts.to_vec() }, primitive(x), primitive(w), forward))
}

#[derive(Debug)]
struct GroupedBackward {
    counts: Vec<usize>,
}

impl<B: LinearBackend> Backward<B, 2> for GroupedBackward {
    type State = ProductState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let counts = &self.counts;
        product_backward::<B>(
            ops,
            grads,
            |dy, w| primitive(B::gemm_grouped(float(dy), float::<B, 3>(w).swap_dims(1, 2), counts)),
            |x, dy| primitive(B::gemm_grouped_outer(float(x), float(dy), counts)),
        );
    }
}
