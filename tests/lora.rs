//! LoRA adapters on the models: peft's initialisation (a fresh adapter leaves the model
//! unchanged), the merge identity `x (W + s A B) = x W + s (x A) B`, gradients reaching only the
//! adapters, the trainable-parameter count that `trainer check` reports, and Qwen2-MoE's shared
//! expert among the targets.

mod common;

use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use trainer::backend::Cpu;
use trainer::lora::{self, LoraConfig, LoraTargets};
use trainer::model::summary::{ModelSummary, RunShape};
use trainer::model::{self, causal_lm_loss, hub::Fetch, CausalLm, ModelPlan, Registry};
use trainer::parallel::Layout;
use trainer::recipe::ModelSection;

const CASE: &str = "qwen3_moe_f32_sharded";
/// Qwen2-MoE: sparse layers 0 and 2 with a shared expert, layer 1 dense.
const SHARED_EXPERT_CASE: &str = "qwen2_moe_f32";

fn plan_and_section() -> (ModelPlan, ModelSection) {
    plan_and_section_of(CASE)
}

fn plan_and_section_of(case: &str) -> (ModelPlan, ModelSection) {
    let section = ModelSection { path: Some(common::fixture_dir(case).display().to_string()), ..Default::default() };
    let plan = model::plan(&section, &Registry::builtin(), Fetch::Config).unwrap();
    (plan, section)
}

fn build<B: trainer::backend::TrainBackend>() -> CausalLm<B> {
    build_of(CASE)
}

fn build_of<B: trainer::backend::TrainBackend>(case: &str) -> CausalLm<B> {
    let (plan, section) = plan_and_section_of(case);
    model::build::<B>(&plan, &section, Layout::SINGLE, &Default::default()).unwrap()
}

fn cfg() -> LoraConfig {
    LoraConfig { rank: 4, scale: 32.0 / 4.0, dropout: 0.0, seed: 11 }
}

fn all_linear() -> LoraTargets {
    LoraTargets::parse(&["all-linear".to_string()]).unwrap()
}

fn ids<B: burn::tensor::backend::Backend>() -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    ids_of(CASE)
}

fn ids_of<B: burn::tensor::backend::Backend>(case: &str) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let exp = common::expected(case);
    let (ids, shape) = exp.input_ids;
    let d = Default::default();
    (
        Tensor::from_data(TensorData::new(ids, shape), &d),
        Tensor::from_data(TensorData::new(exp.labels, shape), &d),
    )
}

fn max_diff(a: Tensor<Cpu, 3>, b: Tensor<Cpu, 3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn fresh_adapters_leave_the_model_unchanged() {
    let base = build::<Cpu>();
    let (x, _) = ids::<Cpu>();
    let before = base.forward(x.clone());
    let (adapted, n) = lora::apply(base, &all_linear(), &cfg()).unwrap();
    // 3 layers x 4 attention projections + 2 sparse layers x 6 experts x 3 + 1 dense MLP x 3.
    assert_eq!(n, 3 * 4 + 2 * 6 * 3 + 3);
    assert_eq!(max_diff(adapted.forward(x), before), 0.0);
}

#[test]
fn adapted_forward_equals_the_merged_weights() {
    let (mut adapted, _) = lora::apply(build::<Cpu>(), &all_linear(), &cfg()).unwrap();
    let d = Default::default();
    for (_, lin) in adapted.linears_mut() {
        if let Some(a) = &mut lin.lora {
            let [r, o] = a.lora_b.val().dims();
            a.lora_b = Param::from_tensor(Tensor::random([r, o], Distribution::Normal(0.0, 0.05), &d));
        }
    }
    let mut stacked = 0;
    for moe in adapted.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        for p in lora::EXPERT_PROJECTIONS {
            let a = moe.expert_lora.get_mut(p).unwrap().as_mut().expect("all-linear adapts every expert");
            a.lora_b = Param::from_tensor(Tensor::random(a.lora_b.val().dims(), Distribution::Normal(0.0, 0.05), &d));
            stacked += 1;
        }
    }
    assert_eq!(stacked, 2 * 3);
    let (x, _) = ids::<Cpu>();
    let y = adapted.forward(x.clone());
    for (_, lin) in adapted.linears_mut() {
        if let Some(a) = lin.lora.take() {
            lin.weight = Param::from_tensor(lin.weight.val() + a.delta());
        }
    }
    // Each expert's weight plus its block of the stacked adapter (the weights then no longer
    // view the load-time stacks, so the experts run on weights stacked on the call).
    for moe in adapted.layers.iter_mut().filter_map(|l| l.moe.as_mut()) {
        let adapters = std::mem::replace(&mut moe.expert_lora, lora::ExpertAdapters::none());
        for (e, m) in moe.experts.iter_mut().enumerate() {
            for (p, lin) in [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)] {
                lin.weight = Param::from_tensor(lin.weight.val() + adapters.get(p).unwrap().delta(e));
            }
        }
    }
    let merged = adapted.forward(x);
    let scale = y.clone().abs().max().into_scalar();
    assert!(max_diff(y, merged) <= 1e-5 * scale.max(1.0));
}

