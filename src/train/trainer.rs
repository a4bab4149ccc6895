//! One optimizer step over a global batch, and evaluation.
//!
//! The loss of a step is normalised per token over the whole global batch, as Megatron does
//! with `--calculate_per_token_loss` and transformers with `num_items_in_batch`: each micro
//! batch contributes `sum(nll) / tokens(global batch)`, so a micro batch of long answers
//! weighs more than one of short answers, and accumulation does not change the result.

use std::ops::Range;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use super::optimizer::{collect_grads, AdamW, Grads};
use super::recompute::{self, GradSink};
use super::schedule::LrSchedule;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::{causal_lm_loss, CausalLm};

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean per-token loss over the global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Trained (label) tokens in the global batch.
    pub tokens: usize,
    /// All tokens, padding included, that went through the model.
    pub positions: usize,
}

pub struct Trainer<B: Backend> {
    /// `None` only while an update is being applied.
    model: Option<CausalLm<Autodiff<B>>>,
    pub optimizer: AdamW<B>,
    pub schedule: LrSchedule,
    /// Global-norm clipping threshold; 0 = off.
    pub clip: f64,
    /// Root of the per-step dropout streams.
    pub seed: u64,
    /// Layer groups recomputed in backward instead of kept.
    pub recompute: Vec<Range<usize>>,
    sink: GradSink<B>,
    pub device: B::Device,
}

/// Labels that count in the loss after the one-token shift.
pub fn trained_tokens(b: &Batch) -> usize {
    (0..b.batch_size)
        .map(|r| b.labels[r * b.seq_len..(r + 1) * b.seq_len].iter().skip(1).filter(|&&l| l != crate::model::IGNORE_INDEX).count())
        .sum()
}

/// The seed of the random stream of micro batch `micro` of step `step`: dropout masks depend on
/// nothing else, so a resumed run draws what an uninterrupted one draws.
pub fn stream_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for v in [step as u64, micro as u64] {
        h = (h ^ v).wrapping_mul(0x100_0000_01b3).rotate_left(29);
    }
    h
}

struct BatchTensors<B: Backend> {
    ids: Tensor<B, 2, Int>,
    positions: Tensor<B, 2, Int>,
    segments: Tensor<B, 2, Int>,
    labels: Tensor<B, 2, Int>,
}

fn upload<B: Backend>(b: &Batch, device: &B::Device) -> BatchTensors<B> {
    let shape = [b.batch_size, b.seq_len];
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
    BatchTensors {
        ids: int(b.input_ids.iter().map(|&x| x as i64).collect()),
        positions: int(b.position_ids.iter().map(|&x| x as i64).collect()),
        segments: int(b.segment_ids.iter().map(|&x| x as i64).collect()),
        labels: int(b.labels.clone()),
    }
}

/// Summed next-token loss of a batch through `model` (any backend), laying the layers out as
/// `recompute` says.
fn batch_loss<B: Backend>(
    model: &CausalLm<B>,
    t: BatchTensors<B>,
    layers: &dyn Fn(Tensor<B, 3>, &crate::model::SequenceContext<B>) -> Tensor<B, 3>,
) -> Tensor<B, 1> {
    let ctx = model.context(t.positions, Some(t.segments));
    let x = layers(model.embed(t.ids), &ctx);
    let hidden = model.norm.forward(x);
    causal_lm_loss(model.logits(hidden), t.labels).sum
}

impl<B: Backend> Trainer<B> {
    pub fn new(model: CausalLm<Autodiff<B>>, optimizer: AdamW<B>, schedule: LrSchedule, clip: f64, seed: u64, recompute: Vec<Range<usize>>, device: B::Device) -> Self {
        Trainer { model: Some(model), optimizer, schedule, clip, seed, recompute, sink: GradSink::new(), device }
    }

    pub fn model(&self) -> &CausalLm<Autodiff<B>> {
        self.model.as_ref().expect("the model is only absent inside `step`")
    }

    pub fn into_model(self) -> CausalLm<Autodiff<B>> {
        self.model.expect("the model is only absent inside `step`")
    }

    /// Optimizer step `step` (counting from 1) over the micro batches of one global batch.
    pub fn step(&mut self, step: usize, micro_batches: &[Batch]) -> Result<StepStats> {
        let (loss, mut grads) = self.gradients(step, micro_batches)?;
        let grad_norm = grads.global_norm();
        // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1.
        if self.clip > 0.0 {
            let coef = self.clip / (grad_norm + 1e-6);
            if coef < 1.0 {
                grads.scale(coef);
            }
        }
        let lr = self.schedule.at(step);
        let model = self.model.take().ok_or_else(|| Error::Internal("trainer model missing".into()))?;
        self.model = Some(self.optimizer.step(model, grads, lr));
        let tokens = micro_batches.iter().map(trained_tokens).sum();
        let positions = micro_batches.iter().map(|b| b.batch_size * b.seq_len).sum();
        Ok(StepStats { loss, lr, grad_norm, tokens, positions })
    }

    /// The global batch's per-token loss and the summed gradients of every trainable
    /// parameter, by module path (before clipping).
    pub fn gradients(&self, step: usize, micro_batches: &[Batch]) -> Result<(f64, Grads<B>)> {
        let tokens: usize = micro_batches.iter().map(trained_tokens).sum();
        if tokens == 0 {
            return Err(Error::data(format!("step {step}: its {} micro batches have no trained token", micro_batches.len())));
        }
        let model = self.model();
        let mut grads = Grads::<B>::default();
        let mut loss_sum = 0.0f64;
        for (k, b) in micro_batches.iter().enumerate() {
            let seed = stream_seed(self.seed, step, k);
            <Autodiff<B> as Backend>::seed(&self.device, seed);
            let groups = &self.recompute;
            let sink = &self.sink;
            let layers = |mut x: Tensor<Autodiff<B>, 3>, ctx: &crate::model::SequenceContext<Autodiff<B>>| {
                let mut i = 0;
                while i < model.layers.len() {
                    match groups.iter().find(|g| g.start == i) {
                        Some(g) => {
                            let group_seed = seed ^ ((g.start as u64 + 1) << 40);
                            x = recompute::checkpointed(&model.layers[g.clone()], x, ctx, group_seed, sink);
                            i = g.end;
                        }
                        None => {
                            x = model.layers[i].forward(x, ctx);
                            i += 1;
                        }
                    }
                }
                x
            };
            let sum = batch_loss(model, upload(b, &self.device), &layers);
            let value: f32 = sum.clone().into_scalar().elem();
            loss_sum += value as f64;
            let g = (sum / tokens as f64).backward();
            collect_grads(model, &g, &|id| self.sink.take(id), &mut grads);
        }
        Ok((loss_sum / tokens as f64, grads))
    }

    /// Mean per-token loss over `batches` without gradients; `(loss, tokens)`.
    pub fn evaluate(&self, batches: &[Batch]) -> (f64, usize) {
        let model = self.model().valid();
        let mut sum = 0.0f64;
        let mut tokens = 0;
        for b in batches {
            let n = trained_tokens(b);
            if n == 0 {
                continue;
            }
            let layers = |mut x: Tensor<B, 3>, ctx: &crate::model::SequenceContext<B>| {
                for l in &model.layers {
                    x = l.forward(x, ctx);
                }
                x
            };
            let s: f32 = batch_loss(&model, upload(b, &self.device), &layers).into_scalar().elem();
            sum += s as f64;
            tokens += n;
        }
        (if tokens > 0 { sum / tokens as f64 } else { f64::NAN }, tokens)
    }
}
