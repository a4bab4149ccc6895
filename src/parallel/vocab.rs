//! The next-token loss over logits split by vocabulary across the tensor group (Megatron's
//! `vocab_parallel_cross_entropy`): no rank forms the full-vocabulary logits. Per row, the ranks
//! all-reduce the maximum (the softmax's shift), the sum of the shifted exponentials and the
//! target's logit (from the one rank whose block holds the label), then every rank finishes the
//! same loss. The sums enter through [`Region::ReduceFromTensor`], whose backward is the
//! identity: each rank's gradient is `softmax - onehot` over its own block, as one rank's is over
//! the whole vocabulary.

use burn::tensor::{Int, Tensor};

use super::comm::CommError;
use super::regions::{GroupComm, Region, RegionBackend};

/// The summed next-token loss of `logits`' rows (this rank's vocabulary block
/// `[vocab_start, vocab_start + local)`, f32) against `labels` (full-vocabulary ids; rows whose
/// label is `ignore_index` count nothing), the same on every rank of `tp`.
///
/// # Shapes
/// - `logits`: `[rows, local]`, `labels`: `[rows]` → `[1]`
pub fn vocab_parallel_cross_entropy<B: RegionBackend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    vocab_start: usize,
    ignore_index: i64,
    tp: &GroupComm<B::Wire>,
) -> Result<Tensor<B, 1>, CommError> {
    let [rows, local] = logits.dims();
    let shift = B::region(logits.clone().detach().max_dim(1), Region::MaxFromTensor, 0, tp)?;
    let shifted = logits - shift;
    let sum_exp = B::region(shifted.clone().exp().sum_dim(1), Region::ReduceFromTensor, 0, tp)?;
    let offset = labels.clone() - vocab_start as i64;
    let here = offset.clone().greater_equal_elem(0).bool_and(offset.clone().lower_elem(local as i64));
    let index = offset.clamp(0, local.saturating_sub(1) as i64).reshape([rows, 1]);
    let target = shifted.gather(1, index) * here.float().reshape([rows, 1]);
    let target = B::region(target, Region::ReduceFromTensor, 0, tp)?;
    let counted = labels.not_equal_elem(ignore_index).float();
    Ok(((sum_exp.log() - target).reshape([rows]) * counted).sum())
}
