//! No trainer command destroys a run: exports never write into, over or above a run, resuming
//! an older checkpoint branches instead of rewriting later ones, a resumed run keeps its own
//! recipe, Ctrl-C saves and resumes, one process at a time trains in a run folder, and old
//! checkpoints go only as `checkpoint.save_total_limit` says. Each case checks the exit code,
//! the message and that the run is intact afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = "recipes/tiny-qwen3-moe-lora.toml";

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_OFFLINE", "1")
        .env("TRAINER_CACHE", "off")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn sets(root: &Path, extra: &[&str]) -> Vec<String> {
    let mut s = vec![
        format!("checkpoint.output_dir={}", root.join("runs").display()),
        "logging.progress_bar=false".to_string(),
    ];
    s.extend(extra.iter().map(|e| e.to_string()));
    s
}

fn with_sets<'a>(args: &[&'a str], sets: &'a [String]) -> Vec<&'a str> {
    let mut all: Vec<&str> = args.to_vec();
    for s in sets {
        all.extend(["--set", s.as_str()]);
    }
    all
}

/// Train the tiny recipe for `steps` steps saving every 2 into `root/runs`; its run folder.
fn tiny_run(root: &Path, steps: usize, extra: &[&str]) -> PathBuf {
    let steps = format!("train.max_steps={steps}");
    let mut more = vec![steps.as_str(), "checkpoint.save_interval=2"];
    more.extend(extra);
    let s = sets(root, &more);
    let o = trainer(&with_sets(&["run", TINY], &s));
    assert!(o.status.success(), "{}", text(&o));
    runs_in(&root.join("runs")).pop().expect("a run folder")
}

fn runs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.join("recipe.toml").is_file()).collect();
    v.sort();
    v
}

/// Every file under `dir` with its bytes (the lock file aside: it names the last holder).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn assert_refused(o: &Output, parts: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    for p in parts {
        assert!(t.contains(p), "expected `{p}` in: {t}");
    }
}

