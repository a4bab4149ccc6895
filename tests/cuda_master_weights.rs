//! bf16 full fine-tuning on CUDA against torch's AdamW over f32 master weights (fixture from
//! tests/fixtures/make_master_weights_fixture.py, made on the GPU machine): at lr 1e-5 most
//! updates are below bf16's spacing, so without master weights they round away. GPU-only: built
//! with `--features cuda` and `#[ignore]`d; run on the GPU machine:
//!
//!     cargo test --release --features cuda --test cuda_master_weights -- --ignored
#![cfg(feature = "cuda")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::backend::Autodiff;
use trainer::model::{self, hub::Fetch, Registry};
use trainer::parallel::Layout;
use trainer::recipe::{DType, Decay, Recipe, ScheduleSection, Tuning};
use trainer::run::checkpoint::read_safetensors;
use trainer::train::checkpoints::gather;
use trainer::train::optimizer::{AdamW, AdamWConfig};
use trainer::train::{LrSchedule, Trainer};

type Gpu = Cuda<half::bf16>;
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn fixture_dir() -> PathBuf {
    // The working directory's first: the GPU machine's checkout may lie elsewhere than the build's.
    let here = Path::new("tests/fixtures/master_weights");
    match here.is_dir() {
        true => here.to_path_buf(),
        false => Path::new(env!("CARGO_MANIFEST_DIR")).join(here),
    }
}

/// How weights moved from `init`: the fraction of them that changed, and the cosine of all the
/// moves with `reference`'s moves.
fn moves(init: &Tensors, got: &BTreeMap<String, Vec<f32>>, reference: &BTreeMap<String, Vec<f32>>) -> (f64, f64) {
    let (mut changed, mut total, mut dot, mut a2, mut b2) = (0usize, 0usize, 0f64, 0f64, 0f64);
    for (name, (_, w0)) in init {
        let (g, r) = (&got[name], &reference[name]);
        assert_eq!(g.len(), w0.len(), "{name}");
        for ((&x0, &x), &y) in w0.iter().zip(g).zip(r) {
            let (dx, dy) = ((x - x0) as f64, (y - x0) as f64);
            changed += usize::from(dx != 0.0);
            total += 1;
            dot += dx * dy;
            a2 += dx * dx;
            b2 += dy * dy;
        }
    }
    (changed as f64 / total as f64, dot / (a2.sqrt() * b2.sqrt()).max(1e-30))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_full_tuning_keeps_f32_master_weights_as_torch_does() {
    let dir = fixture_dir();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let expected = read_safetensors(&dir.join("expected.safetensors")).unwrap();
    let init = read_safetensors(&dir.join("model/model.safetensors")).unwrap();
    let device = CudaDevice::default();

    let mut r = Recipe::default();
    r.model.path = Some(dir.join("model").display().to_string());
    r.model.dtype = DType::Bf16;
    r.train.tuning = Tuning::Full;
    let plan = model::plan(&r.model, &Registry::builtin(), Fetch::Config).unwrap();
    let m = model::build::<Autodiff<Gpu>>(&plan, &r.model, Layout::SINGLE, &device).unwrap();
    let opt = common::fixture_adamw(&json["adamw"]);
    let steps = json["steps"].as_u64().unwrap() as usize;
    let schedule = LrSchedule::new(&opt, &ScheduleSection { decay: Decay::Constant, ..Default::default() }, steps);
    let mut t = Trainer::new(m, AdamW::new(AdamWConfig::from(&opt)), schedule, json["clip"].as_f64().unwrap(), 0, vec![], device);
    let batches = common::fixture_batches(&expected);

    // The loss before every step and after the last, within the loss's own bf16 noise.
    let tol = json["loss_tolerance"].as_f64().unwrap();
    let want: Vec<f64> = json["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
    let mut got = Vec::new();
    for step in 1..=steps {
        got.push(t.step(step, &batches).unwrap().loss);
    }
    got.push(t.gradients(steps + 1, &batches).unwrap().0);
    let want_final = json["final_loss"].as_f64().unwrap();
    eprintln!("losses: trainer {got:.5?}\n        torch   {want:.5?} then {want_final:.5}");
    for (k, (g, w)) in got.iter().zip(want.iter().chain([&want_final])).enumerate() {
        assert!((g - w).abs() <= tol, "loss before step {} is {g:.5}; torch with master weights: {w:.5} (tolerance {tol:.1e})", k + 1);
    }

    // The weights: as many moved as torch's, the same way.
    let gathered = gather(&t, Tuning::Full, false, None).unwrap();
    let trained: BTreeMap<String, Vec<f32>> =
        gathered.tensors().iter().map(|n| (n.name.clone(), n.data.clone().convert::<f32>().to_vec::<f32>().unwrap())).collect();
    let prefixed = |prefix: &str| -> BTreeMap<String, Vec<f32>> {
        expected.iter().filter_map(|(k, (_, v))| Some((k.strip_prefix(prefix)?.to_string(), v.clone()))).collect()
    };
    let (torch, torch_bf16_only) = (prefixed("final."), prefixed("final_bf16_only."));
    let (moved, cosine) = moves(&init, &trained, &torch);
    let (torch_moved, _) = moves(&init, &torch, &torch);
    let (bf16_only_moved, _) = moves(&init, &torch_bf16_only, &torch);
    eprintln!(
        "moved: trainer {moved:.3} (cosine with torch's moves {cosine:.3}), torch {torch_moved:.3}, torch without master weights {bf16_only_moved:.3}"
    );
    // The check fails a run without master weights (the fixture's own).
    assert!(bf16_only_moved < 0.8 * torch_moved, "the fixture does not tell the runs apart");
    assert!(moved >= 0.8 * torch_moved, "{moved:.3} of the weights moved; torch moved {torch_moved:.3}");
    assert!(cosine >= 0.9, "the weights moved unlike torch's: cosine {cosine:.3}");
}
