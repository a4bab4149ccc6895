//! Each piece of a decoder layer on CUDA in bf16 against the same piece on NdArray in f32, fed
//! the same (bf16-representable) input, for every fixture model: where `cuda_parity` says the
//! whole model is off, this says which op. GPU-only: built with `--features cuda` and
//! `#[ignore]`d; on the GPU machine:
//!
//!     cargo test --release --features cuda --test cuda_layers -- --ignored --nocapture
#![cfg(feature = "cuda")]

mod common;

use burn::backend::cuda::{Cuda, CudaDevice};
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use trainer::backend::TrainBackend;
use trainer::model::{self, hub::Fetch, CausalLm, Registry};
use trainer::parallel::Layout;

type G = Cuda<half::bf16, i32>;
type C = NdArray<f32>;

fn build<B: TrainBackend>(case: &str, device: &B::Device) -> CausalLm<B> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, common::fixture_recipe(case, "")).unwrap();
    let loaded = trainer::recipe::load(&path, &[]).unwrap();
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config).unwrap();
    model::build::<B>(&plan, &loaded.recipe.model, Layout::SINGLE, device).unwrap()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(FloatDType::F32).into_data().convert::<f32>().to_vec().unwrap()
}

/// `t`'s values rounded to bf16, as a CPU tensor and as a CUDA bf16 tensor.
fn both<const D: usize>(t: Tensor<C, D>, gpu: &CudaDevice) -> (Tensor<C, D>, Tensor<G, D>) {
    let dims = t.dims();
    let values: Vec<f32> = host(t).into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect();
    (
        Tensor::from_data(TensorData::new(values.clone(), dims), &Default::default()),
        Tensor::<G, D>::from_data(TensorData::new(values, dims), gpu),
    )
}

struct Report(Vec<(String, f32)>);

impl Report {
    fn compare<const D: usize>(&mut self, name: String, cpu: Tensor<C, D>, gpu: Tensor<G, D>) -> f32 {
        let (want, got) = (host(cpu), host(gpu));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let err = if got.len() == want.len() { common::max_diff(&got, &want) / scale } else { f32::INFINITY };
        eprintln!("{name:<48} {err:.2e}");
        self.0.push((name, err));
        err
    }
}

