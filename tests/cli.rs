//! The `trainer` binary: what a user sees, exit codes, and no panic on bad input.

use std::io::Write;
use std::process::{Command, Output};

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A bad-input run: exit code 2, one `error:` line naming what is wrong, no panic.
fn assert_user_error(args: &[&str], parts: &[&str]) {
    let o = trainer(args);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for p in parts {
        assert!(err.contains(p), "expected `{p}` in: {err}");
    }
}

#[test]
fn models_lists_the_builtin_families() {
    let o = trainer(&["models"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    for f in ["qwen2", "qwen3", "qwen3_moe"] {
        assert!(out.lines().any(|l| l.starts_with(f)), "{out}");
    }
}

#[test]
fn check_the_dense_seed_recipe_offline() {
    // The seed's datasets are hub ids and tests/data holds configs only: the model side alone.
    let o = trainer(&["check", "recipes/qwen2.5-7b-lora.toml", "--no-data", "--set", "model.path=tests/data/qwen2.5-7b-instruct"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // Qwen2.5-7B has 7.62B parameters; LoRA r=8 on all 7 linears of 28 layers: 20.19M.
    assert!(out.contains("7.62B total"), "{out}");
    assert!(out.contains("20.19M"), "{out}");
    assert!(out.contains("tensor 2"), "{out}");
    // The resolved recipe is printed first, as TOML, with the override applied.
    assert!(out.contains("path = \"tests/data/qwen2.5-7b-instruct\""), "{out}");
}

#[test]
fn check_the_moe_seed_recipe_offline() {
    let o = trainer(&["check", "recipes/qwen3-moe-lora.toml", "--no-data", "--set", "model.path=tests/data/qwen3-30b-a3b"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // Qwen3-30B-A3B: 30.53B parameters, 3.35B active per token, 48 sparse layers.
    assert!(out.contains("30.53B total, 3.35B active"), "{out}");
    assert!(out.contains("48 (48 sparse)"), "{out}");
}

#[test]
fn bad_input_exits_2_with_a_message() {
    assert_user_error(&["check", "no/such/recipe.toml"], &["no/such/recipe.toml"]);
    assert_user_error(
        &["check", "recipes/qwen2.5-7b-lora.toml", "--set", "optimizer.lrr=1"],
        &["lrr", "did you mean"],
    );
    assert_user_error(
        &["check", "recipes/qwen2.5-7b-lora.toml", "--set", "model.path=tests/data/nope"],
        &["tests/data/nope", "model.path"],
    );
    // A hub id with no network says where to put the files.
    assert_user_error(&["check", "recipes/qwen2.5-7b-lora.toml"], &["Qwen/Qwen2.5-7B-Instruct", "model.path"]);
    // 28 heads, 4 KV heads: tensor 8 does not divide the KV heads.
    assert_user_error(
        &["check", "recipes/qwen2.5-7b-lora.toml", "--set", "model.path=tests/data/qwen2.5-7b-instruct",
          "--set", "parallel.tensor=8"],
        &["num_key_value_heads (4) is not divisible by parallel.tensor (8)"],
    );
}

#[test]
fn run_trains_the_embedded_default() {
    let out = tempfile::tempdir().unwrap();
    let dir = format!("checkpoint.output_dir={}", out.path().display());
    let o = trainer(&["run", "recipes/tiny-qwen3-moe-lora.toml", "--set", "train.max_steps=6", "--set", &dir, "--set", "logging.tensorboard=true"]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{stdout}\n{err}");
    assert!(stdout.contains("step 6/6 loss"), "{stdout}");
    assert!(stdout.contains("done: 6 steps") && stdout.contains("checkpoint-6"), "{stdout}");
    // The run drew its charts at the end; `trainer plot` overlays runs.
    let run = std::fs::read_dir(out.path()).unwrap().flatten().map(|e| e.path()).find(|p| p.join("metrics.jsonl").is_file()).expect("the run folder");
    // `trainer infer` answers with the trained adapters: greedy answers repeat, seeded draws
    // repeat, and without --prompt a conversation is read from standard input.
    let run_arg = run.display().to_string();
    let ask = |extra: &[&str]| {
        let mut args = vec!["infer", run_arg.as_str(), "--prompt", "Who are you?", "--max-new-tokens", "6"];
        args.extend(extra);
        let o = trainer(&args);
        assert!(o.status.success(), "{args:?}: {:?}", text(&o));
        text(&o).0
    };
    let greedy = ask(&[]);
    assert!(greedy.ends_with('\n') && greedy.matches('\n').count() >= 1, "{greedy:?}");
    assert_eq!(ask(&[]), greedy);
    let drawn = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"];
    assert_eq!(ask(&drawn), ask(&drawn));
    ask(&["--base", "--prompt", "And again?"]);
    // The merged export, a model folder, answers as the run does.
    let merged = out.path().join("merged");
    let o = trainer(&["export", &run_arg, "--to", "hf", "--out", &merged.display().to_string(), "--dtype", "f32"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = trainer(&["infer", &merged.display().to_string(), "--prompt", "Who are you?", "--max-new-tokens", "6"]);
    assert_eq!(text(&o).0, greedy, "{:?}", text(&o));
    let mut conversation = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["infer", &run_arg, "--max-new-tokens", "4"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    conversation.stdin.take().unwrap().write_all(b"Hello\nWhat did I say?\nclear\nexit\nnever read\n").unwrap();
    let o = conversation.wait_with_output().unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    // A dataset's rows answered into a new JSON-lines file, never over an existing one.
    let answers = out.path().join("answers.jsonl");
    let answers_arg = answers.display().to_string();
    let data = ["infer", run_arg.as_str(), "--data", "assets/tiny/train.jsonl", "--out", answers_arg.as_str(), "--max-new-tokens", "2"];
    let o = trainer(&data);
    assert!(o.status.success(), "{:?}", text(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&answers).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let read = std::fs::read_to_string("assets/tiny/train.jsonl").unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(rows.len(), read);
    assert!(rows.iter().all(|r| r["response"].is_string() && r["labels"].is_string() && r["messages"].as_array().is_some_and(|m| !m.is_empty())), "{}", rows[0]);
    assert_user_error(&data, &["answers.jsonl", "already exists"]);
    assert_user_error(&["infer", &run_arg, "--prompt", "x", "--temperature", "-1"], &["--temperature -1"]);
    assert_user_error(&["infer", &run_arg, "--prompt", "x", "--top-p", "0"], &["--top-p 0"]);
    assert_user_error(&["infer", "tests/no-such-run", "--prompt", "x"], &["tests/no-such-run", "no such folder"]);
    let charts = run.join("plots");
    for name in ["loss.svg", "lr.svg", "grad_norm.svg", "tokens_per_s.svg"] {
        let svg = std::fs::read_to_string(charts.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{name}");
    }
    let both = out.path().join("both");
    let (run, both_arg) = (run.display().to_string(), both.display().to_string());
    let o = trainer(&["plot", &run, &run, "--out", &both_arg]);
    assert!(o.status.success(), "{:?}", text(&o));
    let loss = std::fs::read_to_string(both.join("loss.svg")).unwrap();
    assert_eq!(loss.matches("<polyline").count(), 4, "two runs x (raw, smoothed)");
    assert_user_error(&["plot", &out.path().join("nowhere").display().to_string()], &["nowhere", "metrics"]);
    // TensorBoard's events hold the logged losses under transformers' tag (tests/tensorboard_check.py
    // reads them with TensorBoard's own reader).
    let events = std::fs::read_dir(&run).unwrap().flatten().map(|e| e.path()).find(|p| p.to_string_lossy().contains("events.out.tfevents.")).expect("an event file");
    let losses: Vec<(u64, f32)> = trainer::train::tensorboard::read_events(&events)
        .unwrap()
        .into_iter()
        .flat_map(|(step, values)| values.into_iter().filter(|(t, _)| t == "train/loss").map(move |(_, v)| (step, v)))
        .collect();
    let metrics = std::fs::read_to_string(std::path::Path::new(&run).join("metrics.jsonl")).unwrap();
    let want: Vec<(u64, f32)> = metrics
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v.get("loss")?.as_f64()? as f32))
        })
        .collect();
    assert_eq!((losses.len(), losses), (6, want));
}

#[test]
fn run_refuses_what_it_cannot_train_with_a_sentence() {
    let out = tempfile::tempdir().unwrap();
    let dir = format!("checkpoint.output_dir={}", out.path().display());
    let tiny = "recipes/tiny-qwen3-moe-lora.toml";
    assert_user_error(&["run", tiny, "--set", &dir, "--set", "data.datasets=[\"assets/tiny/missing.jsonl\"]"], &["assets/tiny/missing.jsonl"]);
    assert_user_error(&["run", tiny, "--set", &dir, "--set", "model.tokenizer=\"nope.json\""], &["nope.json", "model.tokenizer"]);
    assert_user_error(&["run", tiny, "--set", &dir, "--resume", "no/such/run"], &["no/such/run", "no such folder"]);
    assert_user_error(
        &["run", tiny, "--set", &dir, "--set", "parallel.data=2", "--set", "train.global_batch_size=8"],
        &["layout needs 2 ranks", "--nproc-per-node 2"],
    );
    // A random-init model has no folder to find a tokenizer in.
    assert_user_error(
        &["run", "recipes/qwen2.5-7b-lora.toml", "--set", "model.path=tests/fixtures/qwen2_tied_f32", "--set", "parallel.tensor=1",
          "--set", "parallel.sequence_parallel=false", "--set", "device=\"cpu\"", "--set", "train.max_length=128"],
        &["tokenizer.json"],
    );
}

#[test]
fn export_refuses_bad_input_with_exit_code_2() {
    assert_user_error(&["export", "tests/no-such-run", "--to", "hf", "--out", "/tmp/never"], &["tests/no-such-run", "no such folder"]);
    assert_user_error(&["export", "tests", "--to", "hf", "--out", "/tmp/never"], &["no complete checkpoint-N"]);
    assert_user_error(&["export", "tests", "--to", "hf", "--out", "/tmp/never", "--max-shard-size", "5XB"], &["--max-shard-size", "unknown unit"]);
    assert!(!std::path::Path::new("/tmp/never").exists());
}

#[test]
fn check_shows_the_first_rows_as_the_model_sees_them() {
    let tiny = "recipes/tiny-qwen3-moe-lora.toml";
    let o = trainer(&["check", tiny, "--show-rows", "2"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("chat template     built-in `qwen2_5` (the model folder has no chat template"), "{out}");
    assert_eq!(out.matches("[INPUT] <|im_start|>system\n").count(), 2, "{out}");
    // The trained text is marked and matches the labels' decoded text.
    let input = &out[out.find("[INPUT] ").unwrap()..out.find("[INPUT_IDS]").unwrap()];
    assert!(input.contains("⟦") && input.contains("<|im_end|>⟧"), "{input}");
    let labels = out.lines().find(|l| l.starts_with("[LABELS] ")).unwrap();
    assert!(labels.starts_with("[LABELS] [-100 * "), "{labels}");

    let o = trainer(&["check", tiny, "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let row = &v["rows"][0];
    assert!(row["place"].as_str().unwrap().ends_with("assets/tiny/train.jsonl:1"), "{row}");
    let (ids, labels) = (row["input_ids"].as_array().unwrap(), row["labels"].as_array().unwrap());
    assert_eq!(ids.len(), labels.len());
    assert!(labels.iter().zip(ids).all(|(l, i)| l == -100 || l == i));
    assert_user_error(&["check", tiny, "--json", "--no-data"], &["--json"]);
    assert_user_error(&["check", tiny, "--set", "data.template=\"vicuna\""], &["data.template", "vicuna", "qwen3"]);
}

#[test]
fn help_recipe_documents_every_key_from_the_schema() {
    let o = trainer(&["help", "recipe"]);
    let (all, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(all.contains("optimizer.lr  (f64)") && all.contains("logging.tensorboard  (bool)"), "{all}");
    let o = trainer(&["help", "recipe", "optimizer.lr"]);
    let (one, _) = text(&o);
    assert!(one.starts_with("optimizer.lr  (f64)") && one.contains("--lr"), "{one}");
    assert_user_error(&["help", "recipe", "optimizer.learning_rate"], &["not a recipe key", "optimizer.lr"]);
    let o = trainer(&["help", "run"]);
    assert!(o.status.success() && text(&o).0.contains("Usage: trainer run"), "{:?}", text(&o));
}

/// `init` writes a recipe that `check` accepts as written: the tiny fixture model on the CPU,
/// and the two seed configs laid out for GPUs (Qwen2.5-7B fully tuned over 4 GPUs of 80 GiB: two
/// data-parallel replicas of 2 tensor-parallel ranks, with the distributed optimizer;
/// Qwen3-30B-A3B's LoRA with its experts split over 8), and Qwen2.5-1.5B fully tuned over 4
/// data-parallel GPUs (`check` prints the optimizer's share with and without dealing it). It never overwrites a file and refuses a missing data file.
#[test]
fn init_writes_recipes_that_check_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let data = "tests/fixtures/data/alpaca.parquet";
    let cases: [(&str, &[&str], &[&str]); 4] = [
        ("tests/fixtures/qwen3_moe_f32_sharded", &["--gpus", "0"], &["device = \"cpu\"", "[lora]"]),
        ("tests/data/qwen2.5-7b-instruct", &["--gpus", "4", "--gpu-memory", "80", "--full"], &["tuning = \"full\"", "data = 2", "tensor = 2", "sequence_parallel = true", "distributed_optimizer = true"]),
        ("tests/data/qwen3-30b-a3b", &["--gpus", "8", "--gpu-memory", "80", "--lora"], &["data = 8", "expert = 2", "--nproc-per-node 8"]),
        ("tests/data/qwen2.5-1.5b-instruct", &["--gpus", "4", "--gpu-memory", "80", "--full"], &["data = 4", "distributed_optimizer = true"]),
    ];
    for (i, (model, flags, want)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("r{i}.toml"));
        let out = out.to_str().unwrap();
        let mut args = vec!["init", "--model", model, "--data", data, "--out", out];
        args.extend_from_slice(flags);
        let o = trainer(&args);
        let (stdout, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(stdout.contains("wrote"), "{stdout}");
        let recipe = std::fs::read_to_string(out).unwrap();
        for w in *want {
            assert!(recipe.contains(w), "{model}: expected `{w}` in\n{recipe}");
        }
        let o = trainer(&["check", out, "--no-data"]);
        assert!(o.status.success(), "{model}: check refused the recipe init wrote: {}\n{recipe}", text(&o).1);
        if recipe.contains("distributed_optimizer = true") {
            let stdout = text(&o).0;
            assert!(stdout.contains("  no distributed optimizer"), "{stdout}");
        }
        // Never over an existing file.
        assert_user_error(&args, &[out, "never overwrites"]);
        assert_eq!(std::fs::read_to_string(out).unwrap(), recipe);
    }
    let out = dir.path().join("x.toml");
    assert_user_error(&["init", "--model", "tests/data/qwen3-30b-a3b", "--data", "missing.jsonl", "--out", out.to_str().unwrap()], &["missing.jsonl", "no such data file"]);
    assert!(!out.exists());
}
