//! `trainer infer`: chat with a run's model as it trained (ms-swift's `swift infer --adapters`):
//! the base model with the checkpoint's LoRA adapters applied unmerged (or its fully trained
//! weights), or with a model folder as it is (`swift infer --model`); prompts rendered by the recipe's chat template with the assistant's opening, answers
//! decoded with a key/value cache ([`crate::model::generate`]) until the template's end of turn,
//! greedy or sampled (temperature, top-k, top-p, seeded), streamed as they come.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{self, BackendJob, TrainBackend};
use crate::data::{self, ChatTemplate, Conversation, Encoder, Role};
use crate::error::{Error, Result};
use crate::model::generate::KvCache;
use crate::model::{self, hub::Fetch, Registry};
use crate::parallel::Layout;
use crate::recipe::{self, Init, ModelSection, Recipe};
use crate::run::checkpoint as ckpt;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: the most likely token (greedy); above 0: drawn from the softmax of logits / temperature.
    pub temperature: f64,
    /// Draw among the `top_k` most likely tokens only (0: all).
    pub top_k: usize,
    /// Then among the fewest most likely tokens whose probabilities sum to `top_p` (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };

    /// The flags' values, or which one is out of range.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Unsupported(format!("--temperature {}: expected 0 (greedy) or more, such as 0.7", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Unsupported(format!("--top-p {}: expected more than 0 and at most 1, such as 0.8", self.top_p)));
        }
        Ok(())
    }

    /// The next token from `logits`.
    pub fn pick(&self, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature == 0.0 {
            return argmax();
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let larger_first = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        // With top_k, only the k largest of the vocabulary are sorted.
        if self.top_k > 0 && self.top_k < order.len() {
            order.select_nth_unstable_by(self.top_k - 1, larger_first);
            order.truncate(self.top_k);
        }
        order.sort_unstable_by(larger_first);
        let top = f64::from(logits[order[0] as usize]);
        let weights: Vec<f64> = order.iter().map(|&i| ((f64::from(logits[i as usize]) - top) / self.temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        // The nucleus: the most likely tokens until their share reaches top_p.
        let mut kept = 0.0;
        let mut n = 0;
        while n < weights.len() && (n == 0 || kept < self.top_p * total) {
            kept += weights[n];
            n += 1;
        }
        let mut draw = rng.random::<f64>() * kept;
        for (&id, &w) in order.iter().zip(&weights[..n]) {
            if draw < w {
                return id;
            }
            draw -= w;
        }
        order[n - 1]
    }
}

/// What `trainer infer` was asked.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// A run folder (its newest complete checkpoint), a checkpoint folder, or a model folder.
    pub run: PathBuf,
    /// Single-turn prompts answered in turn; none (and no `data`): a conversation read from the
    /// input.
    pub prompts: Vec<String>,
    /// A dataset (a local file or a hub id, without `#N`) whose rows are answered:
    /// each row's messages up to its last assistant message are the prompt, that message the
    /// reference.
    pub data: Option<String>,
    /// Where `data`'s answers go (JSON lines; never over an existing file); none: the output.
    pub out: Option<PathBuf>,
    /// The system prompt; default the recipe's `data.system`.
    pub system: Option<String>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Default the recipe's.
    pub device: Option<recipe::Device>,
    /// The base model alone, without what the run trained.
    pub base: bool,
}

/// Answer `req`'s prompts, its data's rows, or else the conversation read from `input`, on `out`.
pub fn infer(req: &InferRequest, registry: &Registry, input: &mut dyn BufRead, out: &mut dyn Write) -> Result<()> {
    req.sampling.check()?;
    if req.max_new_tokens == 0 {
        return Err(Error::Unsupported("--max-new-tokens 0: expected 1 or more, such as 512".into()));
    }
    if let Some(out) = &req.out {
        if out.exists() {
            return Err(Error::file(out, "already exists; --out writes a new file (choose another name or remove it)"));
        }
    }
    // The rows are read (and any bad one named) before the model is built.
    let rows = match &req.data {
        Some(source) => Some(data::source::load(source, false)?.rows.iter().enumerate().map(|(i, row)| prompt_of(row, i)).collect::<Result<Vec<_>>>()?),
        None => None,
    };
    // A model folder (Hugging Face layout, e.g. `trainer export --to hf`'s) is its own model;
    // anything else is a run or one of its checkpoints.
    let (recipe, checkpoint) = if req.run.join("config.json").is_file() && !req.run.join(ckpt::RECIPE).is_file() {
        let model = ModelSection { path: Some(req.run.display().to_string()), ..ModelSection::default() };
        (Recipe { model, ..Recipe::default() }, None)
    } else {
        if !req.run.is_dir() {
            return Err(Error::file(&req.run, "no such folder; `trainer infer` takes a run folder, a checkpoint-N folder in it, or a model folder"));
        }
        let dir = crate::export::find_checkpoint(&req.run)?;
        (recipe::load(&dir.join(ckpt::RECIPE), &[])?.recipe, Some(dir))
    };
    let r = &recipe;
    let fetch = if r.model.init == Init::Pretrained { Fetch::All } else { Fetch::Config };
    let plan = model::plan(&r.model, registry, fetch)?;
    let tokenizer = match &r.model.tokenizer {
        Some(t) => PathBuf::from(t),
        None => data::tokenizer_path(plan.dir.as_deref(), r)?,
    };
    let encoder = Encoder::from_file(&tokenizer)?;
    let template = ChatTemplate::for_data(&r.data.template_options(), &tokenizer)?;
    let stops: Vec<u32> = template.end_of_turn().iter().filter_map(|t| encoder.tokenizer().token_to_id(t)).collect();
    let setup = Setup {
        r,
        plan: &plan,
        checkpoint: checkpoint.as_deref().filter(|_| !req.base),
        req,
        template: &template,
        encoder: &encoder,
        stops,
    };
    let chat = Chat { setup, rows, input, out };
    let device = req.device.unwrap_or(r.device);
    backend::dispatch(device, r.model.dtype, chat)
}

/// What answering needs besides the model.
struct Setup<'a> {
    r: &'a Recipe,
    plan: &'a model::ModelPlan,
    checkpoint: Option<&'a std::path::Path>,
    req: &'a InferRequest,
    template: &'a ChatTemplate,
    encoder: &'a Encoder,
    /// The end-of-turn tokens: generation stops at any of them.
    stops: Vec<u32>,
}

