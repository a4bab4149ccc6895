//! Shared helpers for integration tests: the transformers fixtures made by
//! `tests/fixtures/make_fixtures.py`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

pub fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

pub const CASES: &[&str] = &["qwen2_tied_f32", "qwen3_bf16_sharded", "qwen3_moe_f32_sharded", "qwen3_moe_f16_nonorm", "qwen2_moe_f32"];

pub struct Expected {
    pub input_ids: (Vec<i64>, [usize; 2]),
    pub labels: Vec<i64>,
    pub logits: (Vec<f32>, Vec<usize>),
    pub loss: f64,
    /// transformers' own logits and loss with the model cast to bf16, or why it could not run.
    pub bf16: Result<(Vec<f32>, f64), String>,
}

pub fn expected(case: &str) -> Expected {
    let dir = fixture_dir(case);
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |name: &str| -> Vec<i64> {
        st.tensor(name).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let ids = st.tensor("input_ids").unwrap();
    let shape = [ids.shape()[0], ids.shape()[1]];
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let logits = st.tensor("logits").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    Expected {
        input_ids: (i64s("input_ids"), shape),
        labels: i64s("labels"),
        logits: (f32s("logits"), logits.shape().to_vec()),
        loss: json["loss"].as_f64().unwrap(),
        bf16: match json["loss_bf16"].as_f64() {
            Some(loss) => Ok((f32s("logits_bf16"), loss)),
            None => Err(json["bf16_error"].as_str().unwrap_or("no bf16 run").to_string()),
        },
    }
}

/// A recipe that points at a fixture folder (absolute path, so tests run from any cwd).
pub fn fixture_recipe(case: &str, extra: &str) -> String {
    format!(
        "device = \"cpu\"\n[model]\npath = \"{}\"\n{extra}\n",
        fixture_dir(case).display()
    )
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The micro batches of a training fixture (`ids_i`, `labels_i`, `mask_i`: right-padded rows,
/// mask 0 on padding) in trainer's layout, where right padding is segment 0.
pub fn fixture_batches(t: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Vec<trainer::data::Batch> {
    (0..)
        .map_while(|i| {
            let (shape, ids) = t.get(&format!("ids_{i}"))?;
            let (_, labels) = &t[&format!("labels_{i}")];
            let (_, mask) = &t[&format!("mask_{i}")];
            let (b, s) = (shape[0], shape[1]);
            Some(trainer::data::Batch {
                batch_size: b,
                seq_len: s,
                input_ids: ids.iter().map(|&x| x as u32).collect(),
                labels: labels.iter().map(|&x| x as i64).collect(),
                position_ids: (0..b).flat_map(|_| 0..s as u32).collect(),
                segment_ids: mask.iter().map(|&m| m as u32).collect(),
            })
        })
        .collect()
}

/// The optimizer a training fixture's `expected.json` names under `"adamw"` (torch's AdamW
/// arguments: lr, betas, eps, weight_decay).
pub fn fixture_adamw(a: &serde_json::Value) -> trainer::recipe::OptimizerSection {
    trainer::recipe::OptimizerSection {
        lr: a["lr"].as_f64().unwrap(),
        beta1: a["betas"][0].as_f64().unwrap(),
        beta2: a["betas"][1].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
        ..Default::default()
    }
}
