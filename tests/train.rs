//! `trainer run` end to end on the embedded tiny recipe: the loss falls, checkpoints carry
//! peft's names, accumulation and packing do not change the maths, and an interrupted run
//! resumed from its checkpoint ends bit-identical to an uninterrupted one.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::TensorData;
use trainer::backend::Cpu;
use trainer::data::{batch, Batch, Sample};
use trainer::lora::{self, LoraConfig, LoraTargets};
use trainer::model::{self, hub::Fetch, Registry};
use trainer::parallel::Layout;
use trainer::train::optimizer::{AdamW, AdamWConfig, Grads};
use trainer::train::{LrSchedule, Trainer};
use trainer::recipe::{self, LoadedRecipe};
use trainer::run::checkpoint as ckpt;
use trainer::train::run::{run, RunOutcome, RunRequest};

const TINY: &str = "recipes/tiny-qwen3-moe-lora.toml";

fn load(out: &Path, extra: &[&str]) -> LoadedRecipe {
    let mut set = vec![
        format!("checkpoint.output_dir={}", out.display()),
        "logging.progress_bar=false".to_string(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    recipe::load(Path::new(TINY), &set).unwrap()
}

/// Dropout draws from the backend's one seeded generator per process: runs in parallel test
/// threads would interleave their draws, so each run holds this lock.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn train(loaded: &LoadedRecipe, resume: Option<PathBuf>, stop_after: Option<usize>) -> trainer::error::Result<RunOutcome> {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let plan = model::plan(&loaded.recipe.model, &Registry::builtin(), Fetch::All)?;
    run(RunRequest { loaded, plan: &plan, resume, stop_after })
}

fn adapter(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(ckpt::ADAPTER_WEIGHTS)).unwrap()
}

#[test]
fn tiny_recipe_trains_and_writes_a_peft_adapter() {
    let out = tempfile::tempdir().unwrap();
    let loaded = load(out.path(), &["train.max_steps=40", "train.eval_interval=20", "checkpoint.save_interval=20"]);
    let o = train(&loaded, None, None).unwrap();
    assert_eq!((o.steps, o.losses.len()), (40, 40));
    let first = o.losses[..5].iter().sum::<f64>() / 5.0;
    let last = o.losses[35..].iter().sum::<f64>() / 5.0;
    assert!(last < first - 1.0, "loss should fall: first steps {first:.3}, last steps {last:.3}");
    assert!(o.eval_loss.is_some_and(|l| l < first), "{:?}", o.eval_loss);

    let dir = &o.last_checkpoint;
    assert!(dir.ends_with("checkpoint-40") && o.run_dir.join("checkpoint-20").is_dir());
    let tensors = ckpt::read_safetensors(&dir.join(ckpt::ADAPTER_WEIGHTS)).unwrap();
    // 2 layers x (q, k, v, o + 8 experts x 3) linears, A and B each.
    assert_eq!(tensors.len(), 2 * (4 + 8 * 3) * 2);
    let (shape, _) = &tensors["base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_A.weight"];
    assert_eq!(shape, &[8, 32], "lora_A is [r, in]");
    let (shape, _) = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(shape, &[64, 8], "lora_B is [out, r]");
    assert!(!tensors.keys().any(|k| k.contains("mlp.gate.")), "the router is not adapted by all-linear");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(ckpt::ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(32.0)));
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]));
    // The recorded recipe reloads to the recipe that ran.
    let again = recipe::load(&dir.join(ckpt::RECIPE), &[]).unwrap();
    assert_eq!(again.recipe, loaded.recipe);
    let metrics = std::fs::read_to_string(o.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 40);
    assert_eq!(metrics.lines().filter(|l| l.contains("eval_loss")).count(), 2);
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    let out = tempfile::tempdir().unwrap();
    // Dropout on, so the resumed run must also redraw the same masks.
    let args = ["train.max_steps=12", "checkpoint.save_interval=4", "lora.dropout=0.1", "train.global_batch_size=8"];
    let whole = train(&load(out.path(), &args), None, None).unwrap();

    let out2 = tempfile::tempdir().unwrap();
    let loaded = load(out2.path(), &args);
    let cut = train(&loaded, None, Some(6)).unwrap();
    assert_eq!(cut.steps, 6);
    // Steps 5 and 6 ran after the last checkpoint (step 4): the resumed run redoes them.
    assert!(ckpt::latest(&cut.run_dir).unwrap().unwrap().ends_with("checkpoint-4"));
    let resumed = train(&loaded, Some(cut.run_dir.clone()), None).unwrap();
    assert_eq!(resumed.run_dir, cut.run_dir);
    assert_eq!(resumed.losses.len(), 8);
    assert_eq!(&resumed.losses[..], &whole.losses[4..], "loss curve after the resume");
    assert_eq!(&cut.losses[..], &whole.losses[..6]);
    assert!(adapter(&resumed.last_checkpoint) == adapter(&whole.last_checkpoint), "final adapters differ");
    let metrics = std::fs::read_to_string(cut.run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss").and(serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()))
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>(), "metrics hold each step once");

    // Nothing left to do: a clear error, not a silent no-op.
    let e = train(&loaded, Some(cut.run_dir.clone()), None).unwrap_err().to_string();
    assert!(e.contains("nothing left to train"), "{e}");
}

