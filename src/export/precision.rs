//! `trainer export --test-precision`: one fixed chat sample, rendered with the recipe's
//! template, through (a) the base model with the trained adapter applied unmerged (or the fully
//! trained weights) and (b) the exported model read back from disk, both in f32, and how far
//! their logits are apart (ms-swift's `--test_convert_precision`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::TrainBackend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::backend::{self, BackendJob};
use crate::data::{self, ChatTemplate, Conversation, Encoder, Role, IGNORE};
use crate::error::{Error, Result};
use crate::model::{self, hub::Fetch, ModelPlan, Registry};
use crate::parallel::Layout;
use crate::recipe::{self, Init, ModelSection, Recipe};
use crate::run::checkpoint::{self as ckpt, NamedTensor};

/// The sample: a short instruction and its answer, so the label positions cover real text.
pub fn sample_conversation() -> Conversation {
    Conversation::new(
        None,
        &[
            (Role::User, "Give three tips for staying healthy."),
            (
                Role::Assistant,
                "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n3. Sleep seven to eight hours a night.",
            ),
        ],
    )
}

/// How far the exported model's logits are from the trained one's on the sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionReport {
    pub tokens: usize,
    /// Mean |diff| over the vocabulary at each position.
    pub per_token_mean: Vec<f64>,
    pub mean: f64,
    pub max: f64,
    /// Positions whose next token is a label (what training scored).
    pub label_positions: usize,
    pub label_mean: f64,
    pub label_max: f64,
    pub argmax_agree: usize,
    pub label_argmax_agree: usize,
    pub threshold: f64,
    pub device: String,
}

impl PrecisionReport {
    pub fn passed(&self) -> bool {
        self.label_mean <= self.threshold
    }
}

impl std::fmt::Display for PrecisionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "precision check: {} tokens of a fixed chat sample, logits in f32 on {}", self.tokens, self.device)?;
        let per: Vec<String> = self.per_token_mean.iter().map(|d| format!("{d:.1e}")).collect();
        writeln!(f, "  per-token mean |diff|: {}", per.join(" "))?;
        writeln!(
            f,
            "  all positions:   mean |diff| {:.3e}, max |diff| {:.3e}, argmax agrees {}/{}",
            self.mean, self.max, self.argmax_agree, self.tokens
        )?;
        writeln!(
            f,
            "  label positions: mean |diff| {:.3e}, max |diff| {:.3e}, argmax agrees {}/{}",
            self.label_mean, self.label_max, self.label_argmax_agree, self.label_positions
        )?;
        write!(
            f,
            "  {} (label mean {:.3e} {} threshold {})",
            if self.passed() { "passed" } else { "FAILED" },
            self.label_mean,
            if self.passed() { "<=" } else { ">" },
            self.threshold
        )
    }
}