#[test]
fn export_never_writes_into_over_or_above_a_run() {
    let root = tempfile::tempdir().unwrap();
    let run = tiny_run(root.path(), 4, &[]);
    let sibling = tiny_run(root.path(), 2, &[]);
    let before = snapshot(&root.path().join("runs"));
    let run_s = run.display().to_string();
    for (out, why) in [
        (run.clone(), "is the run being exported"),
        (root.path().join("runs"), "holds the run being exported"),
        (run.join("checkpoint-2"), "inside the run being exported"),
        (run.join("exported"), "inside the run being exported"),
        (sibling.clone(), "is a run folder"),
        (sibling.join("checkpoint-2"), "is a checkpoint folder"),
    ] {
        for to in ["peft", "hf"] {
            let o = trainer(&["export", &run_s, "--to", to, "--out", &out.display().to_string(), "--overwrite"]);
            assert_refused(&o, &[why, "whatever --overwrite says"]);
        }
    }
    assert_eq!(snapshot(&root.path().join("runs")), before, "every run and checkpoint intact");
    // A folder that is none of these: written, and replaced with --overwrite.
    let out = root.path().join("exports").join("peft");
    let out_s = out.display().to_string();
    assert!(trainer(&["export", &run_s, "--to", "peft", "--out", &out_s]).status.success());
    assert_refused(&trainer(&["export", &run_s, "--to", "peft", "--out", &out_s]), &["not empty"]);
    let o = trainer(&["export", &run_s, "--to", "peft", "--out", &out_s, "--overwrite"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("adapter_model.safetensors").is_file());
}

#[test]
fn resuming_an_older_checkpoint_branches_and_rewrites_nothing() {
    let root = tempfile::tempdir().unwrap();
    let run = tiny_run(root.path(), 4, &[]);
    let before = snapshot(&run);
    let older = run.join("checkpoint-2").display().to_string();
    // No recipe argument: the run's own.
    let o = trainer(&["run", "--resume", &older]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("new run folder"), "{t}");
    assert_eq!(snapshot(&run), before, "the run's later checkpoint is untouched");
    let branch = PathBuf::from(format!("{}-from-step-2", run.display()));
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(branch.join("branched_from.json")).unwrap()).unwrap();
    assert_eq!(record["step"], 2);
    assert!(record["checkpoint"].as_str().unwrap().ends_with("checkpoint-2"));
    assert!(branch.join("checkpoint-4").is_dir() && !branch.join("checkpoint-2").exists());
    // Its metrics start with the original's first two steps.
    let lines = std::fs::read_to_string(branch.join("metrics.jsonl")).unwrap();
    assert!(lines.lines().next().unwrap().contains("\"step\":1"), "{lines}");
    // Resuming the newest continues in place.
    let o = trainer(&["run", "--resume", &run.display().to_string(), "--set", "train.max_steps=6"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run.join("checkpoint-6").is_dir());
    assert_eq!(std::fs::read(run.join("checkpoint-4/adapter_model.safetensors")).unwrap(), before[Path::new("checkpoint-4/adapter_model.safetensors")]);
}

#[test]
fn a_resumed_run_keeps_its_own_recipe() {
    let root = tempfile::tempdir().unwrap();
    // Started with flags the recipe file does not have.
    let run = tiny_run(root.path(), 4, &["optimizer.lr=2e-3"]);
    let run_s = run.display().to_string();
    // The recipe file alone resolves to another recipe: refused, naming the key.
    let s = sets(root.path(), &[]);
    let o = trainer(&with_sets(&["run", TINY, "--resume", &run_s], &s));
    assert_refused(&o, &["optimizer.lr", "drop the RECIPE argument"]);
    // Keys that change what a step computes are refused on resume.
    for bad in ["optimizer.lr=1e-2", "lora.rank=4", "train.seed=1", "data.val_split=0.2"] {
        let o = trainer(&["run", "--resume", &run_s, "--set", "train.max_steps=6", "--set", bad]);
        let key = bad.split('=').next().unwrap();
        assert_refused(&o, &[&format!("key `{key}`"), "continues exactly"]);
    }
    assert!(!run.join("checkpoint-6").exists());
    // More steps and another save interval are allowed, printed, and recorded.
    let o = trainer(&["run", "--resume", &run_s, "--set", "train.max_steps=7", "--set", "checkpoint.save_interval=3"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("resume: train.max_steps: 4 -> 7") && t.contains("resume: checkpoint.save_interval: 2 -> 3"), "{t}");
    assert!(run.join("checkpoint-6").is_dir() && run.join("checkpoint-7").is_dir() && !run.join("checkpoint-5").exists());
    for recipe in [run.join("recipe.toml"), run.join("checkpoint-7/recipe.toml")] {
        let r = std::fs::read_to_string(&recipe).unwrap();
        assert!(r.contains("max_steps = 7") && r.contains("lr = 0.002"), "{}: {r}", recipe.display());
    }
    // Nothing left: says how to go on.
    assert_refused(&trainer(&["run", "--resume", &run_s]), &["nothing left to train", "--set train.max_steps"]);
}

/// Start the tiny recipe for many steps (with `extra` keys) and wait until it has logged
/// `steps` steps.
fn start_long_run(root: &Path, steps: usize, extra: &[&str]) -> (std::process::Child, PathBuf) {
    let mut more = vec!["train.max_steps=100000"];
    more.extend(extra);
    let s = sets(root, &more);
    let child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(with_sets(&["run", TINY], &s))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TRAINER_CACHE", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, wait_for_logged_steps(root, steps))
}

/// The newest run under `root/runs` once it has logged `steps` steps (5 min at most).
fn wait_for_logged_steps(root: &Path, steps: usize) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let runs = root.join("runs");
        if let Some(run) = runs.is_dir().then(|| runs_in(&runs)).and_then(|mut r| r.pop()) {
            let logged = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default().lines().filter(|l| l.contains("\"loss\"")).count();
            if logged >= steps {
                return run;
            }
        }
        assert!(Instant::now() < deadline, "the run did not log {steps} steps in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

#[test]
fn an_interrupt_saves_a_checkpoint_and_the_run_resumes() {
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let root = tempfile::tempdir().unwrap();
        let (child, run) = start_long_run(root.path(), 2, &[]);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(code), "{t}");
        assert!(t.contains("interrupted at step") && t.contains("trainer run --resume"), "{t}");
        let (step, ck) = trainer::run::checkpoint::complete(&run).unwrap().pop().expect("a checkpoint");
        assert!(ck.join("optimizer.safetensors").is_file(), "the interrupt's checkpoint resumes");
        let more = format!("train.max_steps={}", step + 2);
        let o = trainer(&["run", "--resume", &run.display().to_string(), "--set", &more]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(run.join(format!("checkpoint-{}", step + 2)).is_dir());
    }
    // A second interrupt stops at once; the last complete checkpoint stays valid.
    let root = tempfile::tempdir().unwrap();
    let (child, run) = start_long_run(root.path(), 1, &[]);
    signal(&child, libc::SIGINT);
    signal(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    // Killed mid-write or not, no checkpoint is half there: a resume (if one was complete)
    // clears whatever partial folder the kill left.
    if let Some((step, _)) = trainer::run::checkpoint::complete(&run).unwrap().pop() {
        let more = format!("train.max_steps={}", step + 1);
        let o = trainer(&["run", "--resume", &run.display().to_string(), "--set", &more]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(!std::fs::read_dir(&run).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".tmp")));
    }
}

#[test]
fn one_process_at_a_time_trains_in_a_run_folder() {
    let root = tempfile::tempdir().unwrap();
    let run = tiny_run(root.path(), 2, &[]);
    let run_s = run.display().to_string();
    let before = snapshot(&run);
    {
        let _held = trainer::run::RunLock::acquire(&run).unwrap();
        let o = trainer(&["run", "--resume", &run_s, "--set", "train.max_steps=4"]);
        assert_refused(&o, &[&format!("in use by process {}", std::process::id())]);
        assert_eq!(snapshot(&run), before);
    }
    // The lock of a process that is gone (a file naming a dead PID, no lock held) is taken over.
    std::fs::write(run.join(".lock"), "4000000000").unwrap();
    let o = trainer(&["run", "--resume", &run_s, "--set", "train.max_steps=4"]);
    assert!(o.status.success(), "{}", text(&o));
    // A partial checkpoint left by a killed write is cleared on the next start.
    std::fs::create_dir(run.join("checkpoint-9.tmp")).unwrap();
    let o = trainer(&["run", "--resume", &run_s, "--set", "train.max_steps=6"]);
    assert!(o.status.success() && text(&o).contains("checkpoint-9.tmp"), "{}", text(&o));
    assert!(!run.join("checkpoint-9.tmp").exists());
}

#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let run = tiny_run(root.path(), 8, &["checkpoint.save_total_limit=2"]);
    let steps: Vec<usize> = trainer::run::checkpoint::complete(&run).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![6, 8]);
    let s = sets(root.path(), &["checkpoint.save_total_limit=0"]);
    assert_refused(&trainer(&with_sets(&["check", TINY], &s)), &["checkpoint.save_total_limit", "1 or more"]);
}

