//! The trained LoRA factors of a checkpoint, checked against the base architecture, merged into
//! base weights, and laid out for peft.
//!
//! A checkpoint stores peft's per-module names ([`hf_names::peft_factor`]: `lora_A` `[r, in]`
//! and `lora_B` `[out, r]`). That is what peft loads for dense models, and for
//! MoE models whose transformers class keeps one module per expert (transformers 4.x). From
//! transformers 5 on, Qwen3-MoE keeps its experts as two 3-D parameters per layer
//! ([`hf_names::FUSED_GATE_UP`] `[E, 2I, H]`, [`hf_names::FUSED_DOWN`] `[E, H, I]`), and peft 0.21
//! adapts them through `target_parameters` (its `ParamWrapper`): per layer one `lora_A`
//! `[R*E, in]` read as `[E, R, in]` and one `lora_B` `[out, R*E]` read as `[out, R, E]`, with
//! `delta[e] = B[:, :, e] @ A[e]`. [`fused_experts`] writes that layout exactly: gate and up
//! share one parameter, so their two rank-r adapters become one of rank 2r (A stacked, B block
//! diagonal), and every other adapter is padded with zeros to the same rank, with alpha scaled
//! so `alpha / r` (or `alpha / sqrt(r)` with rslora) stays the trained scale.
//!
//! Dense MLPs beside the experts (`decoder_sparse_step` > 1, `mlp_only_layers`) cannot be named in
//! `target_modules` by their leaf names: peft 0.21 reads `gate_proj` / `up_proj` / `down_proj`
//! there as transformers 4's per-expert modules, moves them to the fused parameters and doubles
//! the rank it expects for `gate_up_proj`. They are adapted through `target_parameters`
//! (`mlp.gate_proj.weight`, ...) instead, under the same tensor names, which peft loads as plain
//! LoRA on those weights. Qwen2-MoE's shared expert has the same leaf names and goes the same
//! way (`mlp.shared_expert.gate_proj.weight`, ...).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::spec::{ArchSpec, MlpSpec};
use crate::model::tensors::BaseTensor;
use crate::model::hf_names::{self, Factor};

