//! Recipes: strict loading, `extends`, `--set`, and every error naming the file and line (or
//! override) of the key at fault and what would be valid.

use std::path::{Path, PathBuf};

use trainer::recipe::{self, DatasetSpec, Device, Init, LoadedRecipe, Tuning};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

const MIN: &str = "[model]\npath = \"m\"\n";

fn load(text: &str, set: &[&str]) -> Result<LoadedRecipe, String> {
    let d = Dir::new();
    let p = d.write("r.toml", text);
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    recipe::load(&p, &set).map_err(|e| e.to_string())
}

fn err(text: &str, set: &[&str]) -> String {
    match load(text, set) {
        Ok(_) => panic!("expected an error for:\n{text}\n{set:?}"),
        Err(e) => e,
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected `{p}` in: {msg}");
    }
}

#[test]
fn seed_recipes_load() {
    let dense = recipe::load(&repo("recipes/qwen2.5-7b-lora.toml"), &[]).unwrap().recipe;
    assert_eq!((dense.parallel.tensor, dense.parallel.sequence_parallel), (2, true));
    assert_eq!((dense.lora.rank, dense.lora.alpha, dense.lora.scale()), (8, 32.0, 4.0));
    assert_eq!(dense.train.micro_batch_size, 16);
    assert_eq!(dense.data.datasets.len(), 3);
    assert!(!dense.checkpoint.save_optimizer && !dense.checkpoint.save_rng);
    let moe = recipe::load(&repo("recipes/qwen3-moe-lora.toml"), &[]).unwrap();
    assert_eq!(moe.recipe.model.path.as_deref(), Some("Qwen/Qwen3-30B-A3B"));
    assert_eq!((moe.recipe.parallel.expert, moe.recipe.parallel.world_size()), (4, 8));
    // Inherited from the dense recipe through `extends`.
    assert_eq!(moe.recipe.optimizer.min_lr, 1e-5);
    assert_eq!(moe.files.len(), 2);
    let tiny = recipe::load(&repo("recipes/tiny-qwen3-moe-lora.toml"), &[]).unwrap().recipe;
    assert_eq!((tiny.device, tiny.model.init), (Device::Cpu, Init::Random));
}

#[test]
fn resolved_recipe_round_trips() {
    let loaded = recipe::load(&repo("recipes/qwen3-moe-lora.toml"), &["optimizer.lr=3e-4".into()]).unwrap();
    let text = loaded.to_toml();
    assert!(!text.contains("extends"));
    let again = load(&text, &[]).unwrap();
    assert_eq!(again.recipe, loaded.recipe);
    assert_eq!(again.recipe.train.global_batch_size, Some(16));
}

#[test]
fn defaults_fill_in_and_global_batch_follows_micro_times_data() {
    let r = load(&format!("{MIN}[train]\nmicro_batch_size = 3\n[parallel]\ndata = 2\n"), &[]).unwrap().recipe;
    assert_eq!(r.train.global_batch_size, Some(6));
    assert_eq!(r.train.tuning, Tuning::Lora);
    assert_eq!(r.lora.targets, vec!["all-linear".to_string()]);
}

#[test]
fn extends_merges_tables_and_replaces_arrays() {
    let d = Dir::new();
    d.write("base.toml", "[model]\npath = \"m\"\n[optimizer]\nlr = 1e-3\nbeta1 = 0.8\n[data]\ndatasets = [\"a\", \"b\"]\n");
    let child = d.write("child.toml", "extends = \"base.toml\"\n[optimizer]\nlr = 2e-3\n[data]\ndatasets = [\"c#5\"]\n");
    let r = recipe::load(&child, &[]).unwrap().recipe;
    assert_eq!((r.optimizer.lr, r.optimizer.beta1), (2e-3, 0.8));
    assert_eq!(r.data.datasets, vec!["c#5".to_string()]);
}

#[test]
fn extends_cycle_is_an_error_naming_the_files() {
    let d = Dir::new();
    d.write("a.toml", "extends = \"b.toml\"\n");
    let b = d.write("b.toml", "extends = \"a.toml\"\n");
    let e = recipe::load(&b, &[]).unwrap_err().to_string();
    assert_mentions(&e, &["cycle", "a.toml", "b.toml"]);
}

#[test]
fn missing_base_names_the_extends_line() {
    let e = err("\n\nextends = \"nope.toml\"\n", &[]);
    assert_mentions(&e, &["r.toml:3:1", "nope.toml", "cannot read"]);
}

#[test]
fn error_in_a_base_file_names_the_base_file_and_line() {
    let d = Dir::new();
    d.write("base.toml", "[model]\npath = \"m\"\n[optimizer]\n\nlr = -1.0\n");
    let child = d.write("child.toml", "extends = \"base.toml\"\n[train]\nseed = 1\n");
    let e = recipe::load(&child, &[]).unwrap_err().to_string();
    assert_mentions(&e, &["base.toml:5:1", "optimizer.lr", "expected > 0"]);
}

