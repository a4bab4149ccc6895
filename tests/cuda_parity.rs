//! The CUDA path computes the transformers fixtures' logits too: exactly in f32 (same
//! tolerance as CPU) and within bf16 rounding in bf16. GPU-only: built with `--features cuda`
//! and `#[ignore]`d, run on the GPU machine with `-- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use trainer::model::{self, causal_lm_loss, hub::Fetch, Registry};
use trainer::parallel::Layout;

/// (max |logit diff| / max |logit|, |loss diff|) for one fixture on backend `B`.
fn errors<B: Backend>(case: &str, device: &B::Device) -> (f32, f64) {
    let exp = common::expected(case);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, common::fixture_recipe(case, "")).unwrap();
    let loaded = trainer::recipe::load(&path, &[]).unwrap();
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config).unwrap();
    let m = model::build::<B>(&plan, &loaded.recipe.model, Layout::SINGLE, device).unwrap();
    let (ids, shape) = exp.input_ids;
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(exp.labels, shape), device);
    let logits = m.forward(input);
    let got: Vec<f32> = logits.clone().into_data().convert::<f32>().to_vec().unwrap();
    let max_ref = exp.logits.0.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_diff = got.iter().zip(&exp.logits.0).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let ce = causal_lm_loss(logits, labels);
    let loss = ce.sum.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0] as f64 / ce.tokens as f64;
    (max_diff / max_ref, (loss - exp.loss).abs())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_transformers() {
    let device = CudaDevice::default();
    for case in common::CASES {
        let (rel, dloss) = errors::<Cuda<f32>>(case, &device);
        eprintln!("cuda f32  {case}: max |diff| / max |logit| = {rel:.2e}, |loss diff| = {dloss:.2e}");
        assert!(rel <= 1e-4 && dloss <= 1e-4, "{case}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_matches_transformers_within_bf16_rounding() {
    let device = CudaDevice::default();
    for case in common::CASES {
        let (rel, dloss) = errors::<Cuda<half::bf16>>(case, &device);
        eprintln!("cuda bf16 {case}: max |diff| / max |logit| = {rel:.2e}, |loss diff| = {dloss:.2e}");
        // bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3) and every layer rounds its
        // activations: a few steps of error on the largest logit, far less on the loss.
        assert!(rel <= 3e-2 && dloss <= 2e-2, "{case}");
    }
}