struct Chat<'a> {
    setup: Setup<'a>,
    rows: Option<Vec<(Conversation, Option<serde_json::Value>)>>,
    input: &'a mut dyn BufRead,
    out: &'a mut dyn Write,
}

impl BackendJob for Chat<'_> {
    type Output = ();

    fn run<B: TrainBackend>(self, device: B::Device) -> Result<()> {
        let Chat { setup, rows, input, out } = self;
        let r = setup.r;
        let mut m = model::build::<B>(setup.plan, &r.model, Layout::SINGLE, &device)?;
        if let Some(dir) = setup.checkpoint {
            m = crate::train::checkpoints::with_trained(m, dir, r)?;
        }
        let mut session = Session { m: &m, setup: &setup, rng: ChaCha8Rng::seed_from_u64(setup.req.sampling.seed) };
        let system = setup.req.system.as_deref().or(r.data.system.as_deref());
        if let Some(rows) = rows {
            return answer_rows(&mut session, &rows, system, setup.req.out.as_deref(), out);
        }
        if !setup.req.prompts.is_empty() {
            for prompt in &setup.req.prompts {
                session.answer(&Conversation::new(system, &[(Role::User, prompt)]), out)?;
                writeln!(out).map_err(write_failed)?;
            }
            return Ok(());
        }
        // A conversation: one user turn a line; `clear` starts over, `exit` (or the input's end) ends.
        let terminal = std::io::stdin().is_terminal();
        let mut turns: Vec<(Role, String)> = Vec::new();
        loop {
            if terminal {
                write!(out, "<<< ").and_then(|_| out.flush()).map_err(write_failed)?;
            }
            let mut line = String::new();
            if input.read_line(&mut line).map_err(|e| Error::Internal(format!("reading the prompt: {e}")))? == 0 {
                return Ok(());
            }
            let line = line.trim_end_matches(['\n', '\r']);
            match line.trim() {
                "exit" | "quit" => return Ok(()),
                "clear" => {
                    turns.clear();
                    continue;
                }
                "" => continue,
                _ => {}
            }
            turns.push((Role::User, line.to_string()));
            let borrowed: Vec<(Role, &str)> = turns.iter().map(|(role, text)| (*role, text.as_str())).collect();
            let answer = session.answer(&Conversation::new(system, &borrowed), out)?;
            writeln!(out).map_err(write_failed)?;
            turns.push((Role::Assistant, answer));
        }
    }
}

