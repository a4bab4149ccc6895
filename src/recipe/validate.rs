//! Ranges and cross-field rules, checked before any weight is touched. Rules that need the
//! model's config (heads divisible by the tensor size, experts by the expert size) are checked
//! by the model code once the config is read.
//!
//! Not errors, by design: `train.max_steps` set beside `train.max_epochs` (steps win), and a
//! `[lora]` with `train.tuning = "full"` (ignored, so not checked either).

use super::schema::{DatasetSpec, Init, Recipe, Tuning};

/// A broken rule: the key to blame (its origin is looked up by the caller) and what is wrong
/// and what would be valid.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub key: String,
    pub message: String,
}

fn ensure(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), Problem> {
    if ok {
        Ok(())
    } else {
        Err(Problem { key: key.to_string(), message: message() })
    }
}

/// Check `r` and fill in derived defaults (`train.global_batch_size`).
pub(crate) fn check(mut r: Recipe) -> Result<Recipe, Problem> {
    check_counts(&r)?;
    check_parallel(&r)?;
    if r.train.tuning == Tuning::Lora {
        check_lora(&r)?;
    }
    // Data before train: train.eval_interval's rule reads data.val_split, which must be valid
    // first to be blamed for itself.
    check_data(&r)?;
    check_train(&r)?;
    check_optimizer(&r)?;
    check_schedule(&r)?;
    check_model(&r)?;
    check_logging(&r)?;
    let per_step = r.train.micro_batch_size.saturating_mul(r.parallel.data);
    r.train.global_batch_size = Some(r.train.global_batch_size.unwrap_or(per_step));
    Ok(r)
}

/// Whether the whole-number key `key` must be 1 or more (so a type error says so rather than
/// ">= 0").
pub(crate) fn must_be_positive(key: &str) -> bool {
    key.starts_with("parallel.")
        || [
            "train.micro_batch_size",
            "train.global_batch_size",
            "train.max_epochs",
            "train.max_steps",
            "train.eval_interval",
            "train.recompute.num_layers",
            "checkpoint.save_interval",
            "checkpoint.save_total_limit",
            "data.num_workers",
            "data.num_proc",
            "logging.interval",
            "lora.rank",
        ]
        .contains(&key)
}

/// The most threads a data key may ask for.
const MAX_THREADS: usize = 1024;

/// Counts that must be 1 or more.
fn check_counts(r: &Recipe) -> Result<(), Problem> {
    let (p, t) = (&r.parallel, &r.train);
    let optional = [
        ("train.max_steps", t.max_steps, ""),
        ("train.eval_interval", t.eval_interval, " (or remove it to turn evaluation off)"),
        ("checkpoint.save_interval", r.checkpoint.save_interval, " (or remove it to save only at the end)"),
        ("checkpoint.save_total_limit", r.checkpoint.save_total_limit, " (or remove it to keep every checkpoint)"),
    ];
    for (key, v) in [
        ("parallel.data", p.data),
        ("parallel.tensor", p.tensor),
        ("parallel.pipeline", p.pipeline),
        ("parallel.expert", p.expert),
        ("parallel.context", p.context),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.recompute.num_layers", t.recompute.num_layers),
        ("data.num_workers", r.data.num_workers),
        ("data.num_proc", r.data.num_proc),
        ("logging.interval", r.logging.interval),
    ] {
        ensure(v >= 1, key, || format!("is {v}; expected 1 or more"))?;
    }
    for (key, v, hint) in optional {
        if let Some(v) = v {
            ensure(v >= 1, key, || format!("is {v}; expected 1 or more{hint}"))?;
        }
    }
    for (key, v) in [("data.num_workers", r.data.num_workers), ("data.num_proc", r.data.num_proc)] {
        ensure(v <= MAX_THREADS, key, || format!("is {v}; expected 1 to {MAX_THREADS} (threads of this process)"))?;
    }
    if t.max_steps.is_none() {
        ensure(t.max_epochs >= 1, "train.max_epochs", || {
            format!("is {}; expected 1 or more (or set train.max_steps)", t.max_epochs)
        })?;
    }
    Ok(())
}

fn check_parallel(r: &Recipe) -> Result<(), Problem> {
    let p = &r.parallel;
    ensure(p.pipeline == 1, "parallel.pipeline", || {
        format!(
            "is {}; pipeline parallelism is not supported yet, expected 1 (split the model with parallel.tensor \
             and parallel.expert instead)",
            p.pipeline
        )
    })?;
    let dc = p.data.saturating_mul(p.context);
    ensure(dc.is_multiple_of(p.expert), "parallel.expert", || {
        format!(
            "is {}; expert parallelism reuses the data x context ranks (parallel.data x parallel.context = {} x {} \
             = {dc}), so expected a divisor of {dc}",
            p.expert, p.data, p.context
        )
    })?;
    ensure(!p.sequence_parallel || p.tensor > 1, "parallel.sequence_parallel", || {
        "is true but parallel.tensor is 1; sequence parallelism splits activations across the tensor-parallel \
         group, so expected parallel.tensor > 1 or sequence_parallel = false"
            .to_string()
    })
}