/// `check` refuses it with exit 2 and the parts named; `run` refuses it too, before it
/// creates any run folder.
fn refused_by_check_and_run(root: &Path, set: &[&str], parts: &[&str]) {
    let s = sets(root, set);
    assert_refused(&trainer(&with_sets(&["check", TINY], &s)), parts);
    assert_refused(&trainer(&with_sets(&["run", TINY], &s)), parts);
    let runs = root.join("runs");
    assert!(!runs.is_dir() || runs_in(&runs).is_empty(), "{set:?}: run left a folder behind");
}

#[test]
fn values_that_crashed_training_are_refused_before_it_starts() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    refused_by_check_and_run(r, &["model.config.head_dim=0"], &["`head_dim` is 0", "even number"]);
    refused_by_check_and_run(r, &["model.config.moe_intermediate_size=0"], &["`moe_intermediate_size` is 0"]);
    refused_by_check_and_run(r, &["model.config.initializer_range=-1"], &["`initializer_range` is -1"]);
    refused_by_check_and_run(r, &["model.config.hidden_size=1000000000000"], &["`hidden_size` is 1000000000000", "expected 1 to"]);
    refused_by_check_and_run(r, &["model.config.hidden_size=9223372036854775807"], &["`hidden_size`", "expected 1 to"]);
    // The tokenizer's ids run to 511.
    refused_by_check_and_run(r, &["model.config.vocab_size=100"], &["ids up to 511", "vocab_size is 100"]);
    refused_by_check_and_run(r, &["train.max_length=100000"], &["max_position_embeddings = 512"]);
    // A model far larger than any machine's memory: refused with the estimate.
    refused_by_check_and_run(r, &["model.config.moe_intermediate_size=65536", "model.config.hidden_size=8192"], &["GiB per rank", "host memory"]);
    let s = sets(r, &["train.max_length=1000000"]);
    assert_refused(&trainer(&with_sets(&["bench", TINY], &s)), &["max_position_embeddings"]);
    assert_refused(&trainer(&["bench", TINY, "--steps", "0"]), &["--steps 0"]);
}

