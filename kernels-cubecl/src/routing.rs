//! A mixture of experts' routed slots laid out expert after expert, made where the router's
//! choices are: [`ExpertRoutingBackend::expert_rows`]. The plain definition reads the choices to
//! the host and sorts them there ([`reference_expert_rows`]); CubeCL backends count and place
//! them in one kernel (`cube/routing.rs`), so only the per-expert counts (what a grouped GEMM
//! needs on the host) cross to the host.
//!
//! The layout is a stable counting sort: slot `s = token * top_k + j` routed to expert `e` gets
//! row `offset(e) + (the slots of e before s)`, `offset(e)` being the slots routed to experts
//! before `e`. Rows of one expert keep token order, so the layout (and every sum over an expert's
//! rows, such as its weight gradient) is the same from run to run.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

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

/// Backends that lay out routed slots ([`ExpertRows`]); by default on the host.
pub trait ExpertRoutingBackend: Backend {
    /// The layout of the router's choices `chosen` (`[tokens, top_k]`, each an expert index in
    /// `0..experts`).
    fn expert_rows(chosen: Tensor<Self, 2, Int>, experts: usize) -> ExpertRows<Self> {
        reference_expert_rows(chosen, experts)
    }
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
        let r = B::expert_rows(inner, experts);
        let outer = |t: Tensor<B, 1, Int>| Tensor::<Self, 1, Int>::from_primitive(t.into_primitive());
        ExpertRows { slot_row: outer(r.slot_row), row_slot: outer(r.row_slot), row_token: outer(r.row_token), counts: outer(r.counts) }
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
