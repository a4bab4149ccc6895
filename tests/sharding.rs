//! N-rank logic against 1 rank: layers built for each rank of a tensor- or expert-parallel
//! group load their slice of the same weights, and their partial outputs add up to the
//! unsharded layer's output (the sum is what the row-parallel all-reduce will compute).

use burn::tensor::{Distribution, Tensor};
use trainer::backend::Cpu;
use trainer::model::layers::{Attention, Loader, Mlp, SparseMoe};
use trainer::model::spec::{default_inv_freq, ArchSpec, LayerSpec, MlpSpec};
use trainer::model::weights::RandomInit;
use trainer::parallel::ProcessGroup;

fn spec() -> ArchSpec {
    ArchSpec {
        family: "test".into(),
        vocab_size: 11,
        hidden_size: 24,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 6,
        rms_norm_eps: 1e-6,
        rope_inv_freq: default_inv_freq(10000.0, 6),
        max_position_embeddings: 64,
        qkv_bias: true,
        qk_norm: true,
        tie_word_embeddings: true,
        init_std: 0.2,
        router_aux_loss_coef: 0.0,
        layers: vec![LayerSpec { mlp: MlpSpec::Dense { intermediate_size: 16 } }],
    }
}

fn with_loader<T>(f: impl FnOnce(&mut Loader<'_, Cpu>) -> T) -> T {
    let mut src = RandomInit { seed: 3, std: 0.2 };
    let naming = |p: &str| p.to_string();
    let mut ld = Loader { source: &mut src, device: Default::default(), naming: &naming };
    f(&mut ld)
}

fn max_diff<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn tensor_parallel_mlp_partials_sum_to_the_full_mlp() {
    let x = Tensor::<Cpu, 3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &Default::default());
    let full = with_loader(|ld| Mlp::load(ld, "mlp", 24, 16, ProcessGroup::SINGLE).unwrap()).forward(x.clone(), None);
    for size in [2, 4] {
        let sum = (0..size)
            .map(|r| with_loader(|ld| Mlp::load(ld, "mlp", 24, 16, ProcessGroup::new(r, size)).unwrap()).forward(x.clone(), None))
            .reduce(|a, b| a + b)
            .unwrap();
        assert!(max_diff(sum, full.clone()) < 1e-5, "tp={size}");
    }
}

#[test]
fn tensor_parallel_attention_partials_sum_to_the_full_attention() {
    let spec = spec();
    let device = Default::default();
    let x = Tensor::<Cpu, 3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &device);
    let pos = trainer::model::causal_lm::positions_like(&Tensor::<Cpu, 2, burn::tensor::Int>::zeros([2, 5], &device));
    let inv = Tensor::from_floats(spec.rope_inv_freq.iter().map(|&f| f as f32).collect::<Vec<_>>().as_slice(), &device);
    let ctx = trainer::model::SequenceContext::new(pos, None, inv);
    let run = |g: ProcessGroup| with_loader(|ld| Attention::load(ld, "attn", &spec, g).unwrap()).forward(x.clone(), &ctx);
    let full = run(ProcessGroup::SINGLE);
    // o_proj's bias-free row-parallel partials add up exactly to the full projection.
    let sum = run(ProcessGroup::new(0, 2)) + run(ProcessGroup::new(1, 2));
    assert!(max_diff(sum, full) < 1e-5);
}

#[test]
fn expert_parallel_moe_partials_sum_to_the_full_moe() {
    let moe = MlpSpec::Moe { num_experts: 6, top_k: 2, intermediate_size: 8, norm_topk_prob: true, shared_expert_intermediate_size: None };
    let x = Tensor::<Cpu, 2>::random([9, 24], Distribution::Normal(0.0, 1.0), &Default::default());
    let full = with_loader(|ld| SparseMoe::load(ld, "mlp", 24, &moe, ProcessGroup::SINGLE).unwrap());
    assert_eq!(full.experts.len(), 6);
    let y = full.forward(x.clone(), None, None, None);
    for size in [2, 3] {
        let parts: Vec<SparseMoe<Cpu>> =
            (0..size).map(|r| with_loader(|ld| SparseMoe::load(ld, "mlp", 24, &moe, ProcessGroup::new(r, size)).unwrap())).collect();
        assert_eq!(parts[1].first_expert, 6 / size);
        let sum = parts.iter().map(|p| p.forward(x.clone(), None, None, None)).reduce(|a, b| a + b).unwrap();
        assert!(max_diff(sum, y.clone()) < 1e-5, "ep={size}");
    }
}