fn check_lora(r: &Recipe) -> Result<(), Problem> {
    let l = &r.lora;
    ensure((1..=MAX_LORA_RANK).contains(&l.rank), "lora.rank", || {
        format!("is {}; expected 1 to {MAX_LORA_RANK} (8 to 64 is usual)", l.rank)
    })?;
    finite(l.alpha, "lora.alpha")?;
    finite(l.dropout, "lora.dropout")?;
    ensure(l.alpha > 0.0, "lora.alpha", || format!("is {}; expected > 0", l.alpha))?;
    ensure((0.0..1.0).contains(&l.dropout), "lora.dropout", || format!("is {}; expected in [0, 1)", l.dropout))?;
    ensure(!l.targets.is_empty(), "lora.targets", || {
        "is empty; expected [\"all-linear\"], module names like \"q_proj\", or \"re:<regex>\"".to_string()
    })?;
    for (i, t) in l.targets.iter().enumerate() {
        let key = format!("lora.targets[{i}]");
        ensure(!t.trim().is_empty(), &key, || {
            "is empty; expected `all-linear`, a module name like `q_proj`, or `re:<regex>`".to_string()
        })?;
        if let Some(re) = t.strip_prefix("re:") {
            if let Err(e) = regex::Regex::new(&format!("^(?:{re})$")) {
                return Err(Problem { key, message: format!("`{t}` is not a valid regex: {e}; expected `re:<regex>`") });
            }
        }
    }
    for (i, m) in l.modules_to_save.iter().enumerate() {
        ensure(!m.trim().is_empty(), &format!("lora.modules_to_save[{i}]"), || {
            "is empty; expected a module name like `embed_tokens` or `lm_head`".to_string()
        })?;
    }
    Ok(())
}

fn check_train(r: &Recipe) -> Result<(), Problem> {
    let t = &r.train;
    finite(t.gradient_clip, "train.gradient_clip")?;
    ensure(t.max_length >= 16, "train.max_length", || format!("is {}; expected 16 or more tokens", t.max_length))?;
    ensure(t.gradient_clip >= 0.0, "train.gradient_clip", || {
        format!("is {}; expected >= 0 (0 turns clipping off)", t.gradient_clip)
    })?;
    if let Some(coef) = t.router_aux_loss_coef {
        finite(coef, "train.router_aux_loss_coef")?;
        ensure(coef >= 0.0, "train.router_aux_loss_coef", || format!("is {coef}; expected >= 0 (0 turns the loss off)"))?;
        ensure(coef == 0.0 || !r.parallel.sequence_parallel, "train.router_aux_loss_coef", || {
            format!(
                "is {coef} with parallel.sequence_parallel = true: the load-balancing loss over sequence shards is not \
                 supported yet; set train.router_aux_loss_coef = 0 or parallel.sequence_parallel = false"
            )
        })?;
    }
    let per_step = t.micro_batch_size.saturating_mul(r.parallel.data);
    if let Some(global) = t.global_batch_size {
        ensure(global >= 1 && global.is_multiple_of(per_step), "train.global_batch_size", || {
            format!(
                "is {global}; expected a multiple of train.micro_batch_size x parallel.data = {} x {} = {per_step} \
                 (the quotient is the gradient-accumulation steps)",
                t.micro_batch_size, r.parallel.data
            )
        })?;
    }
    if let Some(n) = t.eval_interval {
        ensure(r.data.val_split > 0.0, "train.eval_interval", || {
            format!(
                "is {n} but data.val_split is 0, so there is nothing to evaluate on; expected data.val_split in \
                 (0, 1), or remove train.eval_interval"
            )
        })?;
    }
    Ok(())
}