/// A checkpoint written before expert adapters were stacked keeps the experts' optimizer
/// moments an expert at a time (`layers.0.moe.experts.5.up_proj.lora.lora_a.exp_avg`): resumed
/// from one, the run still ends bit-identical to the run never stopped.
#[test]
fn per_expert_optimizer_moments_of_earlier_checkpoints_resume() {
    let args = ["train.max_steps=8", "checkpoint.save_interval=4", "train.global_batch_size=8"];
    let out = tempfile::tempdir().unwrap();
    let whole = train(&load(out.path(), &args), None, None).unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let loaded = load(out2.path(), &args);
    let cut = train(&loaded, None, Some(4)).unwrap();
    let dir = cut.run_dir.join("checkpoint-4");
    // Rewrite the stacked moments as the earlier per-expert ones.
    let moments = ckpt::read_safetensors(&dir.join(ckpt::OPTIMIZER)).unwrap();
    let state_file = dir.join(ckpt::TRAINER_STATE);
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let steps = state["optimizer_steps"].as_object_mut().unwrap();
    let mut tensors = Vec::new();
    let mut split = 0;
    for (name, (_, values)) in moments {
        let (path, suffix) = name.rsplit_once('.').unwrap();
        match trainer::lora::stacked_factor(path) {
            Some((layer, projection, factor)) => {
                let step = steps.get(path).cloned().expect("a step count for every stacked factor");
                for (e, block) in values.chunks(values.len() / 8).enumerate() {
                    let old = format!("layers.{layer}.moe.experts.{e}.{projection}.lora.{factor}");
                    steps.insert(old.clone(), step.clone());
                    tensors.push(ckpt::NamedTensor { name: format!("{old}.{suffix}"), data: TensorData::new(block.to_vec(), [block.len()]) });
                }
                split += 1;
            }
            None => tensors.push(ckpt::NamedTensor { name, data: TensorData::new(values.clone(), [values.len()]) }),
        }
    }
    assert_eq!(split, 2 * 3 * 2 * 2, "2 layers x 3 projections x (A, B) x (exp_avg, exp_avg_sq) stacked");
    steps.retain(|path, _| trainer::lora::stacked_factor(path).is_none());
    ckpt::write_safetensors(&dir.join(ckpt::OPTIMIZER), &tensors, Default::default()).unwrap();
    std::fs::write(&state_file, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    let resumed = train(&loaded, Some(cut.run_dir.clone()), None).unwrap();
    assert_eq!(&resumed.losses[..], &whole.losses[4..], "loss curve after the resume");
    assert!(adapter(&resumed.last_checkpoint) == adapter(&whole.last_checkpoint), "final adapters differ");
}

/// The evaluations a run wrote to its metrics: `(step, eval loss)`.
fn eval_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let rows = metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    rows.filter_map(|v| Some((v["step"].as_u64()?, v.get("eval_loss")?.as_f64()?))).collect()
}

/// The eval loss of a model built afresh with `loaded`'s recipe and the weights of checkpoint
/// `dir`, on the validation batches a run of that recipe evaluates.
fn evaluate_checkpoint(loaded: &LoadedRecipe, dir: &Path) -> f64 {
    let r = &loaded.recipe;
    let plan = model::plan(&r.model, &Registry::builtin(), Fetch::All).unwrap();
    let m = model::build::<Autodiff<Cpu>>(&plan, &r.model, Layout::SINGLE, &Default::default()).unwrap();
    let m = trainer::train::checkpoints::load_trained(m, dir, r).unwrap();
    let schedule = LrSchedule::new(&r.optimizer, &r.schedule, 1);
    let mut t = Trainer::new(m, AdamW::new(AdamWConfig::from(&r.optimizer)), schedule, 1.0, r.train.seed, vec![], Default::default());
    t.fused_cross_entropy = r.train.fused_cross_entropy;
    let prepared = trainer::data::prepare(r, Path::new("assets/tiny/tokenizer.json")).unwrap();
    t.evaluate(&prepared.val_batches(r.train.micro_batch_size)).unwrap().0
}