#[test]
fn check_refuses_what_run_would() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    refused_by_check_and_run(r, &["model.tokenizer=\"assets/tiny/nope.json\""], &["assets/tiny/nope.json", "model.tokenizer"]);
    refused_by_check_and_run(r, &["data.datasets=[\"assets/tiny/missing.jsonl\"]"], &["assets/tiny/missing.jsonl"]);
    refused_by_check_and_run(r, &["data.template=\"qwen9\""], &["`qwen9`", "qwen2_5"]);
    refused_by_check_and_run(r, &["train.recompute.granularity=\"selective\""], &["selective", "\"full\""]);
    refused_by_check_and_run(r, &["train.recompute.granularity=\"full\"", "train.recompute.num_layers=5"], &["num_layers = 5", "2 layers"]);
    refused_by_check_and_run(r, &["lora.targets=[\"q_projj\"]"], &["lora.targets[0]", "q_projj", "q_proj"]);
    refused_by_check_and_run(r, &["logging.metrics_file=\"\""], &["logging.metrics_file", "inside the run folder"]);
    refused_by_check_and_run(r, &["logging.metrics_file=\"../../x.jsonl\""], &["logging.metrics_file", "no `..`"]);
    refused_by_check_and_run(r, &["lora.rank=9223372036854775807"], &["lora.rank", "expected 1 to"]);
    refused_by_check_and_run(r, &["lora.rank=100"], &["lora.rank = 100", "smallest layer"]);
    let file = r.join("a-file");
    std::fs::write(&file, "").unwrap();
    let s = vec![format!("checkpoint.output_dir={}", file.display())];
    for cmd in ["check", "run"] {
        assert_refused(&trainer(&with_sets(&[cmd, TINY], &s)), &["checkpoint.output_dir is a file"]);
    }
    // By default check dry-runs the data.
    let o = trainer(&with_sets(&["check", TINY], &sets(r, &[])));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("assets/tiny/train.jsonl") && t.contains("tokens per row") && t.contains("optimizer steps"), "{t}");
    let o = trainer(&with_sets(&["check", TINY, "--no-data"], &sets(r, &[])));
    assert!(o.status.success() && text(&o).contains("--no-data"), "{}", text(&o));
}

