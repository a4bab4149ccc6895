//! The routing of activation-recomputed MoE layers, kept from their first forward for their
//! replay in backward. The replay then routes every token to the experts the first pass chose
//! (whatever a second router GEMM rounds to), reuses the first pass's slot layout, and reads no
//! expert counts back from the device: each such read waits for the device to drain, one per
//! MoE layer and pass, in a step the host already struggles to keep fed.
//!
//! The first pass runs on the inner backend (no graph) and the replay on the autodiff backend,
//! so the memo comes as a pair sharing one store: [`RoutingMemo::pair`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use kernels_cubecl::ExpertRows;

/// One MoE layer's routing: what its replay needs to route as its first pass did.
#[derive(Debug, Clone)]
pub struct Routed<B: Backend> {
    /// `[tokens, top_k]`: each token's experts.
    pub chosen: Tensor<B, 2, Int>,
    /// The slots laid out expert after expert.
    pub rows: ExpertRows<B>,
    /// `rows.counts` on the host.
    pub counts: Vec<usize>,
}

type Store<B> = Arc<Mutex<HashMap<ParamId, Routed<B>>>>;
type Put<B> = Arc<dyn Fn(ParamId, &Routed<B>) + Send + Sync>;
type Take<B> = Arc<dyn Fn(ParamId) -> Option<Routed<B>> + Send + Sync>;

/// One side of a pass's routing memo: the recording side (the recomputed layers' first forward)
/// or the replaying side (their forward again in backward). A layer is known by its router's
/// weight id, which the replay's fresh parameters keep.
#[derive(Clone)]
pub struct RoutingMemo<B: Backend> {
    put: Option<Put<B>>,
    take: Option<Take<B>>,
}

impl<B: Backend> std::fmt::Debug for RoutingMemo<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.put.is_some() { "RoutingMemo(records)" } else { "RoutingMemo(replays)" })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B: AutodiffBackend> RoutingMemo<B> {
    /// `(replaying side on B, recording side on B's inner backend)`, sharing one store. A
    /// routing is taken once: a layer replayed twice (or a layer kept in the graph) routes
    /// afresh.
    pub fn pair() -> (RoutingMemo<B>, RoutingMemo<B::InnerBackend>) {
        let store: Store<B> = Arc::default();
        let taken = store.clone();
        let take: Take<B> = Arc::new(move |key| lock(&taken).remove(&key));
        let put: Put<B::InnerBackend> = Arc::new(move |key, routed: &Routed<B::InnerBackend>| {
            let routed = routed.clone();
            let lifted = Routed { chosen: Tensor::from_inner(routed.chosen), rows: routed.rows.map(Tensor::from_inner), counts: routed.counts };
            lock(&store).insert(key, lifted);
        });
        (RoutingMemo { put: None, take: Some(take) }, RoutingMemo { put: Some(put), take: None })
    }
}

impl<B: Backend> RoutingMemo<B> {
    /// The routing the first pass recorded for the layer whose router weight is `key`, once.
    pub fn replay(&self, key: ParamId) -> Option<Routed<B>> {
        self.take.as_ref().and_then(|take| take(key))
    }

    /// Keep `routed` for the replay (the recording side only).
    pub fn record(&self, key: ParamId, routed: &Routed<B>) {
        if let Some(put) = &self.put {
            put(key, routed);
        }
    }

    /// Whether this side keeps what [`record`](Self::record) is given.
    pub fn records(&self) -> bool {
        self.put.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::backend::Autodiff;
    use burn::tensor::TensorData;

    fn ints(v: &[i64]) -> Tensor<Cpu, 1, Int> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    #[test]
    fn the_replaying_side_takes_what_the_recording_side_kept_once() {
        let (replay, record) = RoutingMemo::<Autodiff<Cpu>>::pair();
        assert!(record.records() && !replay.records());
        let (key, other) = (ParamId::new(), ParamId::new());
        let rows = ExpertRows { slot_row: ints(&[1, 0]), row_slot: ints(&[1, 0]), row_token: ints(&[0, 0]), counts: ints(&[0, 2]) };
        let routed = Routed { chosen: ints(&[1, 1]).reshape([1, 2]), rows, counts: vec![0, 2] };
        record.record(key, &routed);
        // The replaying side records nothing.
        replay.record(other, &Routed { chosen: Tensor::from_inner(routed.chosen.clone()), rows: routed.rows.clone().map(Tensor::from_inner), counts: vec![] });
        assert!(replay.replay(other).is_none());
        let got = replay.replay(key).expect("recorded");
        assert_eq!(got.counts, vec![0, 2]);
        assert_eq!(got.chosen.into_data(), TensorData::new(vec![1i64, 1], [1, 2]));
        assert_eq!(got.rows.slot_row.into_data(), TensorData::new(vec![1i64, 0], [2]));
        assert!(replay.replay(key).is_none(), "taken once");
    }
}