#[test]
fn set_overrides_with_the_same_validation() {
    let r = load(MIN, &["optimizer.lr=2e-4", "data.datasets=[\"x#3\", \"y\"]", "data.system=Be brief."]).unwrap().recipe;
    assert_eq!(r.optimizer.lr, 2e-4);
    assert_eq!(r.data.datasets.len(), 2);
    assert_eq!(r.data.system.as_deref(), Some("Be brief."));
    assert_mentions(&err(MIN, &["optimizer.lr=abc"]), &["--set optimizer.lr=abc", "invalid type", "f64"]);
    assert_mentions(&err(MIN, &["optimizer.lr=-3"]), &["--set optimizer.lr=-3", "expected > 0"]);
    assert_mentions(&err(MIN, &["optimizer.lrr=1"]), &["--set optimizer.lrr=1", "did you mean `lr`"]);
    assert_mentions(&err(MIN, &["optimizer.lr"]), &["expected KEY=VALUE"]);
    assert_mentions(&err(MIN, &["optimizer..lr=1"]), &["not a key path"]);
}

#[test]
fn unknown_keys_get_position_and_suggestion() {
    let e = err(&format!("{MIN}[optimizer]\nlr = 1e-4\nweight_decy = 0.1\n"), &[]);
    assert_mentions(&e, &["r.toml:5:1", "unknown key `optimizer.weight_decy`", "did you mean `weight_decay`", "valid keys:"]);
    let e = err(&format!("{MIN}[train]\nlr = 1e-4\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1", "`lr` belongs in [optimizer]"]);
    let e = err("[modle]\npath = \"m\"\n", &[]);
    assert_mentions(&e, &["r.toml:1:2", "did you mean `model`"]);
}

#[test]
fn wrong_types_and_ranges_name_key_and_line() {
    let e = err(&format!("{MIN}[train]\nmicro_batch_size = \"four\"\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1", "train.micro_batch_size", "expected usize"]);
    let e = err(&format!("{MIN}[lora]\ndropout = 1.5\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1", "lora.dropout", "[0, 1)"]);
    let e = err(&format!("{MIN}[train]\nmax_length = 8\n"), &[]);
    assert_mentions(&e, &["train.max_length", "16 or more"]);
    let e = err("device = \"gpu\"\n[model]\npath = \"m\"\n", &[]);
    assert_mentions(&e, &["r.toml:1:1", "unknown variant `gpu`", "`cuda`"]);
    let e = err(&format!("{MIN}[optimizer]\nlr = 1e-4\nmin_lr = 1e-3\n"), &[]);
    assert_mentions(&e, &["optimizer.min_lr", "[0, optimizer.lr"]);
}

#[test]
fn cross_field_rules() {
    let e = err(&format!("{MIN}[train]\nmicro_batch_size = 4\nglobal_batch_size = 10\n[parallel]\ndata = 2\n"), &[]);
    assert_mentions(&e, &["train.global_batch_size", "multiple of", "4 x 2 = 8"]);
    let e = err(&format!("{MIN}[parallel]\ndata = 2\nexpert = 4\n"), &[]);
    assert_mentions(&e, &["parallel.expert", "must divide 2"]);
    let e = err(&format!("{MIN}[parallel]\nsequence_parallel = true\n"), &[]);
    assert_mentions(&e, &["parallel.sequence_parallel", "parallel.tensor > 1"]);
    let e = err(&format!("{MIN}[parallel]\npipeline = 2\n"), &[]);
    assert_mentions(&e, &["parallel.pipeline", "expected 1"]);
    let e = err(&format!("{MIN}[schedule]\nwarmup_fraction = 0.1\nwarmup_steps = 5\n"), &[]);
    assert_mentions(&e, &["schedule.warmup_steps", "keep one"]);
    let e = err("[model]\ninit = \"pretrained\"\n", &[]);
    assert_mentions(&e, &["model.path", "is missing"]);
    let e = err("[model]\ninit = \"random\"\n", &[]);
    assert_mentions(&e, &["model.config", "needs an architecture"]);
    assert!(load("[model]\ninit = \"random\"\n[model.config]\nmodel_type = \"qwen2\"\n", &[]).is_ok());
}

#[test]
fn malformed_toml_and_missing_files() {
    let e = err("[model\npath = 1\n", &[]);
    assert_mentions(&e, &["r.toml:1:7", "invalid TOML"]);
    let e = recipe::load(Path::new("/no/such/recipe.toml"), &[]).unwrap_err().to_string();
    assert_mentions(&e, &["/no/such/recipe.toml", "cannot read"]);
}

#[test]
fn dataset_specs() {
    assert_eq!(DatasetSpec::parse("a#500").unwrap(), DatasetSpec { source: "a".into(), sample: Some(500) });
    assert_eq!(DatasetSpec::parse("org/a").unwrap().sample, None);
    assert!(DatasetSpec::parse("a#0").unwrap_err().contains("#0"));
    assert!(DatasetSpec::parse("a#x").unwrap_err().contains("not a row count"));
    assert!(DatasetSpec::parse("#5").is_err());
    let e = err(&format!("{MIN}[data]\ndatasets = [\"ok#1\", \"bad#x\"]\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1", "data.datasets[1]", "bad#x"]);
}