#[test]
fn messages_speak_the_recipes_words() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let check = |set: &[&str], parts: &[&str]| assert_refused(&trainer(&with_sets(&["check", TINY, "--no-data"], &sets(r, set))), parts);
    check(&["data.val_split=-0.5", "train.eval_interval=10"], &["key `data.val_split`", "[0, 1)"]);
    check(&["train.micro_batch_size=99999999999999999999"], &["too large for an integer"]);
    check(&["train.micro_batch_size=-1"], &["key `train.micro_batch_size`", "1 or more"]);
    check(&["train.truncation=\"cut\""], &["`delete`, `left`, `right`"]);
    // A typo under [model.config] is named, with the key meant.
    let o = trainer(&with_sets(&["check", TINY, "--no-data"], &sets(r, &["model.config.num_expert=4"])));
    assert!(o.status.success() && text(&o).contains("`num_expert`") && text(&o).contains("did you mean `num_experts`"), "{}", text(&o));
    // Data files: empty, all held out, a BOM (read), Latin-1 (the line named).
    let data = |name: &str, bytes: &[u8]| {
        let p = r.join(name);
        std::fs::write(&p, bytes).unwrap();
        format!("data.datasets=[\"{}\"]", p.display())
    };
    let row = br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let empty = data("empty.jsonl", b"");
    check_data(r, &[&empty], &["no training rows", "the files hold no rows", "empty.jsonl"]);
    let one = data("one.jsonl", row);
    check_data(r, &[&one, "data.val_split=0.9"], &["data.val_split = 0.9 takes every row"]);
    let mut bom = vec![0xef, 0xbb, 0xbf];
    bom.extend_from_slice(row);
    for _ in 0..8 {
        bom.push(b'\n');
        bom.extend_from_slice(row);
    }
    let bom = data("bom.jsonl", &bom);
    assert!(trainer(&with_sets(&["check", TINY], &sets(r, &[&bom]))).status.success());
    let mut latin = row.to_vec();
    latin.push(b'\n');
    latin.extend_from_slice("{\"messages\": [{\"role\": \"user\", \"content\": \"caf".as_bytes());
    latin.push(0xe9);
    latin.extend_from_slice(b"\"}]}\n");
    let latin = data("latin1.jsonl", &latin);
    check_data(r, &[&latin], &["latin1.jsonl:2", "not UTF-8"]);
    // Export: a precision threshold that means nothing is refused before anything is written.
    let run = tiny_run(r, 2, &[]);
    for bad in ["nan", "-1"] {
        let out = r.join("never");
        let o = trainer(&["export", &run.display().to_string(), "--to", "hf", "--out", &out.display().to_string(), "--test-precision", "--precision-threshold", bad]);
        assert_refused(&o, &["--precision-threshold"]);
        assert!(!out.exists());
    }
    // An adapter_config.json edited by hand shows its own values.
    let ck = run.join("checkpoint-2");
    let cfg = std::fs::read_to_string(ck.join("adapter_config.json")).unwrap().replace("\"r\": 8", "\"r\": \"eight\"");
    std::fs::write(ck.join("adapter_config.json"), cfg).unwrap();
    let out = r.join("peft");
    assert_refused(&trainer(&["export", &run.display().to_string(), "--to", "peft", "--out", &out.display().to_string()]), &["\"r\": \"eight\""]);
}

fn check_data(root: &Path, set: &[&str], parts: &[&str]) {
    assert_refused(&trainer(&with_sets(&["check", TINY], &sets(root, set))), parts);
}