#[test]
fn gradients_reach_only_the_adapters() {
    type Ad = Autodiff<Cpu>;
    let targets = LoraTargets::parse(&["q_proj".to_string(), "re:.*experts\\.0\\.down_proj".to_string()]).unwrap();
    let (model, n) = lora::apply(build::<Ad>(), &targets, &cfg()).unwrap();
    assert_eq!(n, 3 + 2);
    let (x, labels) = ids::<Ad>();
    let ce = causal_lm_loss(model.forward(x), labels);
    let grads = (ce.sum / ce.tokens as f64).backward();
    let mut model = model;
    let q = &mut model.layers[0].self_attn.q_proj;
    assert!(q.weight.val().grad(&grads).is_none(), "frozen base weight got a gradient");
    let a = q.lora.as_ref().unwrap();
    // B starts at zero, so dL/dA = 0 and dL/dB carries the signal.
    let gb = a.lora_b.val().grad(&grads).unwrap().abs().sum().into_scalar();
    let ga = a.lora_a.val().grad(&grads).unwrap().abs().sum().into_scalar();
    assert!(gb > 0.0 && ga == 0.0, "dB {gb}, dA {ga}");
    assert!(model.layers[0].self_attn.k_proj.lora.is_none());
    // Expert 0's down_proj of each sparse layer: stacked with the layer's other experts, whose
    // factors are zeros that get no gradient (they stay unadapted).
    let mut sparse = 0;
    for moe in model.layers.iter().filter_map(|l| l.moe.as_ref()) {
        assert!(moe.expert_lora.gate_proj.is_none() && moe.expert_lora.up_proj.is_none());
        let down = moe.expert_lora.down_proj.as_ref().expect("down_proj adapted");
        assert_eq!(down.adapted, [true, false, false, false, false, false]);
        let gb = down.lora_b.val().grad(&grads).unwrap();
        assert_eq!(gb.clone().narrow(0, 1, 5).abs().sum().into_scalar(), 0.0, "unadapted experts' B got a gradient");
        assert_eq!(down.lora_a.val().narrow(0, 1, 5).abs().sum().into_scalar(), 0.0, "unadapted experts' A is zero");
        sparse += 1;
    }
    assert_eq!(sparse, 2);
    // A partly adapted projection holds all 6 experts' factors (`trainer check` counts the
    // adapted ones: init_follows_peft_and_trainable_count_matches_check).
    assert_eq!(model.num_params(), build::<Ad>().num_params() + 3 * (32 + 48) * 4 + 2 * 6 * (24 + 32) * 4);
}