/// Full tuning trains the weights that load joined (gate/up, q/k/v) or stacked (the experts)
/// with views of them as the layers' weights; the optimizer's steps keep the views' parameter
/// ids, and on the inner backend (evaluation, the forward of recomputed layers) no weight says
/// it trains. Those passes still run the trained weights, not the ones loaded: each evaluation
/// is the loss of the model loaded from that step's checkpoint, a resumed run evaluates as the
/// run never stopped, and recompute changes no loss.
#[test]
fn full_tuning_evaluates_and_recomputes_the_weights_it_trained() {
    // Dense Qwen3 (gate/up joined), Qwen3-MoE (experts stacked), Qwen2-MoE (q/k/v joined, with
    // no q/k norms to keep them apart; the shared expert's gate/up).
    let families: [&[&str]; 3] = [
        &["model.config.model_type=qwen3"],
        &[],
        &["model.config.model_type=qwen2_moe", "model.config.shared_expert_intermediate_size=32"],
    ];
    for family in families {
        let mut args = vec!["train.tuning=full", "train.max_steps=4", "train.eval_interval=2", "checkpoint.save_interval=2"];
        args.extend(family);
        let what = format!("{family:?}");
        let out = tempfile::tempdir().unwrap();
        let loaded = load(out.path(), &args);
        let whole = train(&loaded, None, None).unwrap();
        let evals = eval_losses(&whole.run_dir);
        assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4], "{what}");
        for &(step, loss) in &evals {
            let fresh = evaluate_checkpoint(&loaded, &whole.run_dir.join(format!("checkpoint-{step}")));
            close(loss, fresh, &format!("{what}: eval loss at step {step} against checkpoint-{step} loaded afresh"));
        }

        // Stopped after step 2's checkpoint and resumed: the same steps, the same evaluations.
        std::fs::remove_dir_all(whole.run_dir.join("checkpoint-4")).unwrap();
        let resumed = train(&loaded, Some(whole.run_dir.clone()), None).unwrap();
        assert_eq!(&resumed.losses[..], &whole.losses[2..], "{what}: loss curve after the resume");
        assert_eq!(eval_losses(&whole.run_dir), evals, "{what}: evaluations after the resume");

        args.push("train.recompute.granularity=full");
        let out = tempfile::tempdir().unwrap();
        let recomputed = train(&load(out.path(), &args), None, None).unwrap();
        for (step, (got, want)) in recomputed.losses.iter().zip(&whole.losses).enumerate() {
            close(*got, *want, &format!("{what}: recompute, loss at step {}", step + 1));
        }
        for ((step, got), (_, want)) in eval_losses(&recomputed.run_dir).into_iter().zip(&evals) {
            close(got, *want, &format!("{what}: recompute, eval loss at step {step}"));
        }
    }
}

/// A trainer on the tiny recipe's model with fresh adapters (dropout off) and its first rows.
fn tiny_trainer() -> (Trainer<Cpu>, Vec<Sample>, u32) {
    tiny_trainer_with(Some(0.0), vec![])
}

/// As [`tiny_trainer`], with LoRA dropout `Some(p)` or full tuning (`None`), and recompute
/// groups.
fn tiny_trainer_with(lora_dropout: Option<f64>, recompute: Vec<std::ops::Range<usize>>) -> (Trainer<Cpu>, Vec<Sample>, u32) {
    let out = tempfile::tempdir().unwrap();
    let r = load(out.path(), &["lora.dropout=0"]).recipe;
    let plan = model::plan(&r.model, &Registry::builtin(), Fetch::All).unwrap();
    let mut m = model::build::<Autodiff<Cpu>>(&plan, &r.model, Layout::SINGLE, &Default::default()).unwrap();
    if let Some(dropout) = lora_dropout {
        let cfg = LoraConfig { rank: 8, scale: 4.0, dropout, seed: 3 };
        m = lora::apply(m, &LoraTargets::parse(&["all-linear".to_string()]).unwrap(), &cfg).unwrap().0;
    }
    let opt = AdamW::new(AdamWConfig::from(&r.optimizer));
    let schedule = LrSchedule::new(&r.optimizer, &r.schedule, 10);
    let prepared = trainer::data::prepare(&r, Path::new("assets/tiny/tokenizer.json")).unwrap();
    let t = Trainer::new(m, opt, schedule, 1.0, 5, recompute, Default::default());
    (t, prepared.train[..8].to_vec(), prepared.pad_id)
}

#[test]
fn recomputed_layers_give_the_gradients_of_kept_activations() {
    // LoRA with dropout (the recomputed forward must draw the same masks) and full tuning
    // (every weight, embeddings and norms included, gets its gradient from the recompute).
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for dropout in [Some(0.1), None] {
        let reference = {
            let (t, rows, pad) = tiny_trainer_with(dropout, vec![]);
            t.gradients(1, &batch::padded(&rows, 4, pad)).unwrap()
        };
        for groups in [vec![0..1, 1..2], vec![0..2], vec![0..1]] {
            let (t, rows, pad) = tiny_trainer_with(dropout, groups.clone());
            let (loss, grads) = t.gradients(1, &batch::padded(&rows, 4, pad)).unwrap();
            let what = format!("dropout {dropout:?}, groups {groups:?}");
            same_gradients((loss, &grads), (reference.0, &reference.1), &what);
            if dropout.is_none() {
                assert!(grads.by_path.contains_key("embed_tokens") && grads.by_path.contains_key("layers.0.input_layernorm.weight"));
            }
        }
    }
}

