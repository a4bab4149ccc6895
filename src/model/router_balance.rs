//! The routers' load-balancing loss (Switch Transformer's, as transformers trains Mixtral and
//! Qwen3-MoE with `router_aux_loss_coef`): over every MoE layer of a forward pass and every
//! real (not padding) token at once, as transformers concatenates the layers' router logits,
//!
//! `aux = E * sum_e f_e * P_e`,
//!
//! `f_e` the fraction of the (token, choice) slots routed to expert `e` and `P_e` the mean of
//! the routers' softmax for `e`. Only `P` carries a gradient, and `aux` is linear in each
//! layer's summed probabilities `S_l` (`P = sum_l S_l / N`, `N` = tokens x layers), with the
//! constant weight `g = E * C / N^2` (`C`: slots per expert over all layers). `g` is known once
//! the whole forward has run, so each layer records its `S_l` (with its graph) and its counts
//! here, and the step adds `g . S_l` to whatever it differentiates for the segment holding layer
//! `l`: the same for layers kept in the graph and layers replayed by activation recompute.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

/// One forward pass's record of its routers (shared by the clones a context hands its layers,
/// and with the context of the recomputed layers on the inner backend).
#[derive(Debug, Clone)]
pub struct RouterBalance<B: Backend> {
    counts: Arc<Mutex<SlotCounts>>,
    sums: Arc<Mutex<Vec<Tensor<B, 1>>>>,
    /// The real tokens among the rows the MoE layers see, host and `[rows, 1]` in f32 on the
    /// device; `None` when every row is a real token.
    mask: Option<(Arc<Vec<bool>>, Tensor<B, 2>)>,
}

#[derive(Debug, Default)]
struct SlotCounts {
    /// Slots routed to each expert, over every layer recorded.
    slots: Vec<u64>,
    /// Real tokens, over every layer recorded (`N`).
    tokens: u64,
    /// Set by [`RouterBalance::weights`]: a recomputed layer's second forward counts nothing.
    frozen: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B: Backend> RouterBalance<B> {
    /// A record for rows of which `real` says which are real tokens (`None`: all of them).
    pub fn new(real: Option<Vec<bool>>, device: &B::Device) -> Self {
        let mask = real.filter(|r| r.iter().any(|&x| !x)).map(|r| {
            let n = r.len();
            let values: Vec<f32> = r.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect();
            (Arc::new(r), Tensor::from_data(TensorData::new(values, [n, 1]), device))
        });
        RouterBalance { counts: Default::default(), sums: Default::default(), mask }
    }

    /// Record one layer's router: `probs` its softmax over all experts (`[rows, experts]`, f32)
    /// and `chosen` each row's `top_k` experts, row after row.
    pub fn record(&self, probs: Tensor<B, 2>, chosen: &[i64], top_k: usize) {
        self.record_with(probs, top_k, || Cow::Borrowed(chosen));
    }

    /// [`record`](Self::record) with the choices asked for only while counts are taken: a
    /// replayed layer's (counted in its first pass) never leave the device.
    pub fn record_with<'a>(&self, probs: Tensor<B, 2>, top_k: usize, chosen: impl FnOnce() -> Cow<'a, [i64]>) {
        let [rows, experts] = probs.dims();
        {
            let mut c = lock(&self.counts);
            if !c.frozen {
                let chosen = chosen();
                if c.slots.len() < experts {
                    c.slots.resize(experts, 0);
                }
                for (row, choice) in chosen.chunks(top_k.max(1)).enumerate().take(rows) {
                    if self.mask.as_ref().is_some_and(|(real, _)| !real.get(row).copied().unwrap_or(true)) {
                        continue;
                    }
                    c.tokens += 1;
                    for &e in choice {
                        if let Some(s) = usize::try_from(e).ok().and_then(|e| c.slots.get_mut(e)) {
                            *s += 1;
                        }
                    }
                }
            }
        }
        let probs = match &self.mask {
            Some((_, m)) => probs * m.clone(),
            None => probs,
        };
        lock(&self.sums).push(probs.sum_dim(0).reshape([experts]));
    }

    /// The layers' summed probabilities recorded since the last call, in order.
    pub fn take(&self) -> Vec<Tensor<B, 1>> {
        std::mem::take(&mut *lock(&self.sums))
    }