/// A free loopback port for a job's rendezvous.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One rank of a 2-rank job started as a launcher (torchrun) would: its variables set.
fn rank_process(rank: usize, port: u16, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TRAINER_CACHE", "off")
        .env("WORLD_SIZE", "2")
        .env("RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The losses of a run's metrics, by step.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}

/// Every tensor of a safetensors file as f32 values, by name.
fn tensors(file: &Path) -> BTreeMap<String, Vec<f32>> {
    trainer::run::checkpoint::read_safetensors(file).unwrap().into_iter().map(|(name, (_, values))| (name, values)).collect()
}

/// `trainer run --nproc-per-node 2` with `parallel.data = 2` trains as one process does with the
/// same global batch (dropout on: the masks follow the global micro batch): the same loss at
/// every step and the same adapter (1e-5 relative); only rank 0 writes the run folder, rank 1
/// its log.
#[test]
fn data_parallel_ranks_train_as_one_process() {
    let root = tempfile::tempdir().unwrap();
    let common = ["train.max_steps=6", "train.global_batch_size=8", "checkpoint.save_interval=3"];
    let one = tiny_run(&root.path().join("one"), 6, &common[1..]);
    let two_root = root.path().join("two");
    let mut more = common.to_vec();
    more.push("parallel.data=2");
    let s = sets(&two_root, &more);
    let mut args = with_sets(&["run", TINY], &s);
    args.extend(["--nproc-per-node", "2"]);
    let o = trainer(&args);
    assert!(o.status.success(), "{}", text(&o));
    let runs = runs_in(&two_root.join("runs"));
    assert_eq!(runs.len(), 1, "one run folder, rank 0's");
    let log = std::fs::read_to_string(two_root.join("runs/rank-logs/rank-1.log")).unwrap();
    assert!(log.contains("rank 1: training 6 steps"), "{log}");
    let (want, got) = (losses(&one), losses(&runs[0]));
    assert_eq!(want.len(), 6);
    assert_eq!(got.len(), 6);
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs(), "step {}: loss {g} with 2 ranks, {w} with one", s + 1);
    }
    let adapter = |run: &Path| tensors(&run.join("checkpoint-6").join("adapter_model.safetensors"));
    let (want, got) = (adapter(&one), adapter(&runs[0]));
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (name, w) in &want {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let diff = got[name].iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{name} differs by {diff:e} (max {scale:e})");
    }
}

/// Max |got - want| over max |want| of every tensor two safetensors files share, which must be
/// the same names.
fn worst_difference(got: &Path, want: &Path) -> (String, f32) {
    let (got, want) = (tensors(got), tensors(want));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    let mut worst = (String::new(), 0f32);
    for (name, w) in &want {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let diff = got[name].iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        if diff > worst.1 {
            worst = (name.clone(), diff);
        }
    }
    worst
}