/// Each row's answer as a JSON line `{"messages", "response", "labels"}` (ms-swift's
/// `--result_path` rows): the prompt's messages, the answer, and the row's last assistant
/// message when it ends with one. Into `path` (written aside, then renamed) or `out`.
fn answer_rows<B: TrainBackend>(session: &mut Session<'_, '_, B>, rows: &[(Conversation, Option<serde_json::Value>)], system: Option<&str>, path: Option<&std::path::Path>, out: &mut dyn Write) -> Result<()> {
    // `FILE.partial` beside it, new (never another file's), renamed once every row is in.
    let partial = path.map(|p| {
        let mut name = p.as_os_str().to_os_string();
        name.push(".partial");
        PathBuf::from(name)
    });
    let mut file = match &partial {
        Some(tmp) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| Error::file(tmp, format!("cannot create it for the answers: {e}")))?,
        )),
        None => None,
    };
    let written = write_rows(session, rows, system, file.as_mut().map(|f| f as &mut dyn Write).unwrap_or(out));
    if let (Err(_), Some(tmp)) = (&written, &partial) {
        let _ = std::fs::remove_file(tmp);
    }
    written?;
    if let (Some(mut f), Some(tmp), Some(path)) = (file, partial, path) {
        f.flush().map_err(write_failed)?;
        f.get_ref().sync_all().map_err(write_failed)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))?;
        eprintln!("infer: {} rows answered into {}", rows.len(), path.display());
    }
    Ok(())
}

/// An answer that could not be written out.
fn write_failed(e: std::io::Error) -> Error {
    Error::Internal(format!("writing the answer: {e}"))
}

/// [`answer_rows`]' lines, into `sink`.
fn write_rows<B: TrainBackend>(session: &mut Session<'_, '_, B>, rows: &[(Conversation, Option<serde_json::Value>)], system: Option<&str>, sink: &mut dyn Write) -> Result<()> {
    for (prompt, reference) in rows {
        let mut prompt = prompt.clone();
        if let (Some(system), None) = (system, prompt.system()) {
            prompt.set_default_system(system);
        }
        let place = prompt.place.clone();
        let response = session.answer(&prompt, &mut std::io::sink()).map_err(|e| Error::data(format!("{place}: {e}")))?;
        let line = serde_json::json!({ "messages": prompt.messages, "response": response, "labels": reference });
        writeln!(sink, "{line}").map_err(write_failed)?;
    }
    Ok(())
}

/// Row `i`'s prompt (its messages up to its last assistant message) and reference (that
/// message's content, when the row ends with one), or why it has nothing to answer.
fn prompt_of(row: &Conversation, i: usize) -> Result<(Conversation, Option<serde_json::Value>)> {
    let n = row.messages.len();
    let ends_answered = row.messages.last().is_some_and(|m| data::source::role_of(m) == Some(Role::Assistant));
    let upto = if ends_answered { n - 1 } else { n };
    let place = if row.place.is_empty() { format!("row {i}") } else { row.place.clone() };
    if !row.messages[..upto].iter().any(|m| data::source::role_of(m) == Some(Role::User)) {
        return Err(Error::data(format!("{place}: nothing to answer (no user message before its last assistant message)")));
    }
    let reference = ends_answered.then(|| row.messages[n - 1].get("content").cloned()).flatten();
    Ok((Conversation { messages: row.messages[..upto].to_vec(), tools: row.tools.clone(), place }, reference))
}

