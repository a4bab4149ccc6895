//! A mixture of experts' routed slots laid out expert after expert, made where the router's
//! choices are: [`ExpertRoutingBackend::expert_rows`]. The plain definition reads the choices to
//! the host and sorts them there ([`reference_expert_rows`]); CubeCL backends count and place
//! them in one kernel (`cube/routing.rs`), so only the per-expert counts (what a grouped GEMM
//! needs on the host) cross to the host.
//!
//! [`ExpertRoutingBackend::combine_rows`] is the way back: each token's output is its slots'
//! rows weighted by the router and added up, one pass over the rows (forward) and one over the
//! rows and the output's gradient (backward), instead of a gather, a product and a sum, each
//! writing a `[slots, hidden]` tensor.
//!
//! The layout is a stable counting sort: slot `s = token * top_k + j` routed to expert `e` gets
//! row `offset(e) + (the slots of e before s)`, `offset(e)` being the slots routed to experts
//! before `e`. Rows of one expert keep token order, so the layout (and every sum over an expert's
//! rows, such as its weight gradient) is the same from run to run.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::layer_ops::{float, primitive, to_f32};

/// Where the routed slots sit, laid out expert after expert. With `tokens * top_k` slots there
/// are as many rows; every tensor is on the choices' device.
#[derive(Debug, Clone)]
pub struct ExpertRows<B: Backend> {
    /// `[slots]`: the row of each slot.
    pub slot_row: Tensor<B, 1, Int>,
    /// `[slots]`: the slot each row serves (the inverse permutation of `slot_row`).
    pub row_slot: Tensor<B, 1, Int>,
    /// `[slots]`: the token each row reads (`row_slot / top_k`).
    pub row_token: Tensor<B, 1, Int>,
    /// `[experts]`: rows of each expert; expert `e`'s rows follow those of experts `0..e`.
    pub counts: Tensor<B, 1, Int>,
}

impl<B: Backend> ExpertRows<B> {
    /// Each index tensor through `f` (to another backend's tensors).
    pub fn map<C: Backend>(self, f: impl Fn(Tensor<B, 1, Int>) -> Tensor<C, 1, Int>) -> ExpertRows<C> {
        ExpertRows { slot_row: f(self.slot_row), row_slot: f(self.row_slot), row_token: f(self.row_token), counts: f(self.counts) }
    }
}

/// Backends that lay out routed slots ([`ExpertRows`]); by default on the host.
pub trait ExpertRoutingBackend: Backend {
    /// The layout of the router's choices `chosen` (`[tokens, top_k]`, each an expert index in
    /// `0..experts`).
    fn expert_rows(chosen: Tensor<Self, 2, Int>, experts: usize) -> ExpertRows<Self> {
        reference_expert_rows(chosen, experts)
    }

    /// `out[r] = src[index[r]]`: the dispatch of tokens' rows to their slots' rows (on
    /// `Autodiff`, Burn's `select` and its scatter backward; trainer's routing op gathers back
    /// instead, knowing the inverse map).
    ///
    /// # Shapes
    /// - `src`: `[n, hidden]`, `index`: `[m]` → `[m, hidden]`
    fn gather_rows(src: Tensor<Self, 2>, index: Tensor<Self, 1, Int>) -> Tensor<Self, 2> {
        src.select(0, index)
    }

    /// Each token's output from its `top_k` slots' rows: `out[t] = sum_j weights[s] ys[slot_row[s]]`
    /// over `s = t * top_k + j`, in f32, returned in `ys`' dtype. Differentiable in `ys` and
    /// `weights` on `Autodiff`.
    ///
    /// # Shapes
    /// - `ys`: `[slots, hidden]` (laid out by `rows`), `weights`: `[slots]` → `[slots / top_k, hidden]`
    fn combine_rows(ys: Tensor<Self, 2>, weights: Tensor<Self, 1>, rows: &ExpertRows<Self>, top_k: usize) -> Tensor<Self, 2> {
        reference_combine(ys, weights, rows, top_k)
    }

    /// [`combine_rows`](Self::combine_rows)' gradients from the output's `dy`: `ys`' (in `dy`'s
    /// dtype) and, where `ys` is given, `weights'` (in f32).
    fn combine_rows_grad(dy: Tensor<Self, 2>, ys: Option<Tensor<Self, 2>>, weights: Tensor<Self, 1>, rows: &ExpertRows<Self>, top_k: usize) -> (Tensor<Self, 2>, Option<Tensor<Self, 1>>) {
        reference_combine_grad(dy, ys, weights, rows, top_k)
    }
}

/// The definition of [`ExpertRoutingBackend::combine_rows`].
pub fn reference_combine<B: Backend>(ys: Tensor<B, 2>, weights: Tensor<B, 1>, rows: &ExpertRows<B>, top_k: usize) -> Tensor<B, 2> {
    let [_, hidden] = ys.dims();
    let [slots] = weights.dims();
    let dtype = ys.dtype();
    let picked = to_f32(ys.select(0, rows.slot_row.clone()));
    let weighted = picked * to_f32(weights).reshape([slots, 1]);
    weighted.reshape([slots / top_k, top_k, hidden]).sum_dim(1).reshape([slots / top_k, hidden]).cast(dtype)
}

