//! Megatron's tensor-parallel linear layers, with LoRA sharded as Megatron's LoRA shards it.
//!
//! [`ColumnParallelLinear`] holds a block of the output columns (`w: [in, out / tp]`, its bias
//! block, LoRA's A whole and B's block of columns); [`RowParallelLinear`] a block of the input rows
//! (`w: [in / tp, out]`, the bias whole, A's block of rows and B whole). Activations are
//! `[..., features]` with the sequence on `seq_dim` when sequence parallelism splits it.
//!
//! Where the collectives sit, so that every gradient is whole without a hook:
//! - column: `y_i = copy(x) w_i + copy(s x A) B_i`: each `copy` all-reduces its gradient, so `dx`
//!   sums the ranks' partial products once and `dA = x^T d(s x A)` sees every rank's `B_i`;
//!   with sequence parallelism `copy` is the gather from the sequence shard (reduce-scatter
//!   backward);
//! - row: `y = reduce(x_i w_i) + reduce(s x_i A_i) B`: the adapter's rank-r product is reduced
//!   before `B` (a `[rows, r]` collective), so `dB` is whole on every rank; with sequence
//!   parallelism both reductions are reduce-scatters to the sequence shard.
//!
//! With sequence parallelism the factors every tensor rank holds whole (column A, row B) see
//! only this rank's rows of the sequence: their gradients are partial sums, all-reduced over the
//! tensor group by [`reduce_sequence_parallel_grad`] as Megatron all-reduces its norms' weights.

use burn::tensor::Tensor;

use super::comm::{CommError, Communicator, ReduceOp};
use super::regions::{GroupComm, Region, RegionBackend};
use super::ProcessGroup;

/// A LoRA adapter's factors as one rank holds them, and its scale `alpha / r`.
#[derive(Debug, Clone)]
pub struct LoraShard<B: burn::tensor::backend::Backend> {
    /// `[in or in / tp, r]`.
    pub a: Tensor<B, 2>,
    /// `[r, out or out / tp]`.
    pub b: Tensor<B, 2>,
    pub scale: f64,
}

/// Where the sequence is split across the tensor group, if it is (Megatron's
/// `--sequence_parallel`): the activations' sequence dimension.
pub type SequenceParallel = Option<usize>;

/// `x w (+ bias)` over the last dim of `x`.
fn affine<B: RegionBackend, const D: usize>(x: Tensor<B, D>, w: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>) -> Tensor<B, D> {
    let y = rows(x, |x| x.matmul(w.clone()));
    match bias {
        Some(b) => y + b.clone().unsqueeze(),
        None => y,
    }
}