/// The batched matmuls of the blockwise attention on their own (grouped query rows against a
/// transposed view of the keys, then probabilities against values), Burn's matmul on CUDA bf16
/// against NdArray f32, at the fixtures' GQA shapes.
fn attention_matmuls(report: &mut Report, label: &str, gpu: &CudaDevice) {
    use burn::tensor::Distribution;
    for (kv, groups, rows, keys, d) in [(1, 5, 7, 7, 16), (2, 3, 7, 7, 8), (2, 2, 7, 7, 12), (4, 7, 64, 64, 128)] {
        let r = |shape: [usize; 4]| Tensor::<C, 4>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default());
        let (cq, gq) = both(r([1, kv, groups * rows, d]), gpu);
        let (ck, gk) = both(r([1, kv, keys, d]), gpu);
        let name = format!("{label}: q [1, {kv}, {}, {d}] @ k^T (keys {keys})", groups * rows);
        report.compare(name, cq.clone().matmul(ck.clone().swap_dims(2, 3)), gq.clone().matmul(gk.clone().swap_dims(2, 3)));
        let (cv, gv) = both(r([1, kv, keys, d]), gpu);
        let (cp, gp) = both(r([1, kv, groups * rows, keys]), gpu);
        report.compare(format!("{label}: p [1, {kv}, {}, {keys}] @ v", groups * rows), cp.matmul(cv), gp.matmul(gv));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_bf16_layer_pieces_match_cpu_f32() {
    let gpu = CudaDevice::default();
    let mut report = Report(Vec::new());
    // Informational first: Burn's own CUDA matmul at the attention's shapes. On 2026-12-01 it
    // put the attention of the 5-query-heads-on-1-kv-head fixture off by order one (RESULTS.md).
    attention_matmuls(&mut report, "Burn matmul", &gpu);
    let informational = report.0.len();
    // Then the pieces as every trainer command on CUDA runs them (the GEMMs on cuBLAS, by the
    // backend's declaration): this is what must hold.
    pieces(&mut report, &gpu, "cuBLAS");
    // bf16 keeps 8 significant bits: one rounding of each output is 2^-8 of the largest value;
    // a few roundings inside a piece stay well under 5e-2. A wrong op is off by order one. A
    // MoE layer as a whole is exempt: bf16 rounding of near-tied router logits can send a token
    // to another expert (`cuda_parity` holds the whole model to transformers' own bf16 error).
    let bad: Vec<_> = report.0[informational..].iter().filter(|(n, e)| !(*e < 5e-2) && !(n.contains("moe") && n.ends_with("whole layer"))).collect();
    assert!(bad.is_empty(), "pieces off by more than 5e-2: {bad:?}");
}

fn pieces(report: &mut Report, gpu: &CudaDevice, label: &str) {
    let gpu = gpu.clone();
    for case in common::CASES {
        let case = &format!("{label} {case}")[..];
        let fixture = case.rsplit(' ').next().unwrap_or_default();
        let exp = common::expected(fixture);
        let (cm, gm) = (build::<C>(fixture, &Default::default()), build::<G>(fixture, &gpu));
        let (ids, shape) = exp.input_ids.clone();
        let cids = Tensor::<C, 2, Int>::from_data(TensorData::new(ids.clone(), shape), &Default::default());
        let gids = Tensor::<G, 2, Int>::from_data(TensorData::new(ids, shape), &gpu);
        let (cpos, gpos) = (model::causal_lm::positions_like(&cids), model::causal_lm::positions_like(&gids));
        let (cctx, gctx) = (cm.context(cpos, None), gm.context(gpos, None));
        report.compare(format!("{case} rope cos"), cctx.cos.clone(), gctx.cos.clone());
        let mut x = cm.embed(cids.clone());
        report.compare(format!("{case} embed"), x.clone(), gm.embed(gids.clone()));
        for (i, (cl, gl)) in cm.layers.iter().zip(&gm.layers).enumerate() {
            let (cx, gx) = both(x.clone(), &gpu);
            let p = |piece: &str| format!("{case} layer {i} {piece}");
            let (cn, gn) = (cl.input_layernorm.forward(cx.clone()), gl.input_layernorm.forward(gx.clone()));
            report.compare(p("input_layernorm"), cn.clone(), gn);
            let (cn, gn) = both(cn, &gpu);
            let (ca, ga) = (&cl.self_attn, &gl.self_attn);
            let [b, s, _] = cn.dims();
            let (cq, gq) = (ca.q_proj.forward(cn.clone()), ga.q_proj.forward(gn.clone()));
            report.compare(p("q_proj"), cq.clone(), gq);
            if let (Some(cqn), Some(gqn)) = (&ca.q_norm, &ga.q_norm) {
                let (cq4, gq4) = both(cq.reshape([b, s, ca.num_heads, ca.head_dim]), &gpu);
                report.compare(p("q_norm"), cqn.forward(cq4.clone()), gqn.forward(gq4.clone()));
                let (cqt, gqt) = both(cq4.clone().swap_dims(1, 2), &gpu);
                report.compare(p("rotary (contiguous q)"), kernels_cubecl::rotary(cqt, cctx.cos.clone(), cctx.sin.clone()), kernels_cubecl::rotary(gqt, gctx.cos.clone(), gctx.sin.clone()));
                let (cq4, gq4) = both(cqn.forward(cq4), &gpu);
                report.compare(
                    p("rotary (swapped view)"),
                    kernels_cubecl::rotary(cq4.swap_dims(1, 2), cctx.cos.clone(), cctx.sin.clone()),
                    kernels_cubecl::rotary(gq4.swap_dims(1, 2), gctx.cos.clone(), gctx.sin.clone()),
                );
            }
            let (cy, gy) = (ca.forward(cn.clone(), &cctx), ga.forward(gn.clone(), &gctx));
            report.compare(p("self_attn"), cy, gy);
            let (co, go) = (cl.forward(cx.clone(), &cctx), gl.forward(gx, &gctx));
            report.compare(p("whole layer"), co.clone(), go);
            x = co;
        }
        let (cx, gx) = both(x, &gpu);
        let (ch, gh) = (cm.norm.forward(cx), gm.norm.forward(gx));
        report.compare(format!("{case} final norm"), ch.clone(), gh);
        let (ch, gh) = both(ch, &gpu);
        report.compare(format!("{case} logits"), cm.logits(ch), gm.logits(gh));
    }
}
