//! Ranges and cross-field rules, checked before any weight is touched. Rules that need the
//! model's config (heads divisible by the tensor size, experts by the expert size) are checked
//! by `model::check_layout` once the config is read.

use super::schema::{DatasetSpec, Init, Recipe};

/// `(key, what is wrong and what would be valid)`.
pub type Problem = (String, String);

fn range(ok: bool, key: &str, msg: impl Into<String>) -> Result<(), Problem> {
    if ok {
        Ok(())
    } else {
        Err((key.to_string(), msg.into()))
    }
}

/// Check `r` and fill in derived defaults (the global batch size).
pub fn validate(mut r: Recipe) -> Result<Recipe, Problem> {
    let p = &r.parallel;
    for (key, v) in [
        ("parallel.data", p.data),
        ("parallel.tensor", p.tensor),
        ("parallel.pipeline", p.pipeline),
        ("parallel.expert", p.expert),
        ("parallel.context", p.context),
        ("train.micro_batch_size", r.train.micro_batch_size),
        ("lora.rank", r.lora.rank),
        ("logging.interval", r.logging.interval),
        ("data.num_workers", r.data.num_workers),
        ("data.num_proc", r.data.num_proc),
    ] {
        range(v >= 1, key, format!("is {v}; expected 1 or more"))?;
    }
    range(p.pipeline == 1, "parallel.pipeline", format!(
        "is {}; pipeline parallelism is not supported yet, expected 1 (use tensor, expert or data parallelism)", p.pipeline))?;
    range((p.data * p.context) % p.expert == 0, "parallel.expert", format!(
        "is {}; expert parallelism borrows ranks from data x context = {} x {} = {}, so it must divide {}",
        p.expert, p.data, p.context, p.data * p.context, p.data * p.context))?;
    range(!p.sequence_parallel || p.tensor > 1, "parallel.sequence_parallel",
        "sequence parallelism splits activations across the tensor-parallel group; it needs parallel.tensor > 1 (or set it to false)")?;

    let l = &r.lora;
    range(l.alpha > 0.0, "lora.alpha", format!("is {}; expected > 0", l.alpha))?;
    range((0.0..1.0).contains(&l.dropout), "lora.dropout", format!("is {}; expected in [0, 1)", l.dropout))?;
    range(!l.targets.is_empty(), "lora.targets", "is empty; expected [\"all-linear\"], module names like \"q_proj\", or \"re:<regex>\"")?;

    let t = &r.train;
    range(t.max_length >= 16, "train.max_length", format!("is {}; expected 16 or more tokens", t.max_length))?;
    range(t.gradient_clip >= 0.0, "train.gradient_clip", format!("is {}; expected >= 0 (0 turns clipping off)", t.gradient_clip))?;
    range(t.recompute.num_layers >= 1, "train.recompute.num_layers", format!("is {}; expected 1 or more", t.recompute.num_layers))?;
    range(t.max_epochs >= 1 || t.max_steps.is_some(), "train.max_epochs", "is 0; expected 1 or more (or set train.max_steps)")?;
    if let Some(s) = t.max_steps {
        range(s >= 1, "train.max_steps", "is 0; expected 1 or more")?;
    }
    if let Some(s) = t.eval_interval {
        range(s >= 1, "train.eval_interval", "is 0; expected 1 or more (or remove it to turn evaluation off)")?;
    }
    let per_step = t.micro_batch_size * p.data;
    let global = t.global_batch_size.unwrap_or(per_step);
    range(global >= 1 && global % per_step == 0, "train.global_batch_size", format!(
        "is {global}; it must be a multiple of train.micro_batch_size x parallel.data = {} x {} = {per_step} \
         (gradient accumulation steps = global / that)", t.micro_batch_size, p.data))?;

    let o = &r.optimizer;
    range(o.lr > 0.0, "optimizer.lr", format!("is {}; expected > 0", o.lr))?;
    range(o.min_lr >= 0.0 && o.min_lr <= o.lr, "optimizer.min_lr", format!("is {}; expected in [0, optimizer.lr = {}]", o.min_lr, o.lr))?;
    range((0.0..1.0).contains(&o.beta1), "optimizer.beta1", format!("is {}; expected in [0, 1)", o.beta1))?;
    range((0.0..1.0).contains(&o.beta2), "optimizer.beta2", format!("is {}; expected in [0, 1)", o.beta2))?;
    range(o.eps > 0.0, "optimizer.eps", format!("is {}; expected > 0", o.eps))?;
    range(o.weight_decay >= 0.0, "optimizer.weight_decay", format!("is {}; expected >= 0", o.weight_decay))?;

    let s = &r.schedule;
    if let Some(f) = s.warmup_fraction {
        range((0.0..=1.0).contains(&f), "schedule.warmup_fraction", format!("is {f}; expected in [0, 1]"))?;
        range(s.warmup_steps.is_none(), "schedule.warmup_steps", "is set together with schedule.warmup_fraction; keep one of them")?;
    }

    let d = &r.data;
    range((0.0..1.0).contains(&d.val_split), "data.val_split", format!("is {}; expected in [0, 1)", d.val_split))?;
    for (i, ds) in d.datasets.iter().enumerate() {
        DatasetSpec::parse(ds).map_err(|m| (format!("data.datasets[{i}]"), m))?;
    }
    if let Some(n) = r.checkpoint.save_interval {
        range(n >= 1, "checkpoint.save_interval", "is 0; expected 1 or more (or remove it to save only at the end)")?;
    }

    let m = &r.model;
    match m.init {
        Init::Pretrained => range(m.path.is_some(), "model.path",
            "is missing; model.init = \"pretrained\" loads weights from it (a folder or hub id), or set model.init = \"random\"")?,
        Init::Random => range(m.path.is_some() || m.config.is_some(), "model.config",
            "is missing; model.init = \"random\" needs an architecture: model.path with a config.json, or [model.config]")?,
    }
    for (key, v) in [("model.model_name", &m.model_name), ("model.model_author", &m.model_author)] {
        range(v.len() <= 2, key, format!("has {} values; expected [Chinese, English] or one value for both", v.len()))?;
    }
    r.train.global_batch_size = Some(global);
    Ok(r)
}
