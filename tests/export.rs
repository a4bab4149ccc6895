//! `trainer export` on CPU: a tiny trained run exported as a merged Hugging Face folder, a peft
//! adapter and a native base; merged logits equal the unmerged adapter's; the index lists every
//! tensor once; shards respect their maximum; bad input is refused with nothing left behind.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use trainer::export::{self, ExportRequest, PeftExperts, Target};
use trainer::model::{self, hub::Fetch, tensors::base_tensors, Registry};
use trainer::recipe::{self, DType};
use trainer::run::checkpoint as ckpt;
use trainer::train::run::{run, RunOutcome, RunRequest};

const TINY: &str = "recipes/tiny-qwen3-moe-lora.toml";

/// Dropout draws from the backend's one seeded generator per process: one run at a time.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn train(out: &Path, extra: &[String]) -> RunOutcome {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut set = vec![
        format!("checkpoint.output_dir={}", out.display()),
        "logging.progress_bar=false".to_string(),
        "train.max_steps=8".to_string(),
        "checkpoint.save_interval=4".to_string(),
        "train.eval_interval=8".to_string(),
    ];
    set.extend(extra.iter().cloned());
    let loaded = recipe::load(Path::new(TINY), &set).unwrap();
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::All).unwrap();
    run(RunRequest { loaded: &loaded, plan: &plan, resume: None, stop_after: None }).unwrap()
}

fn request(run: &Path, to: Target, out: PathBuf) -> ExportRequest {
    ExportRequest {
        run: run.to_path_buf(),
        to,
        out,
        dtype: None,
        max_shard_bytes: 5_000_000_000,
        overwrite: false,
        peft_experts: PeftExperts::Fused,
        test_precision: None,
        device: None,
        precision_logits: None,
    }
}

#[test]
fn merged_hf_export_matches_the_unmerged_adapter_and_shards_as_asked() {
    let root = tempfile::tempdir().unwrap();
    let o = train(&root.path().join("runs"), &[]);
    let out = root.path().join("hf");
    let mut req = request(&o.run_dir, Target::Hf, out.clone());
    req.dtype = Some(DType::F32);
    req.max_shard_bytes = 100_000;
    req.test_precision = Some(0.1);
    let report = export::export(&req, &Registry::builtin()).unwrap();
    assert_eq!(report.checkpoint, o.last_checkpoint, "the latest checkpoint of the run");
    assert_eq!(report.merged, 2 * (4 + 8 * 3), "every adapter merged");
    let p = report.precision.unwrap();
    // Same maths in f32, merged or not: only summation order differs.
    assert!(p.passed() && p.label_max < 1e-4 && p.max < 1e-4, "{p}");
    assert_eq!((p.argmax_agree, p.label_argmax_agree), (p.tokens, p.label_positions), "{p}");
    assert!(p.label_positions > 10 && p.label_positions < p.tokens);

    // The index lists every tensor exactly once, in the file that holds it; shards stay under
    // the maximum unless a single tensor is larger.
    let index: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(report.files.len() > 1, "{:?}", report.files);
    let mut listed = Vec::new();
    for f in &report.files {
        let bytes = fs::read(out.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(data <= 100_000 || st.len() == 1, "{f}: {data} bytes");
        for (name, view) in st.tensors() {
            assert_eq!(map[&name], serde_json::json!(f));
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            listed.push(name);
        }
    }
    listed.sort();
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "a tensor in two shards");
    assert_eq!(listed.len(), map.len());
    // The names are the architecture's, nothing more, nothing less (tied head: no lm_head).
    let loaded = recipe::load(Path::new(TINY), &[]).unwrap();
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::Config).unwrap();
    let mut want: Vec<String> = base_tensors(&plan.spec).into_iter().map(|t| t.path).collect();
    want.sort();
    assert_eq!(listed, want);
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["torch_dtype"].as_str(), cfg["architectures"][0].as_str()), (Some("float32"), Some("Qwen3MoeForCausalLM")));
    // No partial folder is left next to the output.
    let leftovers: Vec<_> = fs::read_dir(root.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".partial-")).collect();
    assert!(leftovers.is_empty());

    // The default dtype is the recipe's (bf16): still within the precision threshold.
    let mut bf16 = request(&o.last_checkpoint, Target::Hf, root.path().join("hf-bf16"));
    bf16.test_precision = Some(0.1);
    let report = export::export(&bf16, &Registry::builtin()).unwrap();
    assert_eq!(report.files, vec!["model.safetensors"]);
    let p = report.precision.unwrap();
    assert!(p.passed() && p.label_mean > 1e-5, "bf16 rounding shows, within the threshold: {p}");
    // A threshold the bf16 export cannot meet fails the check (the CLI exits non-zero on it).
    let mut strict = request(&o.last_checkpoint, Target::Native, root.path().join("native-bf16"));
    strict.dtype = Some(DType::Bf16);
    strict.test_precision = Some(1e-7);
    assert!(!export::export(&strict, &Registry::builtin()).unwrap().precision.unwrap().passed());
}