/// `trainer run --nproc-per-node N` with the layers split over tensor-parallel ranks (2 ranks
/// with sequence parallelism; 4 ranks as 2 data-parallel replicas of 2 tensor ranks), the
/// optimizer's state dealt over the data-parallel ranks (`parallel.distributed_optimizer`) and the
/// experts over expert-parallel ranks (data 2 x expert 2; and with tensor 2 + sequence
/// parallelism on 4 ranks), full layer recompute and evaluation, trains as one process does: every step's loss within 1e-5
/// relative, the gathered checkpoint's adapter (peft's names and one device's shapes) within
/// 2e-4 of each tensor's largest value (AdamW's scale-free update turns last-bit differences of
/// near-zero gradients into weight differences up to the learning rate), and the 2-rank runs
/// resumed from their checkpoints (adapter and optimizer moments sliced back out, each rank's
/// experts picked) end where one process does. Dropout is off: a row-parallel layer draws its mask over its own slice of
/// the inputs, so masks are not one process's.
#[test]
fn parallel_layouts_train_as_one_process() {
    let root = tempfile::tempdir().unwrap();
    let common = ["train.global_batch_size=8", "checkpoint.save_interval=3", "lora.dropout=0.0", "train.recompute.granularity=\"full\"", "train.eval_interval=3"];
    let one = tiny_run(&root.path().join("one"), 8, &common);
    let adapter = |run: &Path, step: usize| run.join(format!("checkpoint-{step}")).join("adapter_model.safetensors");
    let layouts: [(&str, &str, &[&str]); 6] = [
        ("tp2-sp", "2", &["parallel.tensor=2", "parallel.sequence_parallel=true"]),
        ("dp2-tp2", "4", &["parallel.data=2", "parallel.tensor=2"]),
        ("dp2-zero", "2", &["parallel.data=2", "parallel.distributed_optimizer=true"]),
        ("dp2-tp2-zero", "4", &["parallel.data=2", "parallel.tensor=2", "parallel.distributed_optimizer=true"]),
        ("dp2-ep2", "2", &["parallel.data=2", "parallel.expert=2"]),
        ("dp2-tp2-sp-ep2", "4", &["parallel.data=2", "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"]),
    ];
    for (name, nproc, layout) in layouts {
        let dir = root.path().join(name);
        let mut more: Vec<&str> = common.to_vec();
        more.push("train.max_steps=8");
        more.extend(layout);
        let s = sets(&dir, &more);
        let mut args = with_sets(&["run", TINY], &s);
        args.extend(["--nproc-per-node", nproc]);
        let o = trainer(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let runs = runs_in(&dir.join("runs"));
        assert_eq!(runs.len(), 1, "{name}: one run folder, rank 0's");
        let got = losses(&runs[0]);
        assert_eq!(got.len(), 8, "{name}");
        for (s, (g, w)) in got.iter().zip(losses(&one)).enumerate() {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "{name}: step {}: loss {g}, one process {w}", s + 1);
        }
        let (tensor, diff) = worst_difference(&adapter(&runs[0], 8), &adapter(&one, 8));
        assert!(diff <= 2e-4, "{name}: {tensor} differs by {diff:e} of its largest value");
        if nproc == "2" {
            // Resumed on the same layout from checkpoint-6: a branch that ends where one
            // process does.
            let from = runs[0].join("checkpoint-6").display().to_string();
            let o = trainer(&["run", "--resume", &from, "--nproc-per-node", nproc]);
            assert!(o.status.success(), "{name} resumed: {}", text(&o));
            let branch = runs_in(&dir.join("runs")).into_iter().find(|r| r.display().to_string().ends_with("-from-step-6")).expect("the branch folder");
            let (want, got) = (losses(&one), losses(&branch));
            assert_eq!(got.len(), 8, "{name} resumed: steps 1-6 copied, 7-8 trained");
            for s in 6..8 {
                assert!((got[s] - want[s]).abs() <= 1e-5 * want[s].abs(), "{name} resumed: step {}: loss {}, one process {}", s + 1, got[s], want[s]);
            }
            let (tensor, diff) = worst_difference(&adapter(&branch, 8), &adapter(&one, 8));
            assert!(diff <= 2e-4, "{name} resumed: {tensor} differs by {diff:e} of its largest value");
        }
    }
}

/// Two nodes on loopback (`--nnodes 2 --node-rank K --master-addr 127.0.0.1 --master-port P`,
/// one rank each, started as two commands as two machines would start them) train the
/// data-parallel layout as `--nproc-per-node 2` on one node does: the same losses (1e-5) and one
/// run folder, node 0's.
#[test]
fn two_nodes_train_as_one_node() {
    let root = tempfile::tempdir().unwrap();
    let common = ["train.max_steps=4", "train.global_batch_size=8", "parallel.data=2"];
    let one_node = root.path().join("one-node");
    let s = sets(&one_node, &common);
    let mut args = with_sets(&["run", TINY], &s);
    args.extend(["--nproc-per-node", "2"]);
    let o = trainer(&args);
    assert!(o.status.success(), "{}", text(&o));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let two_nodes = root.path().join("two-nodes");
    let s = sets(&two_nodes, &common);
    let nodes: Vec<_> = ["0", "1"]
        .iter()
        .map(|k| {
            let mut args = with_sets(&["run", TINY], &s);
            args.extend(["--nproc-per-node", "1", "--nnodes", "2", "--node-rank", k, "--master-addr", "127.0.0.1", "--master-port", &port]);
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || trainer(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        })
        .collect();
    for (k, node) in nodes.into_iter().enumerate() {
        let o = node.join().unwrap();
        assert!(o.status.success(), "node {k}: {}", text(&o));
    }
    let runs = runs_in(&two_nodes.join("runs"));
    assert_eq!(runs.len(), 1, "one run folder, node 0's rank 0's");
    let (want, got) = (losses(&runs_in(&one_node.join("runs"))[0]), losses(&runs[0]));
    assert_eq!(got.len(), 4);
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs(), "step {}: loss {g} on two nodes, {w} on one", s + 1);
    }
}