    /// `g`, the loss's weight on each summed probability (`[experts]`, f32, no gradient), from
    /// every layer counted so far; stops the counting. `None` when no real token was routed.
    pub fn weights(&self, device: &B::Device) -> Option<Tensor<B, 1>> {
        let mut c = lock(&self.counts);
        c.frozen = true;
        if c.tokens == 0 {
            return None;
        }
        let (e, n) = (c.slots.len() as f64, c.tokens as f64);
        let g: Vec<f32> = c.slots.iter().map(|&s| (e * s as f64 / (n * n)) as f32).collect();
        let len = g.len();
        Some(Tensor::from_data(TensorData::new(g, [len]), device))
    }

    /// The loss over `sums` (some layers' [`take`](Self::take)) with weights `g`: `[1]`; `None`
    /// for no sums. Linear in the sums: their total once, then one weighted sum.
    pub fn loss(sums: Vec<Tensor<B, 1>>, g: &Tensor<B, 1>) -> Option<Tensor<B, 1>> {
        let total = sums.into_iter().reduce(|a, b| a + b)?;
        Some((total * g.clone()).sum())
    }

    /// `base` (cast to f32) plus `weight` x the [`loss`](Self::loss) over `sums` where there are
    /// weights `g` and sums; else `base` as it is.
    pub fn plus_loss(base: Tensor<B, 1>, sums: Vec<Tensor<B, 1>>, g: Option<&Tensor<B, 1>>, weight: f64) -> Tensor<B, 1> {
        match g.and_then(|g| Self::loss(sums, g)) {
            Some(aux) => base.cast(burn::tensor::FloatDType::F32) + aux * weight,
            None => base,
        }
    }

    /// The same record (counts shared) for the inner backend's forward of recomputed layers,
    /// whose sums it keeps apart.
    pub fn inner(&self) -> RouterBalance<B::InnerBackend>
    where
        B: AutodiffBackend,
    {
        RouterBalance {
            counts: self.counts.clone(),
            sums: Default::default(),
            mask: self.mask.as_ref().map(|(r, m)| (r.clone(), m.clone().inner())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn probs(rows: &[[f32; 3]]) -> Tensor<Cpu, 2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 3]), &Default::default())
    }

    /// transformers' `load_balancing_loss_func` written out for two layers' softmax rows and
    /// choices (one-hot means over every layer's real rows).
    #[test]
    fn equals_the_switch_loss_over_all_layers_and_leaves_out_padding() {
        let d = Default::default();
        let layers = [
            (vec![[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], vec![0, 1, 1, 2, 2, 0]),
            (vec![[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]], vec![0, 1, 2, 0, 0, 1]),
        ];
        let real = [true, true, false];
        let b = RouterBalance::<Cpu>::new(Some(real.to_vec()), &d);
        for (p, c) in &layers {
            b.record(probs(p), c, 2);
        }
        let g = b.weights(&d).unwrap();
        let got = RouterBalance::loss(b.take(), &g).unwrap().into_scalar();
        // By hand: the real rows of both layers, 4 tokens, 8 slots.
        let (mut f, mut p, mut n) = ([0.0f64; 3], [0.0f64; 3], 0.0);
        for (rows, chosen) in &layers {
            for (r, row) in rows.iter().enumerate().filter(|(r, _)| real[*r]) {
                n += 1.0;
                for e in 0..3 {
                    p[e] += row[e] as f64;
                }
                for &e in &chosen[r * 2..r * 2 + 2] {
                    f[e as usize] += 1.0;
                }
            }
        }
        let want: f64 = 3.0 * (0..3).map(|e| (f[e] / n) * (p[e] / n)).sum::<f64>();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        // Counting stopped: a replay of a layer adds sums, not counts.
        b.record(probs(&layers[0].0), &layers[0].1, 2);
        assert_eq!(b.take().len(), 1);
        assert_eq!(b.weights(&d).unwrap().into_data(), g.into_data());
    }

    #[test]
    fn nothing_routed_gives_no_weights() {
        let d = Default::default();
        let b = RouterBalance::<Cpu>::new(Some(vec![false, false]), &d);
        b.record(probs(&[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]), &[2, 1], 1);
        assert!(b.weights(&d).is_none());
    }
}