/// `trainer check`'s estimate of the trainable weights and optimizer per rank: full tuning of
/// bf16 weights keeps an f32 gradient on every rank, and two f32 moments and an f32 master copy
/// on one data-parallel rank of `data` under the distributed optimizer (on every rank without);
/// LoRA its f32 factors and gradients on every rank, the moments dealt likewise.
#[test]
fn check_estimates_the_optimizer_per_rank_with_and_without_dealing_it() {
    let (plan, _) = plan_and_section();
    let gib = (1u64 << 30) as f64;
    let shape = |lora: Option<(usize, LoraTargets)>, distributed_optimizer: bool| RunShape {
        data: 4, tensor: 1, expert: 1, context: 1, sequence_parallel: false, micro_batch: 1, seq_len: 16,
        lora, weight_bytes: 2, recompute: Default::default(), fused_cross_entropy: true, distributed_optimizer,
    };
    let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() <= 1e-9 * want, "{what}: {got} GiB, expected {want}");
    let full = ModelSummary::new(&plan.spec, &shape(None, true)).unwrap();
    let n = full.per_rank_trainable as f64;
    close(full.memory.trainable_and_optimizer, n * (4.0 + 12.0 / 4.0) / gib, "full, distributed");
    close(full.memory.trainable_and_optimizer_otherwise.unwrap(), n * 16.0 / gib, "full, not distributed");
    let lora = ModelSummary::new(&plan.spec, &shape(Some((4, all_linear())), false)).unwrap();
    let n = lora.per_rank_trainable as f64;
    close(lora.memory.trainable_and_optimizer, n * 16.0 / gib, "LoRA, not distributed");
    close(lora.memory.trainable_and_optimizer_otherwise.unwrap(), n * (8.0 + 8.0 / 4.0) / gib, "LoRA, distributed");
    // One data-parallel rank has nothing to deal.
    let one = ModelSummary::new(&plan.spec, &RunShape { data: 1, ..shape(None, true) }).unwrap();
    assert!(one.memory.trainable_and_optimizer_otherwise.is_none());
    close(one.memory.trainable_and_optimizer, one.per_rank_trainable as f64 * 16.0 / gib, "full, one rank");
}

/// The activations `trainer check` estimates under each recompute setting, on Qwen2.5-7B (28
/// equal layers): recomputing every layer alone (uniform groups of one, or a block of all 28)
/// keeps each layer's input plus, while one replays, its activations; a block of the first k
/// layers keeps the other layers' activations and k inputs (the replays come after the kept
/// layers are freed); one group of every layer holds them all again while it replays.
#[test]
fn check_estimates_the_activations_of_each_recompute_setting() {
    use trainer::recipe::{RecomputeGranularity::*, RecomputeMethod::*, RecomputeSection};
    let section = ModelSection { path: Some("tests/data/qwen2.5-7b-instruct".into()), ..Default::default() };
    let plan = model::plan(&section, &Registry::builtin(), Fetch::Config).unwrap();
    let layers = plan.spec.layers.len();
    let estimate = |granularity, method, num_layers| {
        let run = RunShape {
            data: 1, tensor: 1, expert: 1, context: 1, sequence_parallel: false, micro_batch: 4, seq_len: 2048,
            lora: Some((8, all_linear())), weight_bytes: 2, recompute: RecomputeSection { granularity, method, num_layers },
            fused_cross_entropy: true, distributed_optimizer: false,
        };
        ModelSummary::new(&plan.spec, &run).unwrap().memory
    };
    let (none, full) = (estimate(None, Uniform, 1), estimate(Full, Uniform, 1));
    // Without recompute, the figure for recompute is whole layers one at a time.
    assert_eq!(none.activations_recompute, full.activations_recompute);
    let layer = none.activations_no_recompute / layers as f64;
    let input = (full.activations_recompute - layer) / layers as f64;
    assert!(input > 0.0 && input < layer / 4.0, "{input} GiB a layer's input, {layer} GiB its activations");
    assert_eq!(estimate(Full, Block, layers).activations_recompute, full.activations_recompute);
    let close = |got: f64, want: f64, what: &str| assert!((got - want).abs() <= 1e-9 * want, "{what}: {got} GiB, expected {want}");
    for k in [1, 16, layers - 1] {
        let block = estimate(Full, Block, k);
        close(block.activations_recompute, (layers - k) as f64 * layer + k as f64 * input, &format!("block of {k}"));
        close(block.total - block.activations_recompute, none.total - none.activations_no_recompute, "the rest of the total");
    }
    close(estimate(Full, Uniform, layers).activations_recompute, none.activations_no_recompute + input, "one group of every layer");
}

#[test]
fn init_follows_peft_and_trainable_count_matches_check() {
    let (plan, _) = plan_and_section();
    let base_params = build::<Cpu>().num_params();
    let (mut adapted, _) = lora::apply(build::<Cpu>(), &all_linear(), &cfg()).unwrap();
    let lora_params = adapted.num_params() - base_params;
    let run = RunShape {
        data: 1, tensor: 1, expert: 1, context: 1, sequence_parallel: false, micro_batch: 1, seq_len: 16,
        lora: Some((4, all_linear())), weight_bytes: 4, recompute: Default::default(), fused_cross_entropy: true,
        distributed_optimizer: false,
    };
    let summary = ModelSummary::new(&plan.spec, &run).unwrap();
    assert_eq!(lora_params as u64, summary.trainable_params);
    assert_eq!(base_params as u64, summary.total_params);
    // Kaiming-uniform with a = sqrt(5): |A| <= 1 / sqrt(fan_in), spread over the whole range.
    let a = adapted.linears_mut()[0].1.lora.as_ref().unwrap().lora_a.val();
    let v: Vec<f32> = a.into_data().to_vec().unwrap();
    let bound = 1.0 / (32f32).sqrt();
    assert!(v.iter().all(|x| x.abs() <= bound));
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((std - bound / 3f32.sqrt()).abs() < 0.2 * bound, "std {std}");
}

