//! The CUDA path computes the transformers fixtures' logits too, within the rounding of the
//! precision it runs in. GPU-only: built with `--features cuda` and `#[ignore]`d; run on the GPU
//! machine one test per process (Burn fixes a CUDA device's default float dtype at its first
//! tensor, and both backends share the device):
//!
//!     cargo test --release --features cuda --test cuda_parity -- --ignored --exact cuda_bf16_matches_transformers_within_bf16_rounding
//!     cargo test --release --features cuda --test cuda_parity -- --ignored --exact cuda_f32_matches_transformers_within_tf32_rounding
//!     cargo test --release --features cuda --test cuda_parity -- --ignored --exact cuda_bf16_cached_decoding_matches_the_whole_forward
#![cfg(feature = "cuda")]

mod common;

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::tensor::{Int, Tensor, TensorData};
use trainer::backend::TrainBackend;
use trainer::model::{self, causal_lm_loss, hub::Fetch, Registry};
use trainer::parallel::Layout;

/// The fixtures to run: all, or those named in `TRAINER_CUDA_CASES` (comma-separated), since
/// each new shape costs CubeCL a round of autotuning on a fresh machine.
fn cases() -> Vec<&'static str> {
    let only = std::env::var("TRAINER_CUDA_CASES").unwrap_or_default();
    common::CASES.iter().copied().filter(|c| only.is_empty() || only.split(',').any(|o| o == *c)).collect()
}

/// The fixture `case`'s model on `device`.
fn fixture_model<B: TrainBackend>(case: &str, device: &B::Device) -> model::CausalLm<B> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, common::fixture_recipe(case, "")).unwrap();
    let loaded = trainer::recipe::load(&path, &[]).unwrap();
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config).unwrap();
    model::build::<B>(&plan, &loaded.recipe.model, Layout::SINGLE, device).unwrap()
}

/// Errors against transformers' f32 logits (relative to the largest logit) and loss.
fn errors<B: TrainBackend>(exp: &common::Expected, case: &str, device: &B::Device) -> (f32, f64) {
    let m = fixture_model::<B>(case, device);
    let (ids, shape) = exp.input_ids.clone();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(exp.labels.clone(), shape), device);
    let logits = m.forward(input);
    let got: Vec<f32> = logits.clone().into_data().convert::<f32>().to_vec().unwrap();
    let max_ref = exp.logits.0.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = common::max_diff(&got, &exp.logits.0) / max_ref;
    let ce = causal_lm_loss(logits, labels);
    let loss = ce.sum.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0] as f64 / ce.tokens as f64;
    (diff, (loss - exp.loss).abs())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_matches_transformers_within_tf32_rounding() {
    let device = CudaDevice::default();
    for case in cases() {
        let (rel, dloss) = errors::<Cuda<f32>>(&common::expected(case), case, &device);
        eprintln!("cuda f32  {case}: max |diff| / max |logit| = {rel:.2e}, |loss diff| = {dloss:.2e}");
        // CubeCL's matmul runs f32 inputs on tensor cores in TF32 (10 mantissa bits, relative
        // step 9.8e-4), so f32 on CUDA is not bit-for-bit f32: a few steps on the largest logit.
        assert!(rel <= 1e-2 && dloss <= 1e-3, "{case}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_matches_transformers_within_bf16_rounding() {
    let device = CudaDevice::default();
    for case in cases() {
        let exp = common::expected(case);
        let (hf_logits, hf_loss) = match &exp.bf16 {
            Ok(r) => r.clone(),
            Err(why) => {
                eprintln!("cuda bf16 {case}: skipped, transformers' own bf16 run failed ({why})");
                continue;
            }
        };
        let max_ref = exp.logits.0.iter().fold(0f32, |m, x| m.max(x.abs()));
        let rel_hf = common::max_diff(&hf_logits, &exp.logits.0) / max_ref;
        let dloss_hf = (hf_loss - exp.loss).abs();
        let (rel, dloss) = errors::<Cuda<half::bf16>>(&exp, case, &device);
        eprintln!(
            "cuda bf16 {case}: max |diff| / max |logit| = {rel:.2e} (transformers bf16: {rel_hf:.2e}), \
             |loss diff| = {dloss:.2e} (transformers bf16: {dloss_hf:.2e})"
        );
        // The bf16 tolerance is transformers' own: running the same weights in bf16 moves its
        // logits from the f32 reference by `rel_hf`; ours may differ by as much again in the
        // other direction, plus rounding order.
        assert!(rel <= 3.0 * rel_hf + 1e-3 && dloss <= 3.0 * dloss_hf + 1e-3, "{case}");
    }
}

/// `trainer infer`'s decoding on CUDA bf16 (the prompt through the flash kernels, then one token
/// at a time over the kept keys and values) against the whole forward of the same tokens on the
/// same device, at every step, teacher-forced with the fixture's own ids (no divergence).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_cached_decoding_matches_the_whole_forward() {
    type B = Cuda<half::bf16>;
    let device = CudaDevice::default();
    let mut ran = 0;
    for case in cases() {
        let exp = common::expected(case);
        let Ok((hf_logits, _)) = &exp.bf16 else { continue };
        let max_ref = exp.logits.0.iter().fold(0f32, |m, x| m.max(x.abs()));
        let rel_hf = common::max_diff(hf_logits, &exp.logits.0) / max_ref;
        let m = fixture_model::<B>(case, &device);
        // The first row of the fixture's ids: a prompt of 4, then each later id one at a time.
        let (ids, shape) = exp.input_ids.clone();
        let row: Vec<u32> = ids[..shape[1]].iter().map(|&i| i as u32).collect();
        let mut cache = model::generate::KvCache::<B>::new(m.layers.len());
        let mut worst = 0f32;
        for n in 4..=row.len() {
            let cached = if n == 4 { m.next_token_logits(&row[..4], &mut cache) } else { m.next_token_logits(&row[n - 1..n], &mut cache) };
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(row[..n].iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, n]), &device);
            let whole: Vec<f32> = m.forward(input).slice([0..1, n - 1..n]).into_data().convert::<f32>().to_vec().unwrap();
            worst = worst.max(common::max_diff(&cached, &whole) / max_ref);
        }
        eprintln!("cuda bf16 {case}: cached decoding against the whole forward, max |diff| / max |logit| = {worst:.2e} (transformers bf16 against f32: {rel_hf:.2e})");
        assert!(worst <= 3.0 * rel_hf + 1e-3, "{case}");
        ran += 1;
    }
    assert!(ran > 0, "no fixture with a bf16 reference ran");
}