#[test]
fn peft_export_layouts_and_an_earlier_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let o = train(&root.path().join("runs"), &[]);
    let first = o.run_dir.join("checkpoint-4");
    // Per expert: the checkpoint's adapter as it is.
    let mut req = request(&first, Target::Peft, root.path().join("per-expert"));
    req.peft_experts = PeftExperts::PerExpert;
    export::export(&req, &Registry::builtin()).unwrap();
    let trained = ckpt::read_safetensors(&first.join(ckpt::ADAPTER_WEIGHTS)).unwrap();
    assert_eq!(ckpt::read_safetensors(&root.path().join("per-expert").join(ckpt::ADAPTER_WEIGHTS)).unwrap(), trained);
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(root.path().join("per-expert/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(32.0)));
    // Fused experts (transformers >= 5): two 3-D wrappers per layer, rank doubled, scale kept.
    export::export(&request(&first, Target::Peft, root.path().join("fused")), &Registry::builtin()).unwrap();
    let fused = ckpt::read_safetensors(&root.path().join("fused").join(ckpt::ADAPTER_WEIGHTS)).unwrap();
    let (shape, _) = &fused["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"];
    assert_eq!(shape, &[16 * 8, 64], "gate_up: [2r * experts, hidden]");
    let (shape, _) = &fused["base_model.model.model.layers.1.mlp.experts.lora_B.weight"];
    assert_eq!(shape, &[64, 16 * 8], "down: [hidden, 2r * experts]");
    assert!(!fused.keys().any(|k| k.contains("experts.0.")));
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(root.path().join("fused/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64(), cfg["lora_dropout"].as_f64()), (Some(16), Some(64.0), Some(0.0)));
    assert_eq!(cfg["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]));
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::builtin();
    let err = |req: &ExportRequest| export::export(req, &reg).unwrap_err().to_string();

    // A run folder without a complete checkpoint.
    let empty = root.path().join("empty-run");
    fs::create_dir_all(empty.join("checkpoint-4.tmp")).unwrap();
    let e = err(&request(&empty, Target::Hf, root.path().join("x")));
    assert!(e.contains("no complete checkpoint-N"), "{e}");

    // A pretrained base: the tiny model exported, then trained on. Its run records the
    // fingerprints of the base weights.
    let o = train(&root.path().join("runs0"), &[]);
    let base = root.path().join("base");
    let mut req = request(&o.run_dir, Target::Native, base.clone());
    req.dtype = Some(DType::F32);
    export::export(&req, &reg).unwrap();
    let tokenizer = root.path().join("tokenizer.json");
    fs::copy("assets/tiny/tokenizer.json", &tokenizer).unwrap();
    let o = train(
        &root.path().join("runs"),
        &[
            format!("model.path=\"{}\"", base.display()),
            "model.init=\"pretrained\"".into(),
            format!("model.tokenizer=\"{}\"", tokenizer.display()),
            "model.dtype=\"f32\"".into(),
        ],
    );
    assert!(o.run_dir.join(trainer::run::BASE_WEIGHTS).is_file() && o.last_checkpoint.join(trainer::run::BASE_WEIGHTS).is_file());
    export::export(&request(&o.run_dir, Target::Hf, root.path().join("ok")), &reg).unwrap();

    // An adapter tensor for a layer the base does not have.
    let bad_ckpt = root.path().join("bad-ckpt");
    fs::create_dir(&bad_ckpt).unwrap();
    for f in fs::read_dir(&o.last_checkpoint).unwrap().flatten() {
        fs::copy(f.path(), bad_ckpt.join(f.file_name())).unwrap();
    }
    let mut tensors = ckpt::read_safetensors(&bad_ckpt.join(ckpt::ADAPTER_WEIGHTS)).unwrap();
    let a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone();
    let b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].clone();
    tensors.insert("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight".into(), a);
    tensors.insert("base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight".into(), b);
    let named: Vec<ckpt::NamedTensor> = tensors
        .into_iter()
        .map(|(name, (shape, data))| ckpt::NamedTensor { name, data: burn::tensor::TensorData::new(data, shape) })
        .collect();
    ckpt::write_safetensors(&bad_ckpt.join(ckpt::ADAPTER_WEIGHTS), &named, Default::default()).unwrap();
    let e = err(&request(&bad_ckpt, Target::Peft, root.path().join("x")));
    assert!(e.contains("targets `model.layers.5.self_attn.q_proj`") && e.contains("does not have"), "{e}");

    // An unwritable output location (its parent is a file).
    let file = root.path().join("a-file");
    fs::write(&file, b"").unwrap();
    let e = err(&request(&o.run_dir, Target::Hf, file.join("out")));
    assert!(e.contains("cannot create"), "{e}");

    // A failure half-way (the tokenizer the run used is gone when the shards are written):
    // neither the output nor a partial folder remains.
    fs::remove_file(&tokenizer).unwrap();
    let e = err(&request(&o.run_dir, Target::Hf, root.path().join("half")));
    assert!(e.contains("tokenizer"), "{e}");
    assert!(!root.path().join("half").exists());
    assert!(!fs::read_dir(root.path()).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains(".partial-")));
    fs::copy("assets/tiny/tokenizer.json", &tokenizer).unwrap();

    // Base weights changed since training: one value of one tensor.
    let weights = base.join("model.safetensors");
    let mut t = ckpt::read_safetensors(&weights).unwrap();
    t.get_mut("model.norm.weight").unwrap().1[3] += 0.5;
    let named: Vec<ckpt::NamedTensor> =
        t.into_iter().map(|(name, (shape, data))| ckpt::NamedTensor { name, data: burn::tensor::TensorData::new(data, shape) }).collect();
    ckpt::write_safetensors(&weights, &named, Default::default()).unwrap();
    let e = err(&request(&o.run_dir, Target::Hf, root.path().join("y")));
    assert!(e.contains("changed since training") && e.contains("model.norm.weight"), "{e}");
    assert!(!root.path().join("y").exists());

    // Full tuning has no adapter to export as peft.
    let full = train(&root.path().join("runs-full"), &["train.tuning=\"full\"".into()]);
    let e = err(&request(&full.run_dir, Target::Peft, root.path().join("z")));
    assert!(e.contains("no adapter"), "{e}");
    let mut req = request(&full.run_dir, Target::Hf, root.path().join("full-hf"));
    req.dtype = Some(DType::F32);
    req.test_precision = Some(0.1);
    let p = export::export(&req, &reg).unwrap().precision.unwrap();
    assert!(p.max < 1e-4, "full tuning exports its trained weights: {p}");
}