#[test]
fn targets_that_match_nothing_are_an_error() {
    let none = LoraTargets::parse(&["nonexistent_proj".to_string()]).unwrap();
    let e = lora::apply(build::<Cpu>(), &none, &cfg()).err().unwrap().to_string();
    assert!(e.contains("matches no linear layer"), "{e}");
}

/// Qwen2-MoE: `all-linear` adapts the shared expert's projections like a dense MLP's, never its
/// one-output gate or the router (adapted only when named, as the router is); a fresh adapter
/// changes nothing; the loss's gradient reaches the shared expert's adapters and not its frozen
/// weights; `trainer check` counts the shared expert in the base and the trainable parameters.
#[test]
fn shared_expert_is_adapted_like_a_dense_mlp_and_its_gate_only_when_named() {
    type Ad = Autodiff<Cpu>;
    let (plan, _) = plan_and_section_of(SHARED_EXPERT_CASE);
    let base = build_of::<Ad>(SHARED_EXPERT_CASE);
    let base_params = base.num_params();
    let (x, labels) = ids_of::<Ad>(SHARED_EXPERT_CASE);
    let before = base.forward(x.clone()).inner();
    let (model, n) = lora::apply(base, &all_linear(), &cfg()).unwrap();
    // 3 layers x 4 attention projections + 2 sparse layers x (6 experts + the shared one) x 3
    // + 1 dense MLP x 3.
    assert_eq!(n, 3 * 4 + 2 * 7 * 3 + 3);
    assert_eq!(max_diff(model.forward(x.clone()).inner(), before), 0.0);
    let ce = causal_lm_loss(model.forward(x), labels);
    let grads = (ce.sum / ce.tokens as f64).backward();
    for i in [0, 2] {
        let moe = model.layers[i].moe.as_ref().expect("a sparse layer");
        let shared = moe.shared_expert.as_ref().expect("a shared expert");
        for (name, lin) in [("gate_proj", &shared.gate_proj), ("up_proj", &shared.up_proj), ("down_proj", &shared.down_proj)] {
            let a = lin.lora.as_ref().unwrap_or_else(|| panic!("layer {i} shared_expert.{name}: no adapter"));
            let gb = a.lora_b.val().grad(&grads).expect("dB").abs().sum().into_scalar();
            assert!(gb > 0.0, "layer {i} shared_expert.{name}: dB {gb}");
            assert!(lin.weight.val().grad(&grads).is_none(), "layer {i} shared_expert.{name}: the frozen weight got a gradient");
        }
        assert!(moe.shared_expert_gate.as_ref().expect("a shared expert gate").lora.is_none() && moe.gate.lora.is_none());
    }
    assert!(model.layers[1].moe.is_none());
    let run = RunShape {
        data: 1, tensor: 1, expert: 1, context: 1, sequence_parallel: false, micro_batch: 1, seq_len: 16,
        lora: Some((4, all_linear())), weight_bytes: 4, recompute: Default::default(), fused_cross_entropy: true,
        distributed_optimizer: false,
    };
    let summary = ModelSummary::new(&plan.spec, &run).unwrap();
    assert_eq!(base_params as u64, summary.total_params);
    assert_eq!((model.num_params() - base_params) as u64, summary.trainable_params);
    assert_eq!(summary.adapted_linears, n);
    // Named, the gate is adapted (`trainer check` would ask for rank 1: it has one output).
    let named = LoraTargets::parse(&["shared_expert_gate".to_string()]).unwrap();
    let (model, n) = lora::apply(build_of::<Cpu>(SHARED_EXPERT_CASE), &named, &cfg()).unwrap();
    assert_eq!(n, 2);
    assert!(model.layers[0].moe.as_ref().unwrap().shared_expert_gate.as_ref().unwrap().lora.is_some());
}