/// Losses within 1e-5 and every gradient within 1e-5 of its largest element.
fn same_gradients(got: (f64, &Grads<Cpu>), want: (f64, &Grads<Cpu>), what: &str) {
    close(got.0, want.0, &format!("{what}: loss"));
    assert_eq!(got.1.by_path.len(), want.1.by_path.len(), "{what}: the same parameters get gradients");
    for (path, g) in &got.1.by_path {
        let w: Vec<f32> = want.1.by_path[path].clone().into_data().to_vec().unwrap();
        let g: Vec<f32> = g.clone().into_data().to_vec().unwrap();
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let diff = g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: gradient of {path} differs by {diff:e} (max {scale:e})");
    }
}

#[test]
fn fused_cross_entropy_gives_the_loss_and_gradients_of_the_logits() {
    // Full tuning: the tied head's gradient reaches the embedding through the fused kernel's dW;
    // with and without recompute (the head is outside the recomputed layers either way).
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (dropout, groups) in [(None, vec![]), (None, vec![0..2]), (Some(0.0), vec![0..1])] {
        let run = |fused: bool| {
            let (mut t, rows, pad) = tiny_trainer_with(dropout, groups.clone());
            t.fused_cross_entropy = fused;
            t.gradients(1, &batch::padded(&rows, 4, pad)).unwrap()
        };
        let (plain, fused) = (run(false), run(true));
        let what = format!("lora {dropout:?}, recompute {groups:?}");
        same_gradients((fused.0, &fused.1), (plain.0, &plain.1), &what);
        if dropout.is_none() {
            assert!(fused.1.by_path.contains_key("embed_tokens"), "{what}: the tied head's gradient");
        }
    }
}