fn check_optimizer(r: &Recipe) -> Result<(), Problem> {
    let o = &r.optimizer;
    for (key, v) in [
        ("optimizer.lr", o.lr),
        ("optimizer.min_lr", o.min_lr),
        ("optimizer.weight_decay", o.weight_decay),
        ("optimizer.beta1", o.beta1),
        ("optimizer.beta2", o.beta2),
        ("optimizer.eps", o.eps),
    ] {
        finite(v, key)?;
    }
    ensure(o.lr > 0.0, "optimizer.lr", || format!("is {}; expected > 0", o.lr))?;
    ensure((0.0..=o.lr).contains(&o.min_lr), "optimizer.min_lr", || {
        format!("is {}; expected in [0, optimizer.lr = {}]", o.min_lr, o.lr)
    })?;
    ensure(o.weight_decay >= 0.0, "optimizer.weight_decay", || format!("is {}; expected >= 0", o.weight_decay))?;
    ensure((0.0..1.0).contains(&o.beta1), "optimizer.beta1", || format!("is {}; expected in [0, 1)", o.beta1))?;
    ensure((0.0..1.0).contains(&o.beta2), "optimizer.beta2", || format!("is {}; expected in [0, 1)", o.beta2))?;
    ensure(o.eps > 0.0, "optimizer.eps", || format!("is {}; expected > 0", o.eps))
}

fn check_schedule(r: &Recipe) -> Result<(), Problem> {
    let s = &r.schedule;
    if let Some(f) = s.warmup_fraction {
        finite(f, "schedule.warmup_fraction")?;
        ensure((0.0..=1.0).contains(&f), "schedule.warmup_fraction", || format!("is {f}; expected in [0, 1]"))?;
        ensure(s.warmup_steps.is_none(), "schedule.warmup_steps", || {
            "is set together with schedule.warmup_fraction; expected one of them, not both".to_string()
        })?;
    }
    if let (Some(w), Some(max)) = (s.warmup_steps, r.train.max_steps) {
        ensure(w <= max, "schedule.warmup_steps", || format!("is {w}; expected at most train.max_steps = {max}"))?;
    }
    Ok(())
}

fn check_data(r: &Recipe) -> Result<(), Problem> {
    let d = &r.data;
    finite(d.val_split, "data.val_split")?;
    ensure((0.0..1.0).contains(&d.val_split), "data.val_split", || format!("is {}; expected in [0, 1)", d.val_split))?;
    for (i, ds) in d.datasets.iter().enumerate() {
        DatasetSpec::parse(ds).map_err(|message| Problem { key: format!("data.datasets[{i}]"), message })?;
    }
    Ok(())
}

fn check_model(r: &Recipe) -> Result<(), Problem> {
    let m = &r.model;
    match m.init {
        Init::Pretrained => ensure(m.path.is_some(), "model.path", || {
            "is missing; model.init = \"pretrained\" loads the weights from it, so expected a folder or hub id \
             (or set model.init = \"random\")"
                .to_string()
        })?,
        Init::Random => ensure(m.path.is_some() || m.config.is_some(), "model.config", || {
            "is missing; model.init = \"random\" needs an architecture, so expected [model.config] or a model.path \
             with a config.json"
                .to_string()
        })?,
    }
    for (key, v) in [("model.model_name", &m.model_name), ("model.model_author", &m.model_author)] {
        ensure(v.len() <= 2, key, || {
            format!("has {} values; expected [Chinese, English] or one value for both", v.len())
        })?;
    }
    Ok(())
}

/// The largest LoRA rank accepted before the model is known (the model check then bounds it by
/// the layers it adapts).
const MAX_LORA_RANK: usize = 1 << 16;

fn check_logging(r: &Recipe) -> Result<(), Problem> {
    let f = &r.logging.metrics_file;
    let path = std::path::Path::new(f);
    let inside = !f.trim().is_empty()
        && !f.ends_with('/')
        && path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    ensure(inside, "logging.metrics_file", || {
        format!("is \"{f}\"; expected a file name inside the run folder, such as \"metrics.jsonl\" (no `..`, not absolute)")
    })
}

