//! Bad model input gets one clear error naming the file and the key or tensor, never a panic.

mod common;

use trainer::backend::Cpu;
use trainer::model::{self, hub::Fetch, Registry};
use trainer::parallel::Layout;

/// Load the recipe text and try to build the model; the error message if anything fails.
fn build_error(recipe: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, recipe).unwrap();
    let loaded = match trainer::recipe::load(&path, &[]) {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    let plan = match model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config) {
        Ok(p) => p,
        Err(e) => return e.to_string(),
    };
    if let Err(e) = model::check_layout(&plan.spec, &loaded.recipe.parallel) {
        return e.to_string();
    }
    match model::build::<Cpu>(&plan, &loaded.recipe.model, Layout::SINGLE, &Default::default()) {
        Ok(_) => "built".into(),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected `{p}` in: {msg}");
    }
}

#[test]
fn fixture_builds() {
    assert_eq!(build_error(&common::fixture_recipe("qwen2_tied_f32", "")), "built");
}

#[test]
fn missing_tensor_is_named() {
    let e = build_error(&common::fixture_recipe("qwen2_tied_f32", "[model.config]\nnum_hidden_layers = 4"));
    assert_mentions(&e, &["model.layers.3.", "missing from the checkpoint"]);
}

#[test]
fn extra_tensors_are_named() {
    let e = build_error(&common::fixture_recipe("qwen2_tied_f32", "[model.config]\nnum_hidden_layers = 2"));
    assert_mentions(&e, &["model.layers.2.", "not part of the architecture"]);
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let e = build_error(&common::fixture_recipe("qwen2_tied_f32", "[model.config]\nintermediate_size = 70"));
    assert_mentions(&e, &["gate_proj.weight", "[72, 48]", "[70, 48]", "model.safetensors"]);
}

#[test]
fn unsupported_model_type_lists_families() {
    let e = build_error("[model]\ninit = \"random\"\n[model.config]\nmodel_type = \"gpt2\"\n");
    assert_mentions(&e, &["model_type \"gpt2\" is not supported", "qwen2", "qwen3_moe"]);
}

#[test]
fn missing_config_key_names_it() {
    let e = build_error("[model]\ninit = \"random\"\n[model.config]\nmodel_type = \"qwen2\"\nhidden_size = 8\nintermediate_size = 16\n");
    assert_mentions(&e, &["recipe [model.config]", "`num_attention_heads` is missing"]);
}

#[test]
fn unsupported_options_fail_with_a_sentence() {
    let e = build_error(&common::fixture_recipe("qwen2_tied_f32", "[model.config]\nuse_sliding_window = true"));
    assert_mentions(&e, &["use_sliding_window", "not supported"]);
    let e = build_error(&common::fixture_recipe("qwen2_tied_f32", "[model.config]\nhidden_act = \"gelu\""));
    assert_mentions(&e, &["hidden_act", "SwiGLU"]);
}

#[test]
fn missing_and_malformed_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let e = build_error(&format!("[model]\npath = \"{}\"\n", dir.path().display()));
    assert_mentions(&e, &["config.json", "cannot read"]);
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"qwen2\",").unwrap();
    let e = build_error(&format!("[model]\npath = \"{}\"\n", dir.path().display()));
    assert_mentions(&e, &["config.json", "not valid JSON at line 1"]);
    std::fs::copy(common::fixture_dir("qwen2_tied_f32").join("config.json"), dir.path().join("config.json")).unwrap();
    let e = build_error(&format!("[model]\npath = \"{}\"\n", dir.path().display()));
    assert_mentions(&e, &["no weights", "model.safetensors"]);
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = build_error(&format!("[model]\npath = \"{}\"\n", dir.path().display()));
    assert_mentions(&e, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn layout_must_fit_the_heads_and_experts() {
    // 6 query heads, 2 KV heads: tensor 4 divides neither.
    let e = build_error(&common::fixture_recipe("qwen2_tied_f32", "[parallel]\ntensor = 4\ndata = 1"));
    assert_mentions(&e, &["num_key_value_heads (2) is not divisible by parallel.tensor (4)", "1, 2"]);
    // 6 experts, expert parallel 4.
    let e = build_error(&common::fixture_recipe("qwen3_moe_f32_sharded", "[parallel]\ndata = 4\nexpert = 4"));
    assert_mentions(&e, &["num_experts (6) is not divisible by parallel.expert (4)"]);
}

/// A recipe with a fixture's config.json inline (scalars and lists), random weights, and
/// without the keys `leave_out`.
fn inline_config(case: &str, leave_out: &[&str]) -> String {
    let cfg = std::fs::read_to_string(common::fixture_dir(case).join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let mut t = String::from("[model]\ninit = \"random\"\n[model.config]\n");
    for (k, val) in v.as_object().unwrap() {
        if !val.is_null() && !val.is_object() && !leave_out.contains(&k.as_str()) {
            t.push_str(&format!("{k} = {val}\n"));
        }
    }
    t
}

#[test]
fn random_init_builds_without_weights() {
    assert_eq!(build_error(&inline_config("qwen3_moe_f32_sharded", &[])), "built");
    assert_eq!(build_error(&inline_config("qwen2_moe_f32", &[])), "built");
}

#[test]
fn qwen2_moe_needs_a_valid_shared_expert_width() {
    let key = "shared_expert_intermediate_size";
    let e = build_error(&inline_config("qwen2_moe_f32", &[key]));
    assert_mentions(&e, &["recipe [model.config]", "`shared_expert_intermediate_size` is missing", "config.json"]);
    let e = build_error(&format!("{}{key} = 0\n", inline_config("qwen2_moe_f32", &[key])));
    assert_mentions(&e, &["qwen2_moe config", "layer 0", "`shared_expert_intermediate_size` is 0", "expected 1 to"]);
    // Only sparse layers have a shared expert: a model of dense layers does without the key.
    let dense = format!("{}mlp_only_layers = [0, 1, 2]\n", inline_config("qwen2_moe_f32", &[key, "mlp_only_layers"]));
    assert_eq!(build_error(&dense), "built");
}

#[test]
fn router_loss_weight_needs_routers_and_defaults_to_the_config_when_routers_train() {
    let coef = |case: &str, extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, common::fixture_recipe(case, extra)).unwrap();
        let loaded = trainer::recipe::load(&path, &[]).unwrap();
        let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config).unwrap();
        trainer::train::preflight::router_aux_loss_coef(&loaded.recipe, &plan.spec).map_err(|e| e.to_string())
    };
    let moe = "qwen3_moe_f32_sharded";
    let config = "[model.config]\nrouter_aux_loss_coef = 0.02\n";
    // LoRA leaves the routers frozen: no loss unless asked for.
    assert_eq!(coef(moe, config), Ok(0.0));
    assert_eq!(coef(moe, &format!("{config}[train]\ntuning = \"full\"\n")), Ok(0.02));
    assert_eq!(coef(moe, &format!("{config}[train]\ntuning = \"full\"\nrouter_aux_loss_coef = 0\n")), Ok(0.0));
    assert_eq!(coef(moe, "[train]\nrouter_aux_loss_coef = 0.05\n"), Ok(0.05));
    let e = coef("qwen2_tied_f32", "[train]\nrouter_aux_loss_coef = 0.01\n").unwrap_err();
    assert_mentions(&e, &["train.router_aux_loss_coef = 0.01", "no mixture-of-experts layer", "remove"]);
    assert_eq!(coef("qwen2_tied_f32", "[train]\ntuning = \"full\"\n"), Ok(0.0));
}