#[test]
fn router_load_balancing_loss_reaches_the_routers_alike_with_recompute() {
    // Full tuning trains the routers. The loss adds coef x the load-balancing loss, whose
    // gradient reaches every router; recomputed layers add their routers' terms in their
    // replayed backward and give the gradients of kept layers.
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = |coef: f64, groups: Vec<std::ops::Range<usize>>| {
        let (mut t, rows, pad) = tiny_trainer_with(None, groups);
        t.router_aux_loss_coef = coef;
        t.gradients(1, &batch::padded(&rows, 4, pad)).unwrap()
    };
    let (plain, balanced) = (run(0.0, vec![]), run(0.5, vec![]));
    // Above k = 2 unless every expert gets exactly its share (Switch's loss at balance is k).
    let aux = (balanced.0 - plain.0) / 0.5;
    eprintln!("load-balancing loss {aux}");
    assert!(aux > 1.0 && aux < 16.0, "load-balancing loss {aux}");
    let router = "layers.0.moe.gate.weight";
    let (a, b): (Vec<f32>, Vec<f32>) = (plain.1.by_path[router].clone().into_data().to_vec().unwrap(), balanced.1.by_path[router].clone().into_data().to_vec().unwrap());
    let moved = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(moved > 1e-4, "the router's gradient moved by {moved:e}");
    for groups in [vec![0..1, 1..2], vec![0..2], vec![1..2]] {
        let got = run(0.5, groups.clone());
        same_gradients((got.0, &got.1), (balanced.0, &balanced.1), &format!("router loss, recompute {groups:?}"));
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{what}: {a} vs {b}");
}

#[test]
fn accumulation_and_packing_keep_the_per_token_loss_of_the_global_batch() {
    // The same 8 rows as 2 padded micro batches of 4, 1 padded batch of 8, or packed into
    // sequences of 512: the same loss, gradient norm and update.
    let layouts: Vec<(&str, Box<dyn Fn(&[Sample], u32) -> Vec<Batch>>)> = vec![
        ("2 x 4 padded", Box::new(|rows, pad| batch::padded(rows, 4, pad))),
        ("1 x 8 padded", Box::new(|rows, pad| batch::padded(rows, 8, pad))),
        ("packed", Box::new(|rows, pad| batch::packed(rows, 2, 512, pad))),
    ];
    let mut results = Vec::new();
    for (name, layout) in &layouts {
        let (mut t, rows, pad) = tiny_trainer();
        let batches = layout(&rows, pad);
        let s1 = t.step(1, &batches).unwrap();
        let s2 = t.step(2, &batches).unwrap();
        results.push((name, s1, s2));
    }
    let (_, a1, a2) = &results[0];
    assert!(a2.loss < a1.loss);
    for (name, s1, s2) in &results[1..] {
        assert_eq!(s1.tokens, a1.tokens, "{name}");
        close(s1.loss, a1.loss, &format!("{name} step-1 loss"));
        close(s1.grad_norm, a1.grad_norm, &format!("{name} grad norm"));
        close(s2.loss, a2.loss, &format!("{name} step-2 loss (after the update)"));
    }
}

#[test]
fn full_fine_tuning_writes_transformers_weights() {
    let out = tempfile::tempdir().unwrap();
    let o = train(&load(out.path(), &["train.tuning=\"full\"", "train.max_steps=10", "optimizer.lr=1e-3"]), None, None).unwrap();
    assert!(o.losses[9] < o.losses[0], "{:?}", o.losses);
    let t = ckpt::read_safetensors(&o.last_checkpoint.join(ckpt::MODEL_WEIGHTS)).unwrap();
    assert_eq!(t["model.embed_tokens.weight"].0, [512, 64]);
    assert_eq!(t["model.layers.0.self_attn.q_proj.weight"].0, [64, 64], "[out, in] as transformers stores it");
    assert_eq!(t["model.layers.0.self_attn.k_proj.weight"].0, [32, 64]);
    assert_eq!(t["model.layers.1.mlp.experts.3.down_proj.weight"].0, [64, 32]);
    assert_eq!(t["model.layers.1.mlp.gate.weight"].0, [8, 64]);
    assert_eq!(t["model.norm.weight"].0, [64]);
    assert!(!t.contains_key("lm_head.weight"), "tied head");
    assert!(o.last_checkpoint.join("config.json").is_file());
    // A full run continues as a full run: a LoRA recipe cannot continue it.
    let e = train(&load(out.path(), &["train.max_steps=10"]), Some(o.run_dir.clone()), None).unwrap_err().to_string();
    assert!(e.contains("a resumed run continues exactly"), "{e}");
}

#[test]
fn finetune_start_from_an_adapter_checks_it() {
    let out = tempfile::tempdir().unwrap();
    let o = train(&load(out.path(), &["train.max_steps=2"]), None, None).unwrap();
    let dir = o.last_checkpoint.display().to_string();
    // Weights only: a new run folder, step 1 again, same adapter as the start.
    let f = train(&load(out.path(), &["train.max_steps=2", &format!("checkpoint.resume=\"{dir}\"")]), None, None).unwrap();
    assert_ne!(f.run_dir, o.run_dir);
    assert_eq!(f.losses.len(), 2);
    assert!(f.losses[0] < o.losses[0], "starts from the trained adapter: {} vs {}", f.losses[0], o.losses[0]);
    // An adapter of another rank is refused with both values named.
    let e = train(&load(out.path(), &["train.max_steps=2", "lora.rank=4", &format!("checkpoint.resume=\"{dir}\"")]), None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json") && e.contains("lora.rank = 4"), "{e}");
    // A different seed cannot continue a run exactly.
    let e = train(&load(out.path(), &["train.max_steps=4", "train.seed=1"]), Some(o.run_dir.clone()), None).unwrap_err().to_string();
    assert!(e.contains("train.seed"), "{e}");
}

/// Every float parameter of the trainer's model, in visiting order.
fn parameter_values(t: &Trainer<Cpu>) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<B, D>>) {
            self.0.push(param.val().into_data().convert::<f32>().to_vec().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    burn::module::Module::visit(t.model(), &mut c);
    c.0
}

/// Data parallelism on 2 thread ranks over loopback TCP: each rank runs one of the global
/// batch's two micro batches; every step's loss, token count and gradient norm, and every
/// parameter after the steps, equal one rank running both (1e-5 relative: the ranks' sums meet
/// in another order).
#[test]
fn data_parallel_ranks_train_as_one_rank() {
    use std::sync::Arc;
    use trainer::parallel::comm::Communicator;
    const STEPS: usize = 3;
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = |t: &mut Trainer<Cpu>, micro: &[Batch]| (1..=STEPS).map(|s| t.step(s, micro).unwrap()).collect::<Vec<_>>();
    let (want_stats, want_params) = {
        let (mut t, rows, pad) = tiny_trainer();
        let micro = batch::padded(&rows, 4, pad);
        assert_eq!(micro.len(), 2);
        (run(&mut t, &micro), parameter_values(&t))
    };
    let ranks = on_thread_ranks(2, move |rank, comm| {
        let (mut t, rows, pad) = tiny_trainer();
        t.data_parallel = Some(trainer::parallel::regions::GroupComm::new(Arc::new(comm) as Arc<dyn Communicator<Cpu>>));
        let micro = batch::padded(&rows, 4, pad);
        let stats = run(&mut t, &micro[rank..rank + 1]);
        (stats, parameter_values(&t))
    });
    for (rank, (stats, params)) in ranks.into_iter().enumerate() {
        for (s, (got, want)) in stats.iter().zip(&want_stats).enumerate() {
            let what = format!("rank {rank}, step {}", s + 1);
            assert_eq!(got.tokens, want.tokens, "{what}: the global batch's tokens");
            close(got.loss, want.loss, &format!("{what}: loss"));
            close(got.grad_norm, want.grad_norm, &format!("{what}: gradient norm"));
        }
        assert_eq!(params.len(), want_params.len());
        for (i, (g, w)) in params.iter().zip(&want_params).enumerate() {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-5 * scale, "rank {rank}: parameter {i} differs by {diff:e} (max {scale:e})");
        }
    }
}

/// The distributed optimizer on 2 and 4 thread ranks, full fine-tuning (every weight's state
/// dealt over the ranks) and LoRA: every step's loss and gradient norm, and every parameter
/// after the steps, equal one rank running the whole global batch (1e-5 relative); each rank
/// keeps the state of its own parameters only, and the ranks' shares cover every parameter once.
/// Parameters within 2e-4 of their largest value: AdamW's scale-free update turns last-bit
/// differences of near-zero gradients (the ranks' sums meet in another order) into weight
/// differences up to the learning rate.
#[test]
fn distributed_optimizer_ranks_train_as_one_rank() {
    use std::sync::Arc;
    use trainer::parallel::comm::Communicator;
    const STEPS: usize = 3;
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let run = |t: &mut Trainer<Cpu>, micro: &[Batch]| (1..=STEPS).map(|s| t.step(s, micro).unwrap()).collect::<Vec<_>>();
    for tuning in [&["train.tuning=\"full\""][..], &[]] {
        let (want_stats, want_params, want_state) = {
            let (mut t, rows, pad) = tiny_trainer_in(tuning, Layout::SINGLE, vec![]);
            let micro = batch::padded(&rows, 2, pad);
            assert_eq!(micro.len(), 4);
            let stats = run(&mut t, &micro);
            let state: std::collections::BTreeSet<String> = t.optimizer.state.keys().cloned().collect();
            (stats, parameter_values(&t), state)
        };
        for world in [2, 4] {
            let ranks = on_thread_ranks(world, move |rank, comm| {
                let (mut t, rows, pad) = tiny_trainer_in(tuning, Layout::SINGLE, vec![]);
                t.data_parallel = Some(trainer::parallel::regions::GroupComm::new(Arc::new(comm) as Arc<dyn Communicator<Cpu>>));
                t.set_distributed_optimizer();
                let micro = batch::padded(&rows, 2, pad);
                let per = micro.len() / world;
                t.micro_batch_place = (rank * per, 1);
                let stats = run(&mut t, &micro[rank * per..(rank + 1) * per]);
                let shares = t.optimizer_shares().expect("the state is dealt");
                (stats, parameter_values(&t), t.optimizer.state.keys().cloned().collect::<Vec<_>>(), shares)
            });
            let what = format!("{tuning:?}, {world} ranks");
            let mut owned: Vec<String> = ranks.iter().flat_map(|r| r.2.clone()).collect();
            owned.sort();
            assert_eq!(owned, want_state.iter().cloned().collect::<Vec<_>>(), "{what}: each parameter's state on one rank");
            let shares = &ranks[0].3;
            assert!(shares.iter().all(|&n| n > 0), "{what}: every rank owns state: {shares:?}");
            for (rank, (stats, params, _, _)) in ranks.into_iter().enumerate() {
                for (s, (got, want)) in stats.iter().zip(&want_stats).enumerate() {
                    let what = format!("{what}, rank {rank}, step {}", s + 1);
                    assert_eq!(got.tokens, want.tokens, "{what}: the global batch's tokens");
                    close(got.loss, want.loss, &format!("{what}: loss"));
                    close(got.grad_norm, want.grad_norm, &format!("{what}: gradient norm"));
                }
                for (i, (g, w)) in params.iter().zip(&want_params).enumerate() {
                    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
                    let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 2e-4 * scale, "{what}, rank {rank}: parameter {i} differs by {diff:e} (max {scale:e})");
                }
            }
        }
    }
}