/// One adapted linear layer: `A` `[r, in]`, `B` `[out, r]` (peft's layout), row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub inp: usize,
    pub out: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Every adapter of a checkpoint by Hugging Face module path ([`hf_names`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSet {
    pub modules: BTreeMap<String, Factors>,
    /// `alpha / r`, or `alpha / sqrt(r)` with rslora.
    pub scale: f64,
}

impl AdapterSet {
    /// Pair up the `lora_A` / `lora_B` tensors of a peft adapter file (already read).
    pub fn from_tensors(file: &Path, tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>, rank: usize, scale: f64) -> Result<Self> {
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        for (name, t) in tensors {
            match hf_names::peft_factor_of(&name) {
                Some((m, Factor::A)) => a.insert(m.to_string(), t),
                Some((m, Factor::B)) => b.insert(m.to_string(), t),
                None => {
                    let (want_a, want_b) = (hf_names::peft_factor("<module>", Factor::A), Factor::B.peft_leaf());
                    return Err(Error::file(file, format!("tensor `{name}` is not a LoRA factor (expected `{want_a}` / `.{want_b}`)")));
                }
            };
        }
        let mut modules = BTreeMap::new();
        for (m, (ashape, adata)) in a {
            let Some((bshape, bdata)) = b.remove(&m) else {
                return Err(Error::file(file, format!("`{m}` has lora_A but no lora_B")));
            };
            if ashape.len() != 2 || bshape.len() != 2 || ashape[0] != rank || bshape[1] != rank {
                return Err(Error::file(
                    file,
                    format!("`{m}`: lora_A {ashape:?} and lora_B {bshape:?} do not have the recipe's rank {rank} ([r, in] and [out, r])"),
                ));
            }
            modules.insert(m, Factors { rank, inp: ashape[1], out: bshape[0], a: adata, b: bdata });
        }
        if let Some(m) = b.keys().next() {
            return Err(Error::file(file, format!("`{m}` has lora_B but no lora_A")));
        }
        Ok(AdapterSet { modules, scale })
    }

    /// Every adapter must sit on a linear layer of the base with the same `[out, in]`.
    pub fn check_against(&self, base: &[BaseTensor], file: &Path, base_name: &str) -> Result<()> {
        let linears: BTreeMap<&str, &BaseTensor> = base.iter().filter_map(|t| t.linear_module().map(|m| (m, t))).collect();
        for (m, f) in &self.modules {
            let Some(t) = linears.get(m.as_str()) else {
                let near = linears
                    .keys()
                    .map(|k| (strsim::normalized_levenshtein(k, m), *k))
                    .max_by(|x, y| x.0.total_cmp(&y.0))
                    .map(|(_, k)| format!("; the nearest linear layer of the base is `{k}`"))
                    .unwrap_or_default();
                return Err(Error::file(file, format!("the adapter targets `{m}`, which {base_name} does not have{near}")));
            };
            if t.shape != [f.out, f.inp] {
                return Err(Error::file(
                    file,
                    format!("the adapter of `{m}` is for a [{}, {}] weight ([out, in]); {base_name} has {:?}", f.out, f.inp, t.shape),
                ));
            }
        }
        Ok(())
    }
}

/// `w += scale * B @ A` for a row-major `[out, in]` weight, in f32, rows split across threads.
pub fn merge_into(w: &mut [f32], f: &Factors, scale: f64) {
    let (inp, r) = (f.inp, f.rank);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per = f.out.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (chunk_i, chunk) in w.chunks_mut(rows_per * inp).enumerate() {
            s.spawn(move || {
                for (j, row) in chunk.chunks_mut(inp).enumerate() {
                    let o = chunk_i * rows_per + j;
                    for k in 0..r {
                        let c = (scale * f64::from(f.b[o * r + k])) as f32;
                        if c == 0.0 {
                            continue;
                        }
                        for (x, a) in row.iter_mut().zip(&f.a[k * inp..(k + 1) * inp]) {
                            *x += c * a;
                        }
                    }
                }
            });
        }
    });
}

/// A peft adapter ready to write: tensors by name (row-major f32) and the config fields that
/// differ from the per-module layout.
pub struct PeftLayout {
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    pub rank: usize,
    pub alpha: f64,
    /// Module paths adapted per module (for `target_modules`).
    pub module_paths: Vec<String>,
    /// `target_parameters` (empty in the per-module layout).
    pub target_parameters: Vec<String>,
}

/// The checkpoint's own layout: one adapter per module, experts included.
pub fn per_module(set: &AdapterSet, alpha: f64) -> PeftLayout {
    let mut tensors = Vec::new();
    for (m, f) in &set.modules {
        tensors.push((hf_names::peft_factor(m, Factor::A), vec![f.rank, f.inp], f.a.clone()));
        tensors.push((hf_names::peft_factor(m, Factor::B), vec![f.out, f.rank], f.b.clone()));
    }
    let rank = set.modules.values().next().map_or(0, |f| f.rank);
    PeftLayout { tensors, rank, alpha, module_paths: set.modules.keys().cloned().collect(), target_parameters: vec![] }
}

