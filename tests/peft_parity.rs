//! LoRA training against transformers + peft + torch's AdamW (fixtures from
//! tests/fixtures/make_peft_fixtures.py, f32 on the CPU): the loss and every adapter gradient of
//! the first step, the loss and gradient norm of five AdamW steps with clipping, and the
//! adapter after them. The adapter starts from peft's own saved `adapter_init`, loaded the way
//! `checkpoint.resume` with `finetune` loads one.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use trainer::backend::Cpu;
use trainer::data::Batch;
use trainer::lora::{self, LoraConfig, LoraTargets};
use trainer::model::{self, hub::Fetch, Registry};
use trainer::parallel::Layout;
use trainer::recipe::{Decay, Recipe, ScheduleSection};
use trainer::run::checkpoint::read_safetensors;
use trainer::train::names::hf_name;
use trainer::train::optimizer::{AdamW, AdamWConfig};
use trainer::train::checkpoints::load_trained;
use trainer::train::{LrSchedule, Trainer};

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft").join(case)
}

struct Expected {
    json: serde_json::Value,
    tensors: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn expected(case: &str) -> Expected {
    let d = case_dir(case);
    Expected {
        json: serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap(),
        tensors: read_safetensors(&d.join("expected.safetensors")).unwrap(),
    }
}

fn batches(e: &Expected) -> Vec<Batch> {
    common::fixture_batches(&e.tensors)
}

fn trainer_for(case: &str, e: &Expected) -> Trainer<Cpu> {
    let dir = case_dir(case);
    let mut r = Recipe::default();
    r.model.path = Some(dir.join("model").display().to_string());
    let lora_cfg = &e.json["lora"];
    r.lora.rank = lora_cfg["r"].as_u64().unwrap() as usize;
    r.lora.alpha = lora_cfg["lora_alpha"].as_f64().unwrap();
    r.lora.dropout = 0.0;
    let adapted: Vec<String> =
        e.json["adapted_modules"].as_array().unwrap().iter().map(|m| regex::escape(m.as_str().unwrap())).collect();
    r.lora.targets = vec![format!("re:{}", adapted.join("|"))];
    let plan = model::plan(&r.model, &Registry::builtin(), Fetch::Config).unwrap();
    let m = model::build::<Autodiff<Cpu>>(&plan, &r.model, Layout::SINGLE, &Default::default()).unwrap();
    let cfg = LoraConfig { rank: r.lora.rank, scale: r.lora.scale(), dropout: 0.0, seed: 0 };
    let (m, n) = lora::apply(m, &LoraTargets::parse(&r.lora.targets).unwrap(), &cfg).unwrap();
    assert_eq!(n, adapted.len(), "the same modules as peft adapted");
    let m = load_trained(m, &dir.join("adapter_init"), &r).unwrap();
    let opt = common::fixture_adamw(&e.json["adamw"]);
    let schedule = LrSchedule::new(&opt, &ScheduleSection { decay: Decay::Constant, ..Default::default() }, 100);
    Trainer::new(m, AdamW::new(AdamWConfig::from(&opt)), schedule, e.json["clip"].as_f64().unwrap(), 0, vec![], Default::default())
}

/// Max |a - b| over max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `[in, out]` (trainer) → `[out, in]` (peft), flat.
fn transposed(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn check_case(case: &str) {
    let e = expected(case);
    let mut t = trainer_for(case, &e);
    let batches = batches(&e);
    let steps = e.json["steps"].as_array().unwrap();

    // Step 1: loss and every adapter gradient.
    let (loss, grads) = t.gradients(1, &batches).unwrap();
    let want = steps[0]["loss"].as_f64().unwrap();
    assert!((loss - want).abs() < 1e-5, "{case}: step-1 loss {loss} vs peft {want}");
    let peft_grads = e.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads.by_path.len(), peft_grads, "{case}: one gradient per peft adapter tensor");
    let model = t.model();
    for (path, g) in &grads.by_path {
        let name = hf_name(model, path);
        let (shape, want) = &e.tensors[&format!("grad.{}", name.name)];
        let got: Vec<f32> = g.clone().into_data().to_vec().unwrap();
        // Ours is [in, out]; peft's [out, in] = shape.
        let got = transposed(&got, shape[1], shape[0]);
        let d = rel_diff(&got, want);
        assert!(d < 1e-4, "{case}: gradient of {} differs by {d:.2e} of its max", name.name);
    }

    // Five AdamW steps with clipping: loss and gradient norm before each.
    for (k, s) in steps.iter().enumerate() {
        let stats = t.step(k + 1, &batches).unwrap();
        let (want_loss, want_norm) = (s["loss"].as_f64().unwrap(), s["grad_norm"].as_f64().unwrap());
        assert!((stats.loss - want_loss).abs() < 1e-5, "{case}: step {} loss {} vs peft {want_loss}", k + 1, stats.loss);
        assert!((stats.grad_norm - want_norm).abs() < 1e-5 * want_norm.max(1.0), "{case}: step {} grad norm {} vs {want_norm}", k + 1, stats.grad_norm);
    }
    let (final_loss, _) = t.gradients(99, &batches).unwrap();
    let want = e.json["final_loss"].as_f64().unwrap();
    assert!((final_loss - want).abs() < 1e-5, "{case}: loss after the steps {final_loss} vs peft {want}");
}

#[test]
fn dense_lora_training_matches_peft() {
    check_case("qwen3_dense");
}

#[test]
fn moe_lora_training_with_router_adapters_matches_peft() {
    check_case("qwen3_moe");
}
