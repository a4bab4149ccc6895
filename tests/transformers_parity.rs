//! The models trainer builds compute the same logits and loss as transformers for the same
//! weights. Fixtures: `tests/fixtures/make_fixtures.py` (transformers 5.17, f32, eager
//! attention), covering Qwen2 (tied, q/k/v bias), Qwen3 (bf16 on disk, sharded), Qwen3-MoE
//! (sharded f32 with `norm_topk_prob`; f16 without it, tied, dense+sparse layers) and Qwen2-MoE
//! (q/k/v bias, a sigmoid-gated shared expert, no `norm_topk_prob`, a dense layer between
//! sparse ones).

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use trainer::backend::Cpu;
use trainer::model::{self, causal_lm_loss, hub::Fetch, CausalLm, Registry};
use trainer::parallel::Layout;

/// The fixture's model as trainer builds it on the CPU.
fn fixture_model(case: &str) -> CausalLm<Cpu> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, common::fixture_recipe(case, "")).unwrap();
    let loaded = trainer::recipe::load(&path, &[]).unwrap();
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config).unwrap();
    model::build::<Cpu>(&plan, &loaded.recipe.model, Layout::SINGLE, &Default::default()).unwrap()
}

fn run_case(case: &str) {
    let exp = common::expected(case);
    let device = Default::default();
    let m = fixture_model(case);

    let (ids, shape) = exp.input_ids;
    let input = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, shape), &device);
    let labels = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(exp.labels, shape), &device);
    let logits = m.forward(input);
    assert_eq!(logits.dims().to_vec(), exp.logits.1, "{case}: logits shape");
    let got: Vec<f32> = logits.clone().into_data().convert::<f32>().to_vec().unwrap();
    let max_ref = exp.logits.0.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_diff = common::max_diff(&got, &exp.logits.0);
    assert!(max_diff <= 1e-4 * max_ref, "{case}: max |logit diff| {max_diff} > 1e-4 x {max_ref}");

    let ce = causal_lm_loss(logits, labels);
    let loss = ce.sum.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0] as f64 / ce.tokens as f64;
    assert!((loss - exp.loss).abs() <= 1e-5 * exp.loss.abs().max(1.0), "{case}: loss {loss} vs transformers {}", exp.loss);
    eprintln!("{case}: max |diff| {max_diff:.2e} (max |logit| {max_ref:.2}), loss {loss:.6} vs {:.6}", exp.loss);
}

#[test]
fn qwen2_tied_matches_transformers() {
    run_case("qwen2_tied_f32");
}

#[test]
fn qwen3_bf16_sharded_matches_transformers() {
    run_case("qwen3_bf16_sharded");
}

#[test]
fn qwen3_moe_matches_transformers() {
    run_case("qwen3_moe_f32_sharded");
}

#[test]
fn qwen3_moe_without_topk_norm_matches_transformers() {
    run_case("qwen3_moe_f16_nonorm");
}

#[test]
fn qwen2_moe_with_shared_expert_matches_transformers() {
    let m = fixture_model("qwen2_moe_f32");
    let shared: Vec<bool> = m.layers.iter().map(|l| l.moe.as_ref().is_some_and(|moe| moe.shared_expert.is_some())).collect();
    assert_eq!(shared, [true, false, true], "layer 1 is dense (mlp_only_layers), the others sparse with a shared expert");
    run_case("qwen2_moe_f32");
}

/// The routers' load-balancing loss trainer trains with equals transformers'
/// `load_balancing_loss_func` on the routers' logits (tests/fixtures/make_router_loss_fixtures.py):
/// over all tokens, and with the last tokens of row 1 as padding (segment 0 here, attention
/// mask 0 there).
fn router_loss_case(case: &str) {
    use trainer::model::RouterBalance;
    let text = std::fs::read_to_string(common::fixture_dir(case).join("router_loss.json")).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let padded = want["padded_tail_of_row_1"].as_u64().unwrap() as usize;
    let device = Default::default();
    let m = fixture_model(case);
    let (ids, shape) = common::expected(case).input_ids;
    let (rows, seq) = (shape[0], shape[1]);
    let ints = |v: Vec<i64>| Tensor::<Cpu, 2, Int>::from_data(TensorData::new(v, [rows, seq]), &device);
    for (key, pad) in [("aux_loss", 0), ("aux_loss_masked", padded)] {
        let real: Vec<bool> = (0..rows * seq).map(|k| !(k / seq == 1 && k % seq >= seq - pad)).collect();
        let segments = ints(real.iter().map(|&r| r as i64).collect());
        let positions = ints((0..rows * seq).map(|k| (k % seq) as i64).collect());
        let balance = RouterBalance::<Cpu>::new(Some(real), &device);
        let ctx = m.context(positions, Some(segments)).with_router_balance(Some(balance.clone()));
        let mut x = ctx.into_layers(m.embed(ints(ids.clone())));
        for layer in &m.layers {
            x = layer.forward(x, &ctx);
        }
        let sums = balance.take();
        assert_eq!(sums.len() as u64, want["routers"].as_u64().unwrap(), "{case}: one record a router");
        let got = RouterBalance::loss(sums, &balance.weights(&device).unwrap()).unwrap().into_scalar() as f64;
        let expected = want[key].as_f64().unwrap();
        assert!((got - expected).abs() <= 1e-5 * expected, "{case} {key}: {got} vs transformers {expected}");
        eprintln!("{case} {key}: {got:.7} vs transformers {expected:.7}");
    }
}

#[test]
fn qwen3_moe_router_loss_matches_transformers() {
    router_loss_case("qwen3_moe_f32_sharded");
}

#[test]
fn qwen3_moe_without_topk_norm_router_loss_matches_transformers() {
    router_loss_case("qwen3_moe_f16_nonorm");
}