/// `f(rank, communicator)` on `world` thread ranks that meet over loopback TCP.
fn on_thread_ranks<T: Send + 'static>(world: usize, f: impl Fn(usize, trainer::parallel::tcp::TcpCommunicator) -> T + Send + Sync + 'static) -> Vec<T> {
    use trainer::parallel::rendezvous::{self, RendezvousConfig};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (f, mut listener) = (std::sync::Arc::new(f), Some(listener));
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let (f, listener) = (f.clone(), if rank == 0 { listener.take() } else { None });
            std::thread::spawn(move || {
                let cfg = RendezvousConfig {
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    rank,
                    world,
                    fingerprint: "tiny".into(),
                    timeout: std::time::Duration::from_secs(60),
                    collective_timeout: std::time::Duration::from_secs(60),
                };
                let comm = match listener {
                    Some(l) => rendezvous::serve(l, &cfg),
                    None => rendezvous::connect(&cfg),
                };
                f(rank, comm.unwrap())
            })
        })
        .collect();
    ranks.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A LoRA trainer (dropout off) on the tiny recipe with `sets`, holding `layout`'s slices, and
/// the recipe's first 8 rows; every weight trained instead when `sets` says
/// `train.tuning="full"`.
fn tiny_trainer_in(sets: &[&str], layout: Layout, recompute: Vec<std::ops::Range<usize>>) -> (Trainer<Cpu>, Vec<Sample>, u32) {
    let out = tempfile::tempdir().unwrap();
    let r = load(out.path(), sets).recipe;
    let plan = model::plan(&r.model, &Registry::builtin(), Fetch::All).unwrap();
    let mut m = model::build::<Autodiff<Cpu>>(&plan, &r.model, layout, &Default::default()).unwrap();
    if r.train.tuning == trainer::recipe::Tuning::Lora {
        let cfg = LoraConfig { rank: 8, scale: 4.0, dropout: 0.0, seed: 3 };
        m = lora::apply(m, &LoraTargets::parse(&["all-linear".to_string()]).unwrap(), &cfg).unwrap().0;
    }
    let opt = AdamW::new(AdamWConfig::from(&r.optimizer));
    let schedule = LrSchedule::new(&r.optimizer, &r.schedule, 10);
    let prepared = trainer::data::prepare(&r, Path::new("assets/tiny/tokenizer.json")).unwrap();
    (Trainer::new(m, opt, schedule, 1.0, 5, recompute, Default::default()), prepared.train[..8].to_vec(), prepared.pad_id)
}