/// One model answering conversations.
struct Session<'a, 's, B: TrainBackend> {
    m: &'a model::CausalLm<B>,
    setup: &'a Setup<'s>,
    rng: ChaCha8Rng,
}

impl<B: TrainBackend> Session<'_, '_, B> {
    /// The assistant's reply to `conv`, streamed to `out` as it is decoded.
    fn answer(&mut self, conv: &Conversation, out: &mut dyn Write) -> Result<String> {
        let chat = self.setup;
        let max_positions = chat.plan.spec.max_position_embeddings;
        let prompt = chat.template.render_prompt(conv).map_err(Error::Data)?;
        let encoding = chat.encoder.tokenizer().encode(prompt.as_str(), false).map_err(|e| Error::data(format!("tokenizer failed on the prompt: {e}")))?;
        let ids = encoding.get_ids();
        if ids.len() >= max_positions {
            return Err(Error::data(format!(
                "the conversation is {} tokens, the model's max_position_embeddings is {}: start over (`clear`) or shorten it",
                ids.len(),
                max_positions
            )));
        }
        let mut cache = KvCache::<B>::new(self.m.layers.len());
        let mut logits = self.m.next_token_logits(ids, &mut cache);
        let mut made: Vec<u32> = Vec::new();
        let mut shown = String::new();
        for _ in 0..chat.req.max_new_tokens {
            let next = chat.req.sampling.pick(&logits, &mut self.rng);
            if chat.stops.contains(&next) {
                break;
            }
            made.push(next);
            let text = self.decode(&made)?;
            // A character split over tokens shows once whole.
            if !text.ends_with('\u{FFFD}') && text.starts_with(&shown) {
                write!(out, "{}", &text[shown.len()..]).and_then(|_| out.flush()).map_err(write_failed)?;
                shown = text;
            }
            if cache.len() + 1 >= max_positions {
                break;
            }
            logits = self.m.next_token_logits(&[next], &mut cache);
        }
        let text = self.decode(&made)?;
        if let Some(rest) = text.strip_prefix(shown.as_str()) {
            write!(out, "{rest}").map_err(write_failed)?;
        }
        Ok(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.setup.encoder.tokenizer().decode(ids, true).map_err(|e| Error::data(format!("tokenizer failed to decode {ids:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_sampling_keeps_to_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9, -5.0];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        assert_eq!(Sampling::GREEDY.pick(&logits, &mut rng), 1);
        let top2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 };
        let drawn: std::collections::BTreeSet<u32> = (0..200).map(|_| top2.pick(&logits, &mut rng)).collect();
        assert_eq!(drawn, [1, 3].into());
        // Tokens 1 and 3 hold ~0.46 each: top_p 0.3 keeps token 1 alone.
        let nucleus = Sampling { temperature: 1.0, top_k: 0, top_p: 0.3, seed: 0 };
        assert!((0..50).all(|_| nucleus.pick(&logits, &mut rng) == 1));
        // A high temperature spreads the draws over every token.
        let hot = Sampling { temperature: 100.0, top_k: 0, top_p: 1.0, seed: 0 };
        let drawn: std::collections::BTreeSet<u32> = (0..500).map(|_| hot.pick(&logits, &mut rng)).collect();
        assert_eq!(drawn.len(), 5);
    }

    #[test]
    fn out_of_range_flags_are_named() {
        let bad = |s: Sampling| s.check().unwrap_err().to_string();
        assert!(bad(Sampling { temperature: -1.0, ..Sampling::GREEDY }).contains("--temperature -1"));
        assert!(bad(Sampling { top_p: 0.0, ..Sampling::GREEDY }).contains("--top-p 0"));
        assert!(bad(Sampling { top_p: 1.5, ..Sampling::GREEDY }).contains("--top-p 1.5"));
    }
}