fn finite(v: f64, key: &str) -> Result<(), Problem> {
    ensure(v.is_finite(), key, || format!("is {v}; expected a finite number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = fn(&mut Recipe);

    fn ok() -> Recipe {
        let mut r = Recipe::default();
        r.model.path = Some("m".into());
        r
    }

    fn key_of(r: Recipe) -> String {
        match check(r) {
            Ok(_) => "no error".into(),
            Err(p) => p.key,
        }
    }

    #[test]
    fn defaults_with_a_model_pass_and_fill_the_global_batch() {
        let mut r = ok();
        r.train.micro_batch_size = 3;
        r.parallel.data = 2;
        assert_eq!(check(r).map(|r| r.train.global_batch_size), Ok(Some(6)));
        assert_eq!(key_of(Recipe::default()), "model.path");
    }

    #[test]
    fn each_rule_blames_its_key() {
        let cases: Vec<(&str, Change)> = vec![
            ("parallel.tensor", |r| r.parallel.tensor = 0),
            ("parallel.pipeline", |r| r.parallel.pipeline = 2),
            ("parallel.expert", |r| (r.parallel.data, r.parallel.expert) = (2, 4)),
            ("parallel.sequence_parallel", |r| r.parallel.sequence_parallel = true),
            ("lora.rank", |r| r.lora.rank = 0),
            ("lora.alpha", |r| r.lora.alpha = 0.0),
            ("lora.dropout", |r| r.lora.dropout = 1.0),
            ("lora.targets", |r| r.lora.targets.clear()),
            ("lora.targets[1]", |r| r.lora.targets.push("re:(".into())),
            ("train.max_length", |r| r.train.max_length = 15),
            ("train.gradient_clip", |r| r.train.gradient_clip = -1.0),
            ("train.router_aux_loss_coef", |r| r.train.router_aux_loss_coef = Some(-0.1)),
            ("train.router_aux_loss_coef", |r| r.train.router_aux_loss_coef = Some(f64::NAN)),
            ("train.router_aux_loss_coef", |r| {
                (r.parallel.tensor, r.parallel.sequence_parallel, r.train.router_aux_loss_coef) = (2, true, Some(0.01))
            }),
            ("train.global_batch_size", |r| (r.train.micro_batch_size, r.train.global_batch_size) = (4, Some(6))),
            ("train.eval_interval", |r| r.train.eval_interval = Some(10)),
            ("train.max_epochs", |r| r.train.max_epochs = 0),
            ("optimizer.lr", |r| r.optimizer.lr = 0.0),
            ("optimizer.lr", |r| r.optimizer.lr = f64::INFINITY),
            ("optimizer.min_lr", |r| r.optimizer.min_lr = 1.0),
            ("optimizer.beta2", |r| r.optimizer.beta2 = 1.0),
            ("optimizer.eps", |r| r.optimizer.eps = 0.0),
            ("optimizer.weight_decay", |r| r.optimizer.weight_decay = -0.1),
            ("schedule.warmup_fraction", |r| r.schedule.warmup_fraction = Some(1.5)),
            ("schedule.warmup_steps", |r| (r.schedule.warmup_fraction, r.schedule.warmup_steps) = (Some(0.1), Some(3))),
            ("schedule.warmup_steps", |r| (r.train.max_steps, r.schedule.warmup_steps) = (Some(5), Some(6))),
            ("data.val_split", |r| r.data.val_split = 1.0),
            ("data.datasets[0]", |r| r.data.datasets = vec!["a#0".into()]),
            ("checkpoint.save_interval", |r| r.checkpoint.save_interval = Some(0)),
            ("model.config", |r| (r.model.path, r.model.init) = (None, Init::Random)),
            ("model.model_name", |r| r.model.model_name = vec!["a".into(), "b".into(), "c".into()]),
            ("lora.rank", |r| r.lora.rank = usize::MAX),
            ("data.num_proc", |r| r.data.num_proc = 1_000_000),
            ("logging.metrics_file", |r| r.logging.metrics_file = String::new()),
            ("logging.metrics_file", |r| r.logging.metrics_file = "../../x.jsonl".into()),
            ("logging.metrics_file", |r| r.logging.metrics_file = "/tmp/x.jsonl".into()),
            ("data.val_split", |r| (r.data.val_split, r.train.eval_interval) = (-0.5, Some(10))),
        ];
        for (key, break_it) in cases {
            let mut r = ok();
            break_it(&mut r);
            assert_eq!(key_of(r), key);
        }
    }

    #[test]
    fn allowed_combinations_pass() {
        let allowed: Vec<Change> = vec![
            |r| (r.parallel.data, r.parallel.context, r.parallel.expert) = (2, 3, 6),
            |r| (r.parallel.tensor, r.parallel.sequence_parallel) = (2, true),
            |r| (r.train.max_epochs, r.train.max_steps) = (0, Some(5)),
            |r| (r.train.tuning, r.lora.rank, r.lora.alpha) = (Tuning::Full, 0, -1.0),
            |r| (r.train.eval_interval, r.data.val_split) = (Some(5), 0.1),
            |r| (r.model.path, r.model.init, r.model.config) = (None, Init::Random, Some(toml::Table::new())),
            |r| r.train.gradient_clip = 0.0,
            |r| (r.parallel.tensor, r.parallel.sequence_parallel, r.train.router_aux_loss_coef) = (2, true, Some(0.0)),
            |r| r.optimizer.min_lr = r.optimizer.lr,
        ];
        for change in allowed {
            let mut r = ok();
            change(&mut r);
            assert_eq!(key_of(r), "no error");
        }
    }
}
