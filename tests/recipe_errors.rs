//! Recipes through the library API: strict loading, `extends`, `--set`, and every error naming
//! the file and line (or override) of the value at fault and what would be valid.

use std::path::{Path, PathBuf};

use trainer::recipe::{self, DatasetSpec, Device, Init, LoadedRecipe, RecomputeGranularity, Stop, Tuning};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A temporary folder of recipes.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn strings(set: &[&str]) -> Vec<String> {
    set.iter().map(|s| s.to_string()).collect()
}

/// The smallest valid recipe.
const MIN: &str = "[model]\npath = \"m\"\n";

fn load(text: &str, set: &[&str]) -> Result<LoadedRecipe, String> {
    let d = Dir::new();
    let p = d.write("r.toml", text);
    recipe::load(&p, &strings(set)).map_err(|e| e.to_string())
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
    let dense = recipe::load(&repo("recipes/qwen2.5-7b-lora.toml"), &[]).unwrap();
    let r = &dense.recipe;
    assert_eq!(r.model.path.as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
    assert_eq!((r.parallel.tensor, r.parallel.sequence_parallel, r.parallel.world_size()), (2, true, 2));
    assert_eq!((r.lora.rank, r.lora.alpha, r.lora.scale()), (8, 32.0, 4.0));
    assert_eq!(r.lora.targets, ["all-linear"]);
    assert_eq!((r.train.micro_batch_size, r.train.global_batch_size), (16, Some(16)));
    assert_eq!(r.train.recompute.granularity, RecomputeGranularity::Full);
    assert_eq!((r.optimizer.lr, r.optimizer.min_lr, r.schedule.warmup_fraction), (1e-4, 1e-5, Some(0.05)));
    assert_eq!(r.train.stop(), Stop::Epochs(1));
    let specs = r.data.specs().unwrap();
    assert_eq!(specs.len(), 3);
    assert_eq!(specs[2], DatasetSpec { source: "swift/self-cognition".into(), sample: Some(500) });
    assert_eq!((r.data.num_workers, r.data.num_proc), (4, 4));
    assert_eq!(r.data.system.as_deref(), Some("You are a helpful assistant."));
    assert!(!r.checkpoint.save_optimizer && !r.checkpoint.save_rng);
    assert_eq!(r.checkpoint.save_interval, Some(100));
    assert_eq!(r.model.model_author, ["swift", "swift"]);

    let moe = recipe::load(&repo("recipes/qwen3-moe-lora.toml"), &[]).unwrap();
    let m = &moe.recipe;
    assert_eq!(m.model.path.as_deref(), Some("Qwen/Qwen3-30B-A3B"));
    let p = &m.parallel;
    assert_eq!((p.data, p.tensor, p.expert, p.sequence_parallel, p.world_size()), (4, 2, 4, true, 8));
    assert_eq!((m.lora.rank, m.lora.alpha), (8, 32.0));
    assert_eq!(m.train.recompute.granularity, RecomputeGranularity::Full);
    // The shared data mix and schedule come from the base recipe through `extends`.
    assert_eq!(m.data.datasets, r.data.datasets);
    assert_eq!(m.optimizer, r.optimizer);
    assert_eq!(moe.files.len(), dense.files.len() + 1);
    assert_eq!(moe.files.last(), Some(&repo("recipes/qwen3-moe-lora.toml")));

    let tiny = recipe::load(&repo("recipes/tiny-qwen3-moe-lora.toml"), &[]).unwrap().recipe;
    assert_eq!((tiny.device, tiny.model.init), (Device::Cpu, Init::Random));
}

#[test]
fn resolved_recipe_round_trips() {
    for name in ["recipes/qwen2.5-7b-lora.toml", "recipes/qwen3-moe-lora.toml", "recipes/tiny-qwen3-moe-lora.toml"] {
        let loaded = recipe::load(&repo(name), &strings(&["optimizer.lr=3e-4", "train.max_steps=7"])).unwrap();
        let text = loaded.to_toml();
        assert!(!text.contains("extends"), "{text}");
        assert!(text.contains("global_batch_size") && text.contains("weight_decay = 0.1"), "{text}");
        let again = load(&text, &[]).unwrap();
        assert_eq!(again.recipe, loaded.recipe, "{name}:\n{text}");
        assert_eq!(again.to_toml(), text);
    }
    // Inline config.json fields, nested tables included, survive too.
    let with_config = "[model]\ninit = \"random\"\n[model.config]\nmodel_type = \"qwen2\"\nhidden_size = 64\n\
                       rope_scaling = { type = \"linear\", factor = 2.0 }\n";
    let loaded = load(with_config, &[]).unwrap();
    assert_eq!(load(&loaded.to_toml(), &[]).unwrap().recipe, loaded.recipe);
}

#[test]
fn defaults_fill_in_and_global_batch_follows_micro_times_data() {
    let r = load(&format!("{MIN}[train]\nmicro_batch_size = 3\n[parallel]\ndata = 2\n"), &[]).unwrap().recipe;
    assert_eq!(r.train.global_batch_size, Some(6));
    assert_eq!(r.gradient_accumulation_steps(), 1);
    assert_eq!(r.train.tuning, Tuning::Lora);
    assert_eq!(r.lora.targets, ["all-linear"]);
    assert_eq!((r.optimizer.lr, r.optimizer.beta2, r.train.max_length), (1e-4, 0.95, 2048));
    assert_eq!((r.checkpoint.output_dir.as_str(), r.logging.metrics_file.as_str()), ("runs", "metrics.jsonl"));
}

#[test]
fn extends_merges_tables_and_replaces_arrays() {
    let d = Dir::new();
    d.write(
        "base/root.toml",
        "[model]\npath = \"m\"\n[optimizer]\nlr = 1e-3\nbeta1 = 0.8\neps = 1e-6\n[data]\ndatasets = [\"a\", \"b\"]\n",
    );
    d.write("base/mid.toml", "extends = \"root.toml\"\n[optimizer]\nbeta1 = 0.7\n");
    let child = d.write("child.toml", "extends = \"base/mid.toml\"\n[optimizer]\nlr = 2e-3\n[data]\ndatasets = [\"c#5\"]\n");
    let loaded = recipe::load(&child, &[]).unwrap();
    let r = &loaded.recipe;
    assert_eq!((r.optimizer.lr, r.optimizer.beta1, r.optimizer.eps), (2e-3, 0.7, 1e-6));
    assert_eq!(r.data.datasets, ["c#5"]);
    assert_eq!(r.extends, None);
    let names: Vec<_> = loaded.files.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
    assert_eq!(names, ["root.toml", "mid.toml", "child.toml"]);
}

#[test]
fn extends_cycle_is_an_error_naming_the_files() {
    let d = Dir::new();
    d.write("a.toml", "# a\n\nextends = \"b.toml\"\n[model]\npath = \"m\"\n");
    let b = d.write("b.toml", "extends = \"a.toml\"\n");
    let e = recipe::load(&b, &[]).unwrap_err().to_string();
    assert_mentions(&e, &["a.toml:3:1: key `extends`", "cycle", "b.toml -> ", "a.toml -> ", "b.toml;"]);
    let own = d.write("self.toml", "extends = \"self.toml\"\n");
    assert_mentions(&recipe::load(&own, &[]).unwrap_err().to_string(), &["self.toml:1:1", "cycle"]);
}

#[test]
fn extends_errors_name_the_extends_line() {
    let e = err("\n\nextends = \"nope.toml\"\n", &[]);
    assert_mentions(&e, &["r.toml:3:1: key `extends`", "nope.toml", "cannot read the base recipe"]);
    let e = err("extends = 3\n", &[]);
    assert_mentions(&e, &["r.toml:1:1: key `extends`", "expected a string"]);
}

#[test]
fn errors_in_a_base_file_name_the_base_file_and_line() {
    let d = Dir::new();
    d.write("base.toml", "[model]\npath = \"m\"\n[optimizer]\n\nlr = -1.0\n[train]\nmicro_batch_size = \"x\"\n");
    let child = d.write("child.toml", "extends = \"base.toml\"\n[train]\nseed = 1\n");
    let e = recipe::load(&child, &[]).unwrap_err().to_string();
    assert_mentions(&e, &["base.toml:7:1: key `train.micro_batch_size`", "expected a whole number"]);
    let e = recipe::load(&child, &strings(&["train.micro_batch_size=2"])).unwrap_err().to_string();
    assert_mentions(&e, &["base.toml:5:1: key `optimizer.lr`", "expected > 0"]);
    // The child overrides the value: the child is blamed; malformed bases name themselves.
    let child = d.write("child2.toml", "extends = \"base.toml\"\n[train]\nmicro_batch_size = 2\n[optimizer]\nlr = 0\n");
    assert_mentions(&recipe::load(&child, &[]).unwrap_err().to_string(), &["child2.toml:5:1: key `optimizer.lr`"]);
    d.write("broken.toml", "[model\n");
    let child = d.write("child3.toml", "extends = \"broken.toml\"\n");
    assert_mentions(&recipe::load(&child, &[]).unwrap_err().to_string(), &["broken.toml:1:7"]);
    // An array replaced by the child: its elements are the child's.
    d.write("list.toml", "[model]\npath = \"m\"\n[data]\ndatasets = [\"a\", \"b\", \"c\"]\n");
    let child = d.write("child4.toml", "extends = \"list.toml\"\n[data]\ndatasets = [\"x\", \"y#0\"]\n");
    let e = recipe::load(&child, &[]).unwrap_err().to_string();
    assert_mentions(&e, &["child4.toml:3:18: key `data.datasets[1]`", "`#0`"]);
}

#[test]
fn set_overrides_with_the_same_validation() {
    let r = load(MIN, &["optimizer.lr=2e-4", "data.datasets=[\"x#3\", \"y\"]", "data.system=Be brief.", "parallel.tensor=2"])
        .unwrap()
        .recipe;
    assert_eq!(r.optimizer.lr, 2e-4);
    assert_eq!(r.data.datasets, ["x#3", "y"]);
    assert_eq!(r.data.system.as_deref(), Some("Be brief."));
    assert_eq!(r.parallel.tensor, 2);
    // Later overrides win, and override file values.
    let r = load(&format!("{MIN}[optimizer]\nlr = 1e-3\n"), &["optimizer.lr=5e-4", "optimizer.lr=6e-4"]).unwrap().recipe;
    assert_eq!(r.optimizer.lr, 6e-4);
    // Free-form config.json fields, nested tables created on the way.
    let r = load(MIN, &["model.config.rope_scaling.factor=2.0"]).unwrap().recipe;
    assert_eq!(r.model.config.unwrap()["rope_scaling"]["factor"].as_float(), Some(2.0));

    assert_mentions(&err(MIN, &["optimizer.lr=abc"]), &["--set optimizer.lr=abc: key `optimizer.lr`", "invalid type", "expected a number"]);
    assert_mentions(&err(MIN, &["optimizer.lr=-3"]), &["--set optimizer.lr=-3: key `optimizer.lr`", "expected > 0"]);
    assert_mentions(&err(MIN, &["optimizer.lrr=1"]), &["--set optimizer.lrr=1: unknown key `optimizer.lrr`", "did you mean `lr`"]);
    assert_mentions(&err(MIN, &["train.lr=1"]), &["--set train.lr=1", "`lr` belongs in [optimizer]"]);
    assert_mentions(&err(MIN, &["optimizer.lr"]), &["--set optimizer.lr: expected KEY=VALUE"]);
    assert_mentions(&err(MIN, &["optimizer..lr=1"]), &["not a key path"]);
    assert_mentions(&err(MIN, &["=1"]), &["not a key path"]);
    let lr = format!("{MIN}[optimizer]\nlr = 1e-4\n");
    assert_mentions(&err(&lr, &["optimizer.lr.x=1"]), &["--set optimizer.lr.x=1: `optimizer.lr` is a float, not a table"]);
    assert_mentions(&err(MIN, &["optimizer.lr.x=1"]), &["--set optimizer.lr.x=1: key `optimizer.lr`: invalid type: map"]);
    // A misplaced `extends` is an unknown key that says where it belongs.
    assert_mentions(&err(&format!("{MIN}extends = \"b.toml\"\n"), &[]), &["r.toml:3:1", "`extends` belongs in the top level"]);
    assert_mentions(&err(MIN, &["extends=other.toml"]), &["only be written in a recipe file"]);
    assert_mentions(&err(MIN, &["parallel.sequence_parallel=true"]), &["--set parallel.sequence_parallel=true", "parallel.tensor > 1"]);
}

#[test]
fn unknown_keys_get_position_and_suggestion() {
    let e = err(&format!("{MIN}[optimizer]\nlr = 1e-4\nweight_decy = 0.1\n"), &[]);
    assert_mentions(&e, &[
        "r.toml:5:1: unknown key `optimizer.weight_decy` in [optimizer]",
        "did you mean `weight_decay`?",
        "(valid keys: name, lr, min_lr, weight_decay, beta1, beta2, eps)",
    ]);
    let e = err(&format!("{MIN}[train]\nlr = 1e-4\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: unknown key `train.lr` in [train]", "`lr` belongs in [optimizer]"]);
    let e = err(&format!("{MIN}[train]\n\nlrr = 1e-4\n"), &[]);
    assert_mentions(&e, &["r.toml:5:1: unknown key `train.lrr`", "did you mean `optimizer.lr`?"]);
    let e = err("[modle]\npath = \"m\"\n", &[]);
    assert_mentions(&e, &["r.toml:1:2: unknown key `modle` at the top level", "did you mean `model`?"]);
    let e = err(&format!("{MIN}[train.recompute]\ngranularty = \"full\"\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1", "`train.recompute.granularty`", "did you mean `granularity`?", "valid keys: granularity, method, num_layers"]);
    let e = err(&format!("{MIN}[data]\nzzzzzz = 1\n"), &[]);
    assert!(!e.contains("did you mean"), "{e}");
    // Inline config.json fields are not the recipe's to check.
    assert!(load(&format!("{MIN}[model.config]\nanything_at_all = 1\n"), &[]).is_ok());
}

#[test]
fn wrong_types_and_ranges_name_key_and_line() {
    let e = err(&format!("{MIN}[train]\nmicro_batch_size = \"four\"\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: key `train.micro_batch_size`: invalid type: string \"four\"; expected a whole number, 1 or more"]);
    let e = err(&format!("{MIN}[train]\nmax_steps = -5\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: key `train.max_steps`", "-5"]);
    let e = err(&format!("{MIN}[lora]\ndropout = 1.5\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: key `lora.dropout`: is 1.5; expected in [0, 1)"]);
    let e = err(&format!("{MIN}[train]\nmax_length = 8\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: key `train.max_length`", "16 or more"]);
    let e = err("device = \"gpu\"\n[model]\npath = \"m\"\n", &[]);
    assert_mentions(&e, &["r.toml:1:1: key `device`: unknown value `gpu`; expected one of `auto`, `cpu`, `cuda`"]);
    let e = err(&format!("{MIN}[optimizer]\nlr = 1e-4\nmin_lr = 1e-3\n"), &[]);
    assert_mentions(&e, &["r.toml:5:1: key `optimizer.min_lr`", "expected in [0, optimizer.lr = 0.0001]"]);
    let e = err(&format!("{MIN}[optimizer]\nlr = inf\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: key `optimizer.lr`", "finite"]);
    let e = err(&format!("{MIN}[lora]\nrank = 0\n"), &[]);
    assert_mentions(&e, &["key `lora.rank`: is 0; expected 1 to 65536"]);
    let e = err(&format!("{MIN}[lora]\ntargets = [\"q_proj\",\n  \"re:(\"]\n"), &[]);
    assert_mentions(&e, &["r.toml:5:3: key `lora.targets[1]`", "not a valid regex"]);
    let e = err(&format!("{MIN}[data]\nval_split = 1\n"), &[]);
    assert_mentions(&e, &["key `data.val_split`", "[0, 1)"]);
    let e = err(&format!("{MIN}[schedule]\nwarmup_fraction = 2.0\n"), &[]);
    assert_mentions(&e, &["key `schedule.warmup_fraction`", "[0, 1]"]);
    let e = err(&format!("{MIN}[parallel]\ncontext = 0\n"), &[]);
    assert_mentions(&e, &["r.toml:4:1: key `parallel.context`: is 0; expected 1 or more"]);
    let e = err(&format!("{MIN}[data]\ndatasets = \"a\"\n"), &[]);
    assert_mentions(&e, &["key `data.datasets`", "expected an array"]);
    let e = err("train = 3\n[model]\npath = \"m\"\n", &[]);
    assert_mentions(&e, &["r.toml:1:1: key `train`", "expected a table"]);
}

#[test]
fn cross_field_rules() {
    let e = err(&format!("{MIN}[train]\nmicro_batch_size = 4\nglobal_batch_size = 10\n[parallel]\ndata = 2\n"), &[]);
    assert_mentions(&e, &["r.toml:5:1: key `train.global_batch_size`", "multiple of", "4 x 2 = 8"]);
    assert!(load(&format!("{MIN}[train]\nmicro_batch_size = 4\nglobal_batch_size = 16\n[parallel]\ndata = 2\n"), &[]).is_ok());
    let e = err(&format!("{MIN}[parallel]\ndata = 2\nexpert = 4\n"), &[]);
    assert_mentions(&e, &["key `parallel.expert`", "divisor of 2"]);
    assert!(load(&format!("{MIN}[parallel]\ndata = 2\ncontext = 2\nexpert = 4\n"), &[]).is_ok());
    let e = err(&format!("{MIN}[parallel]\nsequence_parallel = true\n"), &[]);
    assert_mentions(&e, &["key `parallel.sequence_parallel`", "parallel.tensor > 1"]);
    let e = err(&format!("{MIN}[parallel]\npipeline = 2\n"), &[]);
    assert_mentions(&e, &["key `parallel.pipeline`", "not supported yet", "expected 1"]);
    let e = err(&format!("{MIN}[schedule]\nwarmup_fraction = 0.1\nwarmup_steps = 5\n"), &[]);
    assert_mentions(&e, &["key `schedule.warmup_steps`", "schedule.warmup_fraction", "not both"]);
    let e = err(&format!("{MIN}[train]\neval_interval = 10\n"), &[]);
    assert_mentions(&e, &["key `train.eval_interval`", "data.val_split"]);
    let e = err("[model]\ninit = \"pretrained\"\n", &[]);
    assert_mentions(&e, &["r.toml:1:2: key `model.path`: is missing"]);
    let e = err("[model]\ninit = \"random\"\n", &[]);
    assert_mentions(&e, &["key `model.config`", "needs an architecture"]);
    assert!(load("[model]\ninit = \"random\"\n[model.config]\nmodel_type = \"qwen2\"\n", &[]).is_ok());
    // Not errors: max_steps wins over max_epochs; [lora] is ignored with full tuning.
    let r = load(&format!("{MIN}[train]\nmax_epochs = 3\nmax_steps = 20\n"), &[]).unwrap().recipe;
    assert_eq!(r.train.stop(), Stop::Steps(20));
    assert!(load(&format!("{MIN}[train]\ntuning = \"full\"\n[lora]\nrank = 0\n"), &[]).is_ok());
}

#[test]
fn malformed_toml_and_missing_files() {
    let e = err("[model\npath = 1\n", &[]);
    assert_mentions(&e, &["r.toml:1:7: "]);
    assert!(!e.contains('\n'), "{e}");
    let e = err("[model]\npath = \"m\"\npath = \"n\"\n", &[]);
    assert_mentions(&e, &["r.toml:3:1: ", "duplicate key"]);
    let e = recipe::load(Path::new("/no/such/recipe.toml"), &[]).unwrap_err().to_string();
    assert_mentions(&e, &["/no/such/recipe.toml: cannot read the recipe", "No such file"]);
    let d = Dir::new();
    let e = recipe::load(d.0.path(), &[]).unwrap_err().to_string();
    assert_mentions(&e, &["cannot read the recipe"]);
}

#[test]
fn dataset_specs() {
    assert_eq!(DatasetSpec::parse("a#500").unwrap(), DatasetSpec { source: "a".into(), sample: Some(500) });
    assert_eq!(DatasetSpec::parse("a").unwrap(), DatasetSpec { source: "a".into(), sample: None });
    assert_eq!(DatasetSpec::parse("data/train.jsonl").unwrap().sample, None);
    assert!(DatasetSpec::parse("a#0").unwrap_err().contains("#0"));
    assert!(DatasetSpec::parse("a#x").unwrap_err().contains("not a row count"));
    assert!(DatasetSpec::parse("#5").is_err());
    let e = err(&format!("{MIN}[data]\ndatasets = [\"ok#1\", \"bad#x\"]\n"), &[]);
    assert_mentions(&e, &["r.toml:4:21: key `data.datasets[1]`", "bad#x"]);
    let e = err(MIN, &["data.datasets=[\"#4\"]"]);
    assert_mentions(&e, &["--set data.datasets=[\"#4\"]: key `data.datasets[0]`", "no dataset name"]);
}

#[test]
fn validate_checks_recipes_built_in_code() {
    let mut r = recipe::Recipe::default();
    assert!(recipe::validate(r.clone()).unwrap_err().to_string().starts_with("key `model.path`"));
    r.model.path = Some("m".into());
    r.train.micro_batch_size = 2;
    assert_eq!(recipe::validate(r).unwrap().train.global_batch_size, Some(2));
}