/// `f` over `x` flattened to `[rows, features]`, the result given `x`'s leading dims back.
fn rows<B: RegionBackend, const D: usize>(x: Tensor<B, D>, f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let m = dims[..D - 1].iter().product::<usize>();
    let y = f(x.reshape([m, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// A linear layer split by output columns over the tensor group.
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear<B: RegionBackend> {
    /// `[in, out / tp]`.
    pub weight: Tensor<B, 2>,
    /// `[out / tp]`.
    pub bias: Option<Tensor<B, 1>>,
    pub lora: Option<LoraShard<B>>,
    /// Whether the output is gathered to all `out` columns (the LM head when it is not
    /// vocab-parallel); else each rank keeps its block (what a row-parallel layer reads).
    pub gather_output: bool,
}

impl<B: RegionBackend> ColumnParallelLinear<B> {
    /// This rank's block of a full layer (`w: [in, out]`, `bias: [out]`, `a: [in, r]`,
    /// `b: [r, out]`); `out` divisible by the group's size (checked when the recipe is compiled).
    pub fn shard(w: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, lora: Option<LoraShard<B>>, tp: ProcessGroup, gather_output: bool) -> Self {
        let cols = |n: usize| tp.block(n);
        let out = w.dims()[1];
        let block = cols(out);
        ColumnParallelLinear {
            weight: w.narrow(1, block.start, block.len()),
            bias: bias.map(|b| b.narrow(0, block.start, block.len())),
            lora: lora.map(|l| LoraShard { b: l.b.narrow(1, block.start, block.len()), ..l }),
            gather_output,
        }
    }

    /// # Shapes
    /// - `x`: `[..., in]` (its sequence shard under sequence parallelism) → `[..., out / tp]`,
    ///   or `[..., out]` when gathered
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, tp: &GroupComm<B::Wire>, sp: SequenceParallel) -> Result<Tensor<B, D>, CommError> {
        let enter = |t: Tensor<B, D>| match sp {
            Some(dim) => B::region(t, Region::GatherFromSequence, dim, tp),
            None => B::region(t, Region::CopyToTensor, 0, tp),
        };
        let mut y = affine(enter(x.clone())?, &self.weight, self.bias.as_ref());
        if let Some(l) = &self.lora {
            let t = rows(x, |x| x.matmul(l.a.clone()) * l.scale);
            y = y + rows(enter(t)?, |t| t.matmul(l.b.clone()));
        }
        if self.gather_output {
            y = B::region(y, Region::GatherFromTensor, D - 1, tp)?;
        }
        Ok(y)
    }
}

/// A linear layer split by input rows over the tensor group.
#[derive(Debug, Clone)]
pub struct RowParallelLinear<B: RegionBackend> {
    /// `[in / tp, out]`.
    pub weight: Tensor<B, 2>,
    /// `[out]`, added once after the reduction.
    pub bias: Option<Tensor<B, 1>>,
    pub lora: Option<LoraShard<B>>,
    /// Whether the input is already this rank's block of features (a column-parallel layer's
    /// output); else it is split here.
    pub input_is_parallel: bool,
}

impl<B: RegionBackend> RowParallelLinear<B> {
    /// This rank's block of a full layer (`w: [in, out]`, `a: [in, r]`); `in` divisible by the
    /// group's size.
    pub fn shard(w: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, lora: Option<LoraShard<B>>, tp: ProcessGroup, input_is_parallel: bool) -> Self {
        let block = tp.block(w.dims()[0]);
        RowParallelLinear {
            weight: w.narrow(0, block.start, block.len()),
            bias,
            lora: lora.map(|l| LoraShard { a: l.a.narrow(0, block.start, block.len()), ..l }),
            input_is_parallel,
        }
    }

    /// # Shapes
    /// - `x`: `[..., in / tp]` (or `[..., in]` when not `input_is_parallel`) → `[..., out]`
    ///   (its sequence shard under sequence parallelism)
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, tp: &GroupComm<B::Wire>, sp: SequenceParallel) -> Result<Tensor<B, D>, CommError> {
        let x = if self.input_is_parallel { x } else { B::region(x, Region::ScatterToTensor, D - 1, tp)? };
        let leave = |t: Tensor<B, D>| match sp {
            Some(dim) => B::region(t, Region::ReduceScatterToSequence, dim, tp),
            None => B::region(t, Region::ReduceFromTensor, 0, tp),
        };
        let mut y = leave(affine(x.clone(), &self.weight, None))?;
        if let Some(l) = &self.lora {
            let t = leave(rows(x, |x| x.matmul(l.a.clone()) * l.scale))?;
            y = y + rows(t, |t| t.matmul(l.b.clone()));
        }
        Ok(match &self.bias {
            Some(b) => y + b.clone().unsqueeze(),
            None => y,
        })
    }
}

/// The gradient of a factor every tensor rank holds whole but that saw only this rank's rows of
/// the sequence (column A, row B under sequence parallelism; norms' weights likewise): summed over
/// the tensor group, so every rank applies the same update.
pub fn reduce_sequence_parallel_grad<W: burn::tensor::backend::Backend, const D: usize>(
    grad: Tensor<W, D>,
    tp: &dyn Communicator<W>,
) -> Result<Tensor<W, D>, CommError> {
    let dims = grad.dims();
    let n = dims.iter().product::<usize>();
    Ok(tp.all_reduce(grad.reshape([n]), ReduceOp::Sum)?.reshape(dims))
}