/// A layout that does not match the ranks started, and ranks whose recipes differ: exit 2 with
/// a sentence, from the launcher and from ranks started by hand.
#[test]
fn ranks_that_do_not_match_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let s = sets(root.path(), &["train.max_steps=2"]);
    let mut args = with_sets(&["run", TINY], &s);
    args.extend(["--nproc-per-node", "2"]);
    let o = trainer(&args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("2 ranks were started but the recipe's layout needs 1") && t.contains("exited with code 2"), "{t}");
    let o = trainer(&with_sets(&["run", TINY], &sets(root.path(), &["parallel.data=2"])));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("--nproc-per-node 2"), "{t}");
    // Rank 1 with another learning rate: both refuse to start.
    let port = free_port();
    let base = sets(root.path(), &["parallel.data=2", "train.max_steps=2"]);
    let mut other = base.clone();
    other.push("optimizer.lr=1e-3".into());
    let r0 = rank_process(0, port, &with_sets(&["run", TINY], &base));
    let r1 = rank_process(1, port, &with_sets(&["run", TINY], &other));
    for (rank, child) in [(0, r0), (1, r1)] {
        let o = child.wait_with_output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "rank {rank}: {t}");
        assert!(t.contains("recipe"), "rank {rank}: {t}");
    }
}

/// A rank killed mid-run, or stopped (hung: alive, silent), ends the job: the other rank exits
/// non-zero within 60 s naming it. The stopped rank is what the heartbeat watchdog is for: on
/// NCCL nothing else would end a collective waiting on it.
#[test]
fn a_killed_or_hung_rank_ends_the_job_naming_it() {
    for (sig, says) in [(libc::SIGKILL, "rank 1"), (libc::SIGSTOP, "rank 1 has not been heard from")] {
        let root = tempfile::tempdir().unwrap();
        let port = free_port();
        let s = sets(root.path(), &["parallel.data=2", "train.max_steps=100000", "train.global_batch_size=8"]);
        let args = with_sets(&["run", TINY], &s);
        let r0 = rank_process(0, port, &args);
        let mut r1 = rank_process(1, port, &args);
        wait_for_logged_steps(root.path(), 1);
        signal(&r1, sig);
        let stopped = Instant::now();
        let o = r0.wait_with_output().unwrap();
        let t = text(&o);
        let took = stopped.elapsed();
        r1.kill().unwrap();
        r1.wait().unwrap();
        assert!(took < Duration::from_secs(60), "signal {sig}: rank 0 took {took:?} to notice");
        assert_eq!(o.status.code(), Some(2), "signal {sig}: {t}");
        assert!(t.contains(says), "signal {sig}: {t}");
    }
}

/// `trainer runs` tells a finished run from a running one (with its PID) and, once that one is
/// killed, a stopped one; `--json` gives the same as one object per run.
#[test]
fn runs_lists_each_run_with_its_state() {
    let root = tempfile::tempdir().unwrap();
    let finished = tiny_run(root.path(), 2, &[]);
    let runs_dir = root.path().join("runs");
    // Step 3 is logged after checkpoint-2 is written.
    let (mut live, run) = start_long_run(root.path(), 3, &["checkpoint.save_interval=2"]);
    assert_ne!(run, finished);
    let listed = |json: bool| {
        let dir = runs_dir.display().to_string();
        let mut args = vec!["runs", dir.as_str()];
        if json {
            args.push("--json");
        }
        let o = trainer(&args);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let table = listed(false);
    assert!(table.contains("finished") && table.contains("2/2"), "{table}");
    assert!(table.contains(&format!("running (pid {})", live.id())), "{table}");
    live.kill().unwrap();
    live.wait().unwrap();
    let rows: Vec<serde_json::Value> = listed(true).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["state"], "finished");
    assert_eq!(rows[1]["state"], "stopped");
    assert!(rows[1]["step"].as_u64().is_some_and(|s| s >= 2), "{:?}", rows[1]);
    let o = trainer(&["runs", &root.path().join("nowhere").display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
