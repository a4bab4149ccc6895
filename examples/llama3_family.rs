//! A model family added from outside the crate: Llama 3 / 3.1 (GQA, no bias, SwiGLU, and the
//! "llama3" rotary frequency scaling), registered next to the built-in families. The whole
//! `trainer` CLI then works for `model_type = "llama"` without any change to `src/`.
//!
//!     cargo run --release --example llama3_family -- models
//!     cargo run --release --example llama3_family -- check examples/llama3-tiny.toml
//!
//! Its tests (run by `cargo test`) check the logits against transformers' LlamaForCausalLM on
//! the `tests/fixtures/llama3_f32` fixture.

use std::f64::consts::PI;

use trainer::model::hf_config::HfConfig;
use trainer::model::llama_like::{default_rope, read_llama_like, rope_type};
use trainer::model::spec::{default_inv_freq, ArchSpec, MlpSpec};
use trainer::model::{ModelFamily, Registry};
use trainer::Result;

pub struct Llama3;

/// Llama 3.1's frequency scaling (transformers' `_compute_llama3_parameters`): long
/// wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
fn llama3_rope(cfg: &HfConfig, head_dim: usize) -> Result<Vec<f64>> {
    if rope_type(cfg)?.as_deref() != Some("llama3") {
        return default_rope(cfg, head_dim);
    }
    // transformers v5 keeps these under `rope_parameters`, v4 under `rope_scaling`.
    let key = |k: &str| -> Result<f64> {
        match cfg.opt::<f64>(&format!("rope_parameters.{k}"))? {
            Some(v) => Ok(v),
            None => cfg.get(&format!("rope_scaling.{k}")),
        }
    };
    let (factor, low, high) = (key("factor")?, key("low_freq_factor")?, key("high_freq_factor")?);
    let old_ctx = key("original_max_position_embeddings")?;
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    let inv = default_inv_freq(cfg.get_or("rope_theta", 500000.0)?, head_dim);
    Ok(inv
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect())
}

impl ModelFamily for Llama3 {
    fn name(&self) -> &'static str {
        "llama3"
    }
    fn description(&self) -> &'static str {
        "Llama 3 / 3.1 dense (GQA, llama3 rope scaling) — registered by examples/llama3_family.rs"
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["llama"]
    }
    fn arch(&self, cfg: &HfConfig) -> Result<ArchSpec> {
        if cfg.get_or("mlp_bias", false)? {
            return Err(cfg.unsupported("mlp_bias", "biases on the MLP projections are not supported"));
        }
        let inter: usize = cfg.get("intermediate_size")?;
        let bias = cfg.get_or("attention_bias", false)?;
        let mut spec = read_llama_like(cfg, self.name(), bias, false, llama3_rope, |_| {
            Ok(MlpSpec::Dense { intermediate_size: inter })
        })?;
        if bias {
            return Err(cfg.unsupported("attention_bias", "Llama's bias also covers o_proj, which trainer's attention has none of"));
        }
        spec.qkv_bias = false;
        Ok(spec)
    }
}

fn registry() -> Registry {
    let mut r = Registry::builtin();
    r.register(Llama3);
    r
}

fn main() -> std::process::ExitCode {
    trainer::cli::main_with(registry())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Int, Tensor, TensorData};
    use safetensors::SafeTensors;
    use trainer::backend::Cpu;
    use trainer::model::{self, hub::Fetch};
    use trainer::parallel::Layout;

    #[test]
    fn llama3_matches_transformers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama3_f32");
        let tmp = tempfile::tempdir().unwrap();
        let recipe = tmp.path().join("r.toml");
        std::fs::write(&recipe, format!("device = \"cpu\"\n[model]\npath = \"{}\"\n", dir.display())).unwrap();
        let loaded = trainer::recipe::load(&recipe, &[]).unwrap();
        let plan = model::plan(&loaded.recipe.model, &registry(), Fetch::Config).unwrap();
        assert_eq!(plan.family.name(), "llama3");
        let device = Default::default();
        let m = model::build::<Cpu>(&plan, &loaded.recipe.model, Layout::SINGLE, &device).unwrap();

        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let ids = st.tensor("input_ids").unwrap();
        let shape = [ids.shape()[0], ids.shape()[1]];
        let ids: Vec<i64> = ids.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let want: Vec<f32> = st.tensor("logits").unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let got: Vec<f32> = m
            .forward(Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, shape), &device))
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let max_ref = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let diff = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(diff <= 1e-4 * max_ref, "max |diff| {diff} vs max |logit| {max_ref}");
    }

    #[test]
    fn llama3_scaling_keeps_short_and_slows_long_wavelengths() {
        let cfg = HfConfig::new(
            "test",
            serde_json::from_str(
                r#"{"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
            )
            .unwrap(),
        );
        let base = default_inv_freq(500000.0, 128);
        let scaled = llama3_rope(&cfg, 128).unwrap();
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[63] - base[63] / 8.0).abs() < 1e-15);
    }
}