/// Every float parameter of the trainer's model by Burn path: shape and values.
fn parameters_by_path(t: &Trainer<Cpu>) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    struct Collect(Vec<String>, std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<B, D>>) {
            let v = param.val();
            self.1.insert(self.0.join("."), (v.dims().to_vec(), v.into_data().convert::<f32>().to_vec().unwrap()));
        }
    }
    let mut c = Collect(Vec::new(), Default::default());
    burn::module::Module::visit(t.model(), &mut c);
    c.1
}

/// Block `rank` of `parts` along `dim` of a 1-D or 2-D row-major tensor of `dims`.
fn block_of(dims: &[usize], values: &[f32], dim: usize, rank: usize, parts: usize) -> Vec<f32> {
    match dims {
        [n] => values[rank * n / parts..(rank + 1) * n / parts].to_vec(),
        [rows, cols] if dim == 0 => values[rank * rows / parts * cols..(rank + 1) * rows / parts * cols].to_vec(),
        [rows, cols] => (0..*rows).flat_map(|r| values[r * cols + rank * cols / parts..r * cols + (rank + 1) * cols / parts].to_vec()).collect(),
        _ => panic!("parameters are 1-D or 2-D, not {dims:?}"),
    }
}

/// Tensor parallelism on 2 thread ranks, with and without sequence parallelism, on the tiny MoE
/// model (experts whole on each rank) and on it as a dense Qwen3 (per-head q/k norms), its
/// embedding and head split by vocabulary (tied, and an untied head), LoRA and every weight
/// trained (embeddings, norms and biases included): the loss
/// equals one rank's and each rank's gradients are its slices of one rank's, within 1e-5 of each
/// tensor's largest value (the partial sums meet in another order). Odd row lengths exercise the
/// padding sequence parallelism adds. One backward per thread rank (see
/// `src/parallel/layers_tests.rs` for why); steps, recompute and checkpoints run as processes in
/// `tests/reliability.rs`.
#[test]
fn tensor_parallel_ranks_compute_one_ranks_gradients() {
    use std::sync::Arc;
    use trainer::parallel::comm::Communicator;
    use trainer::parallel::regions::GroupComm;
    use trainer::parallel::tensor::TensorParallel;
    use trainer::parallel::ProcessGroup;
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dense: &'static [&'static str] = &["model.config.model_type=\"qwen3\""];
    let untied: &'static [&'static str] = &["model.config.model_type=\"qwen3\"", "model.config.tie_word_embeddings=false"];
    let full: &'static [&'static str] = &["model.config.model_type=\"qwen3\"", "model.config.tie_word_embeddings=false", "train.tuning=\"full\""];
    let full_moe: &'static [&'static str] = &["train.tuning=\"full\""];
    let grads_of = |t: &Trainer<Cpu>, micro: &[Batch]| -> (f64, std::collections::BTreeMap<String, Vec<f32>>) {
        let (loss, g) = t.gradients(1, micro).unwrap();
        (loss, g.by_path.into_iter().map(|(p, g)| (p, g.into_data().to_vec::<f32>().unwrap())).collect())
    };
    let full_tied: &'static [&'static str] = &["model.config.model_type=\"qwen3\"", "train.tuning=\"full\""];
    for (sets, sp) in [(full_tied, false), (full_tied, true), (full_moe, false), (&[][..], false), (&[][..], true), (dense, false), (dense, true), (untied, true), (full, false), (full, true), (full_moe, true)] {
        let what = format!("{sets:?}, sequence parallel {sp}");
        let (want_loss, want_grads, dims) = {
            let (t, rows, pad) = tiny_trainer_in(sets, Layout::SINGLE, vec![]);
            let (loss, grads) = grads_of(&t, &batch::padded(&rows, 4, pad)[..1]);
            (loss, grads, parameters_by_path(&t))
        };
        let got = on_thread_ranks(2, move |rank, comm| {
            let layout = Layout { tensor: ProcessGroup::new(rank, 2), ..Layout::SINGLE };
            let (mut t, rows, pad) = tiny_trainer_in(sets, layout, vec![]);
            t.set_tensor_parallel(TensorParallel::new(GroupComm::new(Arc::new(comm) as Arc<dyn Communicator<Cpu>>), sp));
            let (loss, grads) = grads_of(&t, &batch::padded(&rows, 4, pad)[..1]);
            (loss, grads, t.grad_placement().unwrap().sharded.clone())
        });
        for (rank, (loss, grads, split)) in got.iter().enumerate() {
            close(*loss, want_loss, &format!("{what}: rank {rank}: loss"));
            assert!(split.keys().any(|p| p.ends_with("q_proj.lora.lora_b")) && split.keys().any(|p| p.ends_with("o_proj.lora.lora_a")), "{what}: {split:?}");
            assert_eq!(grads.keys().collect::<Vec<_>>(), want_grads.keys().collect::<Vec<_>>(), "{what}");
            for (path, want) in &want_grads {
                let want = match split.get(path) {
                    Some(&dim) => block_of(&dims[path].0, want, dim, rank, 2),
                    None => want.clone(),
                };
                let got = &grads[path];
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
                let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(got.len() == want.len() && diff <= 1e-5 * scale, "{what}: rank {rank}: the gradient of {path} differs by {diff:e} (max {scale:e})");
            }
        }
    }
}