/// transformers 5 / peft 0.21's layout for fused experts (see the module docs).
pub fn fused_experts(set: &AdapterSet, spec: &ArchSpec, alpha: f64, rslora: bool) -> PeftLayout {
    let r = set.modules.values().next().map_or(0, |f| f.rank);
    let [gate_proj, up_proj, down_proj] = hf_names::MLP_PROJECTIONS;
    let has = |p: &[&str]| set.modules.keys().any(|m| hf_names::expert_projection_of(m).is_some_and(|(_, _, proj)| p.contains(&proj)));
    let (gate_up, down) = (has(&[gate_proj, up_proj]), has(&[down_proj]));
    // gate and up share one parameter: two rank-r adapters need rank 2r there.
    let big = if gate_up { 2 * r } else { r };
    let ratio = (big / r.max(1)) as f64;
    let alpha_out = if rslora { alpha * ratio.sqrt() } else { alpha * ratio };
    let mut tensors = Vec::new();
    let mut module_paths = Vec::new();
    let mut dense_mlp = std::collections::BTreeSet::new();
    // Modules that stay per-module: padded to `big` with zero rows of A and zero columns of B.
    for (m, f) in &set.modules {
        if hf_names::expert_projection_of(m).is_some() {
            continue;
        }
        let mut a = f.a.clone();
        a.resize(big * f.inp, 0.0);
        let mut b = vec![0.0; f.out * big];
        for o in 0..f.out {
            b[o * big..o * big + r].copy_from_slice(&f.b[o * r..(o + 1) * r]);
        }
        tensors.push((hf_names::peft_factor(m, Factor::A), vec![big, f.inp], a));
        tensors.push((hf_names::peft_factor(m, Factor::B), vec![f.out, big], b));
        match hf_names::dense_mlp_projection(m) {
            Some(proj) => {
                dense_mlp.insert(hf_names::dense_mlp_parameter(proj));
            }
            None => module_paths.push(m.clone()),
        }
    }
    for (i, layer) in spec.layers.iter().enumerate() {
        let MlpSpec::Moe { num_experts: e_n, intermediate_size: inter, .. } = layer.mlp else { continue };
        let h = spec.hidden_size;
        let block = hf_names::mlp(i);
        let experts = hf_names::experts(&block);
        // (parameter, in, out, [(projection, rank slot offset, output row offset)])
        let mut params: Vec<(&str, usize, usize, Vec<(&str, usize, usize)>)> = Vec::new();
        if gate_up {
            params.push((hf_names::FUSED_GATE_UP, h, 2 * inter, vec![(gate_proj, 0, 0), (up_proj, r, inter)]));
        }
        if down {
            params.push((hf_names::FUSED_DOWN, inter, h, vec![(down_proj, 0, 0)]));
        }
        let nested = params.len() == 2;
        for (k, (_, inp, out, parts)) in params.iter().enumerate() {
            let mut a = vec![0.0f32; big * e_n * inp];
            let mut b = vec![0.0f32; out * big * e_n];
            for e in 0..e_n {
                for (proj, slot, row0) in parts {
                    let Some(f) = set.modules.get(&hf_names::child(&hf_names::expert(&block, e), proj)) else { continue };
                    for kr in 0..r {
                        let dst = (e * big + slot + kr) * inp;
                        a[dst..dst + inp].copy_from_slice(&f.a[kr * inp..(kr + 1) * inp]);
                        for o in 0..f.out {
                            b[(row0 + o) * big * e_n + (slot + kr) * e_n + e] = f.b[o * r + kr];
                        }
                    }
                }
            }
            // peft nests a second wrapper around the first: the parameter registered first
            // (gate_up_proj) ends up as `base_layer`.
            let module = if nested && k == 0 { hf_names::peft_base_layer(&experts) } else { experts.clone() };
            tensors.push((hf_names::peft_factor(&module, Factor::A), vec![big * e_n, *inp], a));
            tensors.push((hf_names::peft_factor(&module, Factor::B), vec![*out, big * e_n], b));
        }
    }
    let mut target_parameters = Vec::new();
    if gate_up {
        target_parameters.push(hf_names::fused_expert_parameter(hf_names::FUSED_GATE_UP));
    }
    if down {
        target_parameters.push(hf_names::fused_expert_parameter(hf_names::FUSED_DOWN));
    }
    target_parameters.extend(dense_mlp);
    PeftLayout { tensors, rank: big, alpha: alpha_out, module_paths, target_parameters }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::LayerSpec;

    fn factors(rank: usize, inp: usize, out: usize, seed: u32) -> Factors {
        let v = |n: usize, s: u32| (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ s) % 1000) as f32 / 1000.0 - 0.5).collect();
        Factors { rank, inp, out, a: v(rank * inp, seed), b: v(out * rank, seed + 7) }
    }

    fn delta(f: &Factors, scale: f64) -> Vec<f32> {
        let mut w = vec![0.0; f.out * f.inp];
        merge_into(&mut w, f, scale);
        w
    }

    #[test]
    fn merge_adds_scaled_b_times_a() {
        let f = Factors { rank: 2, inp: 3, out: 2, a: vec![1., 2., 3., 4., 5., 6.], b: vec![1., 0., 0., 2.] };
        let mut w = vec![1.0; 6];
        merge_into(&mut w, &f, 0.5);
        assert_eq!(w, vec![1.5, 2.0, 2.5, 5.0, 6.0, 7.0]);
    }

    /// peft's `ParamWrapper.get_delta_weight` for a 3-D `[E, out, in]` parameter.
    fn peft_delta(a: &[f32], b: &[f32], e_n: usize, rank: usize, inp: usize, out: usize, scale: f64) -> Vec<f32> {
        // A as [E, R, in], B as [out, R, E]; delta[e, o, i] = sum_r B[o, r, e] A[e, r, i].
        let mut d = vec![0.0f32; e_n * out * inp];
        for e in 0..e_n {
            for o in 0..out {
                for k in 0..rank {
                    let c = b[o * rank * e_n + k * e_n + e] as f64 * scale;
                    for i in 0..inp {
                        d[(e * out + o) * inp + i] += (c * a[(e * rank + k) * inp + i] as f64) as f32;
                    }
                }
            }
        }
        d
    }

    #[test]
    fn fused_expert_layout_gives_the_same_deltas() {
        let (h, inter, e_n, r) = (6, 4, 3, 2);
        let spec = ArchSpec {
            family: "qwen3_moe".into(),
            vocab_size: 10,
            hidden_size: h,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-6,
            rope_inv_freq: vec![1.0, 0.1],
            max_position_embeddings: 16,
            qkv_bias: false,
            qk_norm: true,
            tie_word_embeddings: true,
            init_std: 0.02,
            router_aux_loss_coef: 0.0,
            layers: vec![
                LayerSpec { mlp: MlpSpec::Moe { num_experts: e_n, top_k: 2, intermediate_size: inter, norm_topk_prob: true, shared_expert_intermediate_size: Some(3) } },
                LayerSpec { mlp: MlpSpec::Dense { intermediate_size: 5 } },
            ],
        };
        let mut modules = BTreeMap::new();
        modules.insert("model.layers.0.self_attn.q_proj".to_string(), factors(r, h, 8, 1));
        // A dense layer beside the sparse one, and the sparse one's shared expert (Qwen2-MoE).
        modules.insert("model.layers.1.mlp.gate_proj".to_string(), factors(r, h, 5, 2));
        modules.insert("model.layers.1.mlp.down_proj".to_string(), factors(r, 5, h, 3));
        modules.insert("model.layers.0.mlp.shared_expert.up_proj".to_string(), factors(r, h, 3, 4));
        for e in 0..e_n {
            // Expert 1 has no up_proj adapter: its slot must stay zero.
            for (p, inp, out) in [("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)] {
                if !(e == 1 && p == "up_proj") {
                    modules.insert(format!("model.layers.0.mlp.experts.{e}.{p}"), factors(r, inp, out, (e * 10 + p.len()) as u32));
                }
            }
        }
        let alpha = 8.0;
        let set = AdapterSet { modules, scale: alpha / r as f64 };
        let layout = fused_experts(&set, &spec, alpha, false);
        assert_eq!((layout.rank, layout.alpha), (2 * r, 2.0 * alpha));
        assert_eq!(
            layout.target_parameters,
            vec![
                "mlp.experts.gate_up_proj",
                "mlp.experts.down_proj",
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.shared_expert.up_proj.weight"
            ],
            "dense MLPs and shared experts through target_parameters: peft would read their names in target_modules as experts"
        );
        let scale_out = layout.alpha / layout.rank as f64;
        let get = |n: &str| layout.tensors.iter().find(|t| t.0 == format!("{}{n}", hf_names::PEFT_PREFIX)).unwrap_or_else(|| panic!("{n}"));
        let (ga, gb) = (get("model.layers.0.mlp.experts.base_layer.lora_A.weight"), get("model.layers.0.mlp.experts.base_layer.lora_B.weight"));
        assert_eq!((ga.1.clone(), gb.1.clone()), (vec![2 * r * e_n, h], vec![2 * inter, 2 * r * e_n]));
        let gate_up = peft_delta(&ga.2, &gb.2, e_n, 2 * r, h, 2 * inter, scale_out);
        let (da, db) = (get("model.layers.0.mlp.experts.lora_A.weight"), get("model.layers.0.mlp.experts.lora_B.weight"));
        let down = peft_delta(&da.2, &db.2, e_n, 2 * r, inter, h, scale_out);
        for e in 0..e_n {
            let want = |p: &str, n: usize| set.modules.get(&format!("model.layers.0.mlp.experts.{e}.{p}")).map_or(vec![0.0; n], |f| delta(f, set.scale));
            let got_gate = &gate_up[e * 2 * inter * h..e * 2 * inter * h + inter * h];
            let got_up = &gate_up[e * 2 * inter * h + inter * h..(e + 1) * 2 * inter * h];
            let got_down = &down[e * h * inter..(e + 1) * h * inter];
            for (got, want) in [(got_gate.to_vec(), want("gate_proj", inter * h)), (got_up.to_vec(), want("up_proj", inter * h)), (got_down.to_vec(), want("down_proj", h * inter))] {
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "expert {e}: {g} vs {w}");
                }
            }
        }
        // A padded per-module adapter keeps its delta at the new rank and alpha.
        let (qa, qb) = (get("model.layers.0.self_attn.q_proj.lora_A.weight"), get("model.layers.0.self_attn.q_proj.lora_B.weight"));
        let padded = Factors { rank: 2 * r, inp: h, out: 8, a: qa.2.clone(), b: qb.2.clone() };
        assert_eq!(delta(&padded, scale_out), delta(&set.modules["model.layers.0.self_attn.q_proj"], set.scale));
        assert_eq!(layout.module_paths, vec!["model.layers.0.self_attn.q_proj"]);
        let dense = get("model.layers.1.mlp.gate_proj.lora_A.weight");
        assert_eq!(dense.1, vec![2 * r, h], "padded like every per-module adapter");
        let shared = get("model.layers.0.mlp.shared_expert.up_proj.lora_B.weight");
        assert_eq!(shared.1, vec![3, 2 * r], "padded like every per-module adapter");
    }

    #[test]
    fn adapters_must_fit_the_base() {
        let base = vec![BaseTensor { path: "model.layers.0.self_attn.q_proj.weight".into(), shape: vec![8, 6], init: crate::model::weights::InitKind::Normal }];
        let mut modules = BTreeMap::new();
        modules.insert("model.layers.0.self_attn.q_proj".to_string(), factors(2, 6, 8, 0));
        let ok = AdapterSet { modules: modules.clone(), scale: 1.0 };
        ok.check_against(&base, Path::new("a"), "the base").unwrap();
        modules.insert("model.layers.7.self_attn.q_proj".to_string(), factors(2, 6, 8, 0));
        let err = AdapterSet { modules, scale: 1.0 }.check_against(&base, Path::new("a"), "the base").unwrap_err().to_string();
        assert!(err.contains("targets `model.layers.7.self_attn.q_proj`") && err.contains("nearest"), "{err}");
        let mut modules = BTreeMap::new();
        modules.insert("model.layers.0.self_attn.q_proj".to_string(), factors(2, 5, 8, 0));
        let err = AdapterSet { modules, scale: 1.0 }.check_against(&base, Path::new("a"), "the base").unwrap_err().to_string();
        assert!(err.contains("[8, 5]"), "{err}");
    }
}