/// Compare the trained model of `checkpoint` (recipe `r`) with the model exported to
/// `exported`. `logits_out`: also write the sample and both logits as safetensors.
pub fn check(
    r: &Recipe,
    plan: &ModelPlan,
    checkpoint: &Path,
    exported: &Path,
    registry: &Registry,
    threshold: f64,
    device: recipe::Device,
    logits_out: Option<&Path>,
) -> Result<PrecisionReport> {
    let tokenizer = match &r.model.tokenizer {
        Some(t) => PathBuf::from(t),
        None => data::tokenizer_path(plan.dir.as_deref(), r)?,
    };
    let encoder = Encoder::from_file(&tokenizer)?;
    let template = ChatTemplate::for_data(&r.data.template_options(), &tokenizer)?;
    let sample = data::sample(&sample_conversation(), r.data.system.as_deref(), &template, &encoder)?;
    let job = Compare { r, plan, checkpoint, exported, registry, ids: &sample.input_ids };
    let (trained, merged, vocab) = backend::dispatch(device, recipe::DType::F32, job)?;
    let s = sample.len();
    let mut per_token_mean = Vec::with_capacity(s);
    let (mut sum, mut max, mut label_sum, mut label_max, mut labels) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    let (mut agree, mut label_agree) = (0, 0);
    let argmax = |row: &[f32]| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
    for t in 0..s {
        let (a, b) = (&trained[t * vocab..(t + 1) * vocab], &merged[t * vocab..(t + 1) * vocab]);
        let (mut row_sum, mut row_max) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(b) {
            let d = f64::from((x - y).abs());
            row_sum += d;
            row_max = row_max.max(d);
        }
        let row_mean = row_sum / vocab as f64;
        per_token_mean.push(row_mean);
        sum += row_mean;
        max = max.max(row_max);
        let same = argmax(a) == argmax(b);
        agree += usize::from(same);
        // Position t predicts token t + 1: it is scored when that token is a label.
        if sample.labels.get(t + 1).is_some_and(|&l| l != IGNORE) {
            labels += 1;
            label_sum += row_mean;
            label_max = label_max.max(row_max);
            label_agree += usize::from(same);
        }
    }
    if let Some(path) = logits_out {
        let as_f32 = |v: Vec<f32>, shape: Vec<usize>| TensorData::new(v, shape);
        let tensors = vec![
            NamedTensor { name: "input_ids".into(), data: as_f32(sample.input_ids.iter().map(|&i| i as f32).collect(), vec![s]) },
            NamedTensor { name: "labels".into(), data: as_f32(sample.labels.iter().map(|&l| l as f32).collect(), vec![s]) },
            NamedTensor { name: "logits_trained".into(), data: as_f32(trained, vec![s, vocab]) },
            NamedTensor { name: "logits_exported".into(), data: as_f32(merged, vec![s, vocab]) },
        ];
        ckpt::write_safetensors(path, &tensors, BTreeMap::new())?;
    }
    Ok(PrecisionReport {
        tokens: s,
        per_token_mean,
        mean: sum / s.max(1) as f64,
        max,
        label_positions: labels,
        label_mean: if labels == 0 { 0.0 } else { label_sum / labels as f64 },
        label_max,
        argmax_agree: agree,
        label_argmax_agree: label_agree,
        threshold,
        device: format!("{:?}", backend::resolve(device)).to_lowercase(),
    })
}

struct Compare<'a> {
    r: &'a Recipe,
    plan: &'a ModelPlan,
    checkpoint: &'a Path,
    exported: &'a Path,
    registry: &'a Registry,
    ids: &'a [u32],
}

impl BackendJob for Compare<'_> {
    /// Trained logits, exported logits (`[seq, vocab]` row-major) and the vocabulary size.
    type Output = (Vec<f32>, Vec<f32>, usize);

    fn run<B: TrainBackend>(self, device: B::Device) -> Result<Self::Output> {
        let r = self.r;
        let f32_section = |s: &ModelSection| ModelSection { dtype: recipe::DType::F32, ..s.clone() };
        // (a) the base with the trained tensors, adapters unmerged.
        let trained = {
            let m = model::build::<B>(self.plan, &f32_section(&r.model), Layout::SINGLE, &device)?;
            let m = crate::train::checkpoints::with_trained(m, self.checkpoint, r)?;
            logits(&m, self.ids, &device)?
        };
        // (b) the exported folder, read back as a base model.
        let section = ModelSection {
            path: Some(self.exported.display().to_string()),
            family: r.model.family.clone(),
            init: Init::Pretrained,
            ..f32_section(&ModelSection::default())
        };
        let plan = model::plan(&section, self.registry, Fetch::All)?;
        let m = model::build::<B>(&plan, &section, Layout::SINGLE, &device)?;
        let merged = logits(&m, self.ids, &device)?;
        B::sync(&device).map_err(|e| Error::Internal(format!("device sync failed: {e:?}")))?;
        Ok((trained, merged, plan.spec.vocab_size))
    }
}

fn logits<B: TrainBackend>(m: &model::CausalLm<B>, ids: &[u32], device: &B::Device) -> Result<Vec<f32>> {
    let n = ids.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, n]), device);
    let out = m.forward(ids).cast(burn::tensor::FloatDType::F32).into_data();
    out.convert::<f32>().into_vec::<f32>().map_err(|e| Error::Internal(format!("logits: {e:?}")))
}
