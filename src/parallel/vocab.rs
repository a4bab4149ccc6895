//! The LM head and next-token loss split by vocabulary across the tensor group (Megatron's
//! vocab-parallel head and `vocab_parallel_cross_entropy`): no rank forms the full-vocabulary
//! logits. Per row, the ranks all-reduce the maximum (the softmax's shift), the sum of the
//! shifted exponentials and the target's logit (from the one rank whose block holds the label),
//! then every rank finishes the same loss; each rank's gradient is `softmax - onehot` over its
//! own block, as one rank's is over the whole vocabulary.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use super::regions::GroupComm;

/// Token ids `ids` against this rank's vocabulary block `[start, start + len)`: each id's index
/// in the block (0 where it falls outside), and whether it falls inside.
pub fn in_vocab_block<B: Backend, const D: usize>(ids: Tensor<B, D, Int>, start: usize, len: usize) -> (Tensor<B, D, Int>, Tensor<B, D, Bool>) {
    let offset = ids - start as i64;
    let here = offset.clone().greater_equal_elem(0).bool_and(offset.clone().lower_elem(len as i64));
    (offset.clamp(0, len.saturating_sub(1) as i64), here)
}

/// Rows of logits one chunk of [`vocab_parallel_linear_cross_entropy`] holds at most, in f32
/// elements (256 MiB).
const CHUNK_ELEMENTS: usize = 1 << 26;

/// The summed next-token loss of `h`'s rows through an LM head split by vocabulary across the
/// tensor group (`w`: this rank's columns `[vocab_start, vocab_start + local)`), as Megatron's
/// vocab-parallel head and cross-entropy compute it, without forming the full-vocabulary logits
/// and a chunk of rows at a time, so that no rank holds more than one chunk of its own logits:
/// per chunk the ranks all-reduce each row's maximum, sum of exponentials and target logit, and
/// every rank finishes the same loss and its own block's gradients, taken here in the forward
/// (as the fused single-device loss does, Liger's way). The returned loss carries them: its
/// gradient is `dh` for `h` (each rank's partial product over its vocabulary block; the region
/// `h` entered through sums them) and `dW` for `w` when `train_w` (the head is trained: `w`
/// may be a view of a trained parameter, such as a tied embedding's transpose, whose own
/// gradient flag says nothing). Every rank of `tp` calls
/// this at once; a failed collective is kept in `tp` and counts nothing. `chunk_rows`: rows per
/// chunk (`None`: as many as 256 MiB of f32 logits hold).
///
/// # Shapes
/// - `h`: `[rows, hidden]`, `w`: `[hidden, local]`, `labels`: `[rows]` (full-vocabulary ids) →
///   `[1]` (f32)
pub fn vocab_parallel_linear_cross_entropy<B: crate::backend::TrainBackend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    train_w: bool,
    labels: Tensor<B, 1, Int>,
    vocab_start: usize,
    ignore_index: i64,
    tp: &GroupComm<B::Wire>,
    chunk_rows: Option<usize>,
) -> Tensor<B, 1> {
    use super::regions::Collective;
    use burn::tensor::{DType, IndexingUpdateOp};
    let [rows, _] = h.dims();
    let local = w.dims()[1];
    let (hd, wd) = (h.clone().detach(), w.clone().detach());
    let (device, dtype) = (h.device(), h.dtype());
    let reduce = |x: Tensor<B, 2>, c: Collective| {
        B::collective(x.clone(), c, tp).unwrap_or_else(|e| {
            tp.latch(e);
            x.zeros_like()
        })
    };
    let chunk = chunk_rows.unwrap_or(CHUNK_ELEMENTS / local.max(1)).clamp(1, rows.max(1));
    let (mut loss, mut dh, mut dw) = (Tensor::<B, 1>::zeros([1], (&device, DType::F32)), Vec::new(), None::<Tensor<B, 2>>);
    for start in (0..rows).step_by(chunk) {
        let c = chunk.min(rows - start);
        let hc = hd.clone().narrow(0, start, c);
        let lab = labels.clone().narrow(0, start, c);
        let logits = B::gemm(hc.clone(), false, wd.clone(), false, DType::F32, None);
        let shift = reduce(logits.clone().max_dim(1), Collective::AllReduceMax);
        let shifted = logits - shift;
        let exp = shifted.clone().exp();
        let sum_exp = reduce(exp.clone().sum_dim(1), Collective::AllReduce);
        let (index, here) = in_vocab_block(lab.clone(), vocab_start, local);
        let (index, here) = (index.reshape([c, 1]), here.float().cast(DType::F32).reshape([c, 1]));
        let counted = lab.not_equal_elem(ignore_index).float().cast(DType::F32).reshape([c, 1]);
        // The target's shifted logit, from the one rank whose block holds it.
        let target = reduce(shifted.gather(1, index.clone()) * here.clone(), Collective::AllReduce);
        loss = loss + ((sum_exp.clone().log() - target) * counted.clone()).sum();
        let onehot = exp.zeros_like().scatter(1, index, here, IndexingUpdateOp::Add);
        let dlogits = ((exp / sum_exp - onehot) * counted).cast(wd.dtype());
        dh.push(B::gemm(dlogits.clone(), false, wd.clone(), true, dtype, None));
        if train_w {
            let g = B::gemm(hc, true, dlogits, false, DType::F32, None);
            dw = Some(match dw {
                Some(acc) => acc + g,
                None => g,
            });
        }
    }
    // The loss's value, and `dh` / `dW` as its gradients: `x - x` is zero in value, and its
    // gradient is the detached factor's.
    let loss = loss.detach();
    let carried = |x: Tensor<B, 2>, g: Tensor<B, 2>| {
        let g = g.cast(x.dtype()).detach();
        let t = (x * g).cast(DType::F32).sum();
        t.clone() - t.detach()
    };
    let mut out = loss + carried(h, Tensor::cat(dh, 0));
    if let Some(g) = dw {
        out = out + carried(w, g);
    }
    out
}