/// The definition of [`ExpertRoutingBackend::combine_rows_grad`]: `d ys[r] = weights[s] dy[t]`
/// for the slot `s` row `r` serves and its token `t`; `d weights[s] = dy[t] . ys[slot_row[s]]`.
pub fn reference_combine_grad<B: Backend>(dy: Tensor<B, 2>, ys: Option<Tensor<B, 2>>, weights: Tensor<B, 1>, rows: &ExpertRows<B>, top_k: usize) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
    let [tokens, hidden] = dy.dims();
    let slots = tokens * top_k;
    let dtype = dy.dtype();
    let dy = to_f32(dy);
    let row_weight = to_f32(weights).select(0, rows.row_slot.clone());
    let d_ys = (dy.clone().select(0, rows.row_token.clone()) * row_weight.reshape([slots, 1])).cast(dtype);
    let d_weights = ys.map(|ys| {
        let per_slot = dy.reshape([tokens, 1, hidden]).expand([tokens, top_k, hidden]).reshape([slots, hidden]);
        (per_slot * to_f32(ys.select(0, rows.slot_row.clone()))).sum_dim(1).reshape([slots])
    });
    (d_ys, d_weights)
}

/// The definition of [`ExpertRoutingBackend::expert_rows`], on the host.
///
/// # Panics
/// If a choice is outside `0..experts`.
pub fn reference_expert_rows<B: Backend>(chosen: Tensor<B, 2, Int>, experts: usize) -> ExpertRows<B> {
    let device = chosen.device();
    let [_, top_k] = chosen.dims();
    let chosen: Vec<i64> = chosen.into_data().convert::<i64>().to_vec().unwrap_or_default();
    let (slot_row, row_slot, counts) = layout_on_host(&chosen, experts);
    let row_token = row_slot.iter().map(|&s| s / top_k.max(1) as i64).collect();
    let ints = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), &device)
    };
    ExpertRows { slot_row: ints(slot_row), row_slot: ints(row_slot), row_token: ints(row_token), counts: ints(counts) }
}

/// `(slot_row, row_slot, counts)` of `chosen` (one expert a slot) over `experts` experts.
fn layout_on_host(chosen: &[i64], experts: usize) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let mut counts = vec![0i64; experts];
    for &e in chosen {
        let e = usize::try_from(e).ok().filter(|&e| e < experts);
        counts[e.unwrap_or_else(|| panic!("a routed slot's expert is outside 0..{experts}"))] += 1;
    }
    let mut next: Vec<i64> = counts.iter().scan(0, |acc, &c| {
        let first = *acc;
        *acc += c;
        Some(first)
    }).collect();
    let mut slot_row = vec![0i64; chosen.len()];
    let mut row_slot = vec![0i64; chosen.len()];
    for (slot, &e) in chosen.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        slot_row[slot] = row;
        row_slot[row as usize] = slot as i64;
    }
    (slot_row, row_slot, counts)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> ExpertRoutingBackend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

/// The choices carry no gradient: laid out by the inner backend.
impl<B: ExpertRoutingBackend, C: CheckpointStrategy> ExpertRoutingBackend for Autodiff<B, C> {
    fn expert_rows(chosen: Tensor<Self, 2, Int>, experts: usize) -> ExpertRows<Self> {
        let inner = Tensor::<B, 2, Int>::from_primitive(chosen.into_primitive());
        B::expert_rows(inner, experts).map(|t| Tensor::from_primitive(t.into_primitive()))
    }

    fn combine_rows(ys: Tensor<Self, 2>, weights: Tensor<Self, 1>, rows: &ExpertRows<Self>, top_k: usize) -> Tensor<Self, 2> {
        let (ys, weights) = (ys.into_primitive().tensor(), weights.into_primitive().tensor());
        let inner_rows = rows.clone().map(|t| Tensor::<B, 1, Int>::from_primitive(t.into_primitive()));
        let forward = |ys, weights| primitive(B::combine_rows(float(ys), float(weights), &inner_rows, top_k));
        let out = match CombineBackward.prepare::<C>([ys.node.clone(), weights.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                // The weights' gradient reads the rows; the rows' reads only the weights.
                let kept_ys = weights.is_tracked().then(|| ys.primitive.clone());
                let state = CombineState { ys: kept_ys, weights: weights.primitive.clone(), rows: inner_rows.clone(), top_k };
                prep.finish(state, forward(ys.primitive, weights.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(ys.primitive, weights.primitive)),
        };
        float(out)
    }
}

#[derive(Debug, Clone)]
struct CombineState<B: Backend> {
    ys: Option<burn::tensor::ops::FloatTensor<B>>,
    weights: burn::tensor::ops::FloatTensor<B>,
    rows: ExpertRows<B>,
    top_k: usize,
}

#[derive(Debug)]
struct CombineBackward;

impl<B: ExpertRoutingBackend> Backward<B, 2> for CombineBackward {
    type State = CombineState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_ys, node_weights] = ops.parents;
        let dy = float::<B, 2>(grads.consume::<B>(&ops.node));
        let CombineState { ys, weights, rows, top_k } = ops.state;
        let weights = float::<B, 1>(weights);
        let dtype = weights.dtype();
        let (d_ys, d_weights) = B::combine_rows_grad(dy, ys.map(float), weights, &rows, top_k);
        if let Some(node) = node_ys {
            grads.register::<B>(node.id, primitive(d_ys));
        }
        if let (Some(node), Some(dw)) = (node_weights, d_weights) {
            grads.register::<B>(node.id, primitive(dw.cast(dtype)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_layout_is_a_stable_counting_sort() {
        // 4 tokens, top 2, 5 experts (expert 3 gets nothing).
        let chosen = [1, 4, 0, 1, 4, 2, 1, 0];
        let (slot_row, row_slot, counts) = layout_on_host(&chosen, 5);
        assert_eq!(counts, [2, 3, 1, 0, 2]);
        // Expert 0: slots 2, 7; expert 1: 0, 3, 6; expert 2: 5; expert 4: 1, 4.
        assert_eq!(row_slot, [2, 7, 0, 3, 6, 5, 1, 4]);
        for (slot, &row) in slot_row.iter().enumerate() {
            assert_eq!(row_slot[row as usize], slot as i64);
        }
    }
}