/// Expert parallelism on 2 thread ranks (data 2 x expert 2: each rank its own micro batch and
/// half the experts, tokens travelling to their experts and back by all-to-all): the global
/// batch's loss equals one rank running both micro batches, the dense gradients (summed over
/// the data-parallel ranks) equal its, and each rank's experts' gradients equal its for the
/// same experts (1e-5 of each tensor's largest value). One backward per thread rank (see
/// `src/parallel/layers_tests.rs`); steps and checkpoints run as processes in
/// `tests/reliability.rs`.
#[test]
fn expert_parallel_ranks_compute_one_ranks_gradients() {
    use std::sync::Arc;
    use trainer::parallel::comm::Communicator;
    use trainer::parallel::regions::GroupComm;
    use trainer::parallel::ProcessGroup;
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let grads_of = |t: &Trainer<Cpu>, micro: &[Batch]| -> (f64, std::collections::BTreeMap<String, Vec<f32>>) {
        let (loss, g) = t.gradients(1, micro).unwrap();
        (loss, g.by_path.into_iter().map(|(p, g)| (p, g.into_data().to_vec::<f32>().unwrap())).collect())
    };
    let (want_loss, want_grads) = {
        let (t, rows, pad) = tiny_trainer_in(&[], Layout::SINGLE, vec![]);
        grads_of(&t, &batch::padded(&rows, 4, pad))
    };
    let got = on_thread_ranks(2, move |rank, comm| {
        let group = |c: trainer::parallel::tcp::TcpCommunicator| GroupComm::new(Arc::new(c) as Arc<dyn Communicator<Cpu>>);
        let layout = Layout { data: ProcessGroup::new(rank, 2), expert: ProcessGroup::new(rank, 2), ..Layout::SINGLE };
        let (mut t, rows, pad) = tiny_trainer_in(&[], layout, vec![]);
        let expert = group(comm.split("expert", &[0, 1]).unwrap());
        let expert_data = group(comm.split("expert-data", &[rank]).unwrap());
        t.set_expert_parallel(expert, expert_data);
        t.data_parallel = Some(group(comm));
        t.micro_batch_place = (rank, 2);
        let micro = batch::padded(&rows, 4, pad);
        grads_of(&t, &micro[rank..rank + 1])
    });
    for (rank, (loss, grads)) in got.iter().enumerate() {
        close(*loss, want_loss, &format!("rank {rank}: loss"));
        let mut seen = 0;
        for (path, g) in grads {
            // The tiny model's 8 experts: local expert e of rank r is expert 4 r + e; a stacked
            // expert adapter's gradient is rank r's block of the one-rank stack's.
            let global = match path.split_once(".moe.experts.") {
                Some((head, rest)) => {
                    let (e, tail) = rest.split_once('.').unwrap();
                    format!("{head}.moe.experts.{}.{tail}", 4 * rank + e.parse::<usize>().unwrap())
                }
                None => path.clone(),
            };
            let want = &want_grads[&global];
            let want = match trainer::lora::stacked_factor(path) {
                Some(_) => &want[rank * want.len() / 2..(rank + 1) * want.len() / 2],
                None => &want[..],
            };
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
            let diff = g.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(g.len() == want.len() && diff <= 1e-5 * scale, "rank {rank}: the gradient of {path} (one rank's {global}) differs by {diff:e} (max {scale:e})");
            seen += 1;
        }
        let dense = want_grads.keys().filter(|p| !p.contains(".moe.experts.")).count();
        let experts = want_grads.len() - dense;
        assert!(want_grads.keys().any(|p| trainer::lora::stacked_factor(p).is_some()), "the experts are adapted");
        assert_eq!(seen, dense + experts / 2, "rank {rank}: its dense gradients (stacked experts' blocks among them) and half the experts'");
    }
}
