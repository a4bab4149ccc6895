//! Decoding with a key/value cache, as transformers' `generate` does with its `DynamicCache`: the
//! prompt goes through once with causal attention (the training forward's), each layer keeping
//! its keys and values; then one token at a time attends to everything kept. The layers are the
//! training model's, LoRA adapters unmerged, so a run's checkpoint answers as it trained.

use burn::tensor::activation::softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use kernels_cubecl as ops;

use super::causal_lm::{CausalLm, DecoderLayer};
use super::layers::{Attention, SequenceContext};
use crate::backend::TrainBackend;

/// Each layer's keys and values so far (`[1, kv_heads, tokens, head_dim]`), and how many tokens
/// they hold.
pub struct KvCache<B: TrainBackend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: TrainBackend> KvCache<B> {
    pub fn new(layers: usize) -> Self {
        KvCache { layers: vec![None; layers], len: 0 }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<B: TrainBackend> CausalLm<B> {
    /// The next token's logits (f32, `[vocab]`) after `ids`, which follow the tokens `cache`
    /// holds; their keys and values are added to it. The first call takes the prompt (any
    /// length, causal attention among its tokens), later calls one token each.
    ///
    /// # Panics
    /// On no ids, or several ids after the first call (a new conversation starts a new cache).
    pub fn next_token_logits(&self, ids: &[u32], cache: &mut KvCache<B>) -> Vec<f32> {
        assert!(!ids.is_empty() && (cache.is_empty() || ids.len() == 1), "the prompt, then one token at a time");
        let device = self.embed_tokens.device();
        let (n, start) = (ids.len(), cache.len);
        let as_row = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, n]), &device);
        let input = as_row(ids.iter().map(|&i| i64::from(i)).collect());
        let ctx = self.context(as_row((start..start + n).map(|p| p as i64).collect()), None);
        let mut x = self.embed(input);
        for (layer, kept) in self.layers.iter().zip(&mut cache.layers) {
            x = layer.forward_cached(x, &ctx, kept);
        }
        cache.len += n;
        let [_, _, hidden] = x.dims();
        let last = self.norm.forward(x.slice([0..1, n - 1..n, 0..hidden]));
        let logits = self.logits(last).cast(FloatDType::F32);
        logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32 logits")
    }
}

impl<B: TrainBackend> DecoderLayer<B> {
    /// [`forward`](Self::forward) with the attention reading and extending `kept`.
    fn forward_cached(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>, kept: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>) -> Tensor<B, 3> {
        let normed = self.input_layernorm.forward(x.clone());
        let attended = self.self_attn.forward_cached(normed, ctx, kept);
        let (h, normed) = self.post_attention_layernorm.forward_residual(x, attended);
        h + self.feed_forward(normed, ctx)
    }
}

impl<B: TrainBackend> Attention<B> {
    /// The prompt (with nothing kept): the training forward's causal attention, its keys and
    /// values kept. One token after kept ones: attention over all of them, no mask needed.
    fn forward_cached(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>, kept: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (q, k, v) = self.project(x, ctx);
        let scale = (self.head_dim as f64).powf(-0.5);
        let y = match kept.take() {
            None => {
                *kept = Some((k.clone(), v.clone()));
                ops::memory_efficient_attention(q, k, v, scale, ctx.blocked.clone(), ops::AttentionOptions::CAUSAL)
            }
            Some((past_k, past_v)) => {
                let (k, v) = (Tensor::cat(vec![past_k, k], 2), Tensor::cat(vec![past_v, v], 2));
                *kept = Some((k.clone(), v.clone()));
                self.attend_all(q, k, v, scale)
            }
        };
        self.o_proj.forward(y.swap_dims(1, 2).reshape([b, s, self.num_heads * self.head_dim]))
    }

    /// One query per head over every kept key, in f32; each group of query heads reads its
    /// key/value head without copies (grouped-query attention).
    ///
    /// # Shapes
    /// - `q`: `[1, heads, 1, head_dim]`, `k`, `v`: `[1, kv_heads, keys, head_dim]` →
    ///   `[1, heads, 1, head_dim]`
    fn attend_all(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, scale: f64) -> Tensor<B, 4> {
        let dtype = q.dtype();
        let [b, heads, s, d] = q.dims();
        let group = heads / self.num_kv_heads;
        let f32 = |t: Tensor<B, 4>| t.cast(FloatDType::F32);
        let q = f32(q).reshape([b, self.num_kv_heads, group * s, d]);
        let scores = q.matmul(f32(k).swap_dims(2, 3)) * scale;
        let y = softmax(scores, 3).matmul(f32(v));
        y.reshape([b, heads, s, d]).cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build, plan, Registry};
    use crate::parallel::Layout;
    use crate::recipe::ModelSection;

    type B = crate::backend::Cpu;

    /// A tiny model with random weights (wide enough that the logits spread), grouped-query
    /// heads, and `extra`'s model type and options.
    fn tiny(extra: &str) -> CausalLm<B> {
        let config: toml::Table = toml::from_str(&format!(
            "vocab_size = 64\nhidden_size = 32\nintermediate_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\n\
             num_key_value_heads = 2\nhead_dim = 8\nmax_position_embeddings = 128\ninitializer_range = 0.3\n{extra}"
        ))
        .unwrap();
        let section = ModelSection { config: Some(config), init: crate::recipe::Init::Random, ..ModelSection::default() };
        let plan = plan(&section, &Registry::builtin(), crate::model::hub::Fetch::Config).unwrap();
        build::<B>(&plan, &section, Layout::SINGLE, &Default::default()).unwrap()
    }

    #[test]
    fn cached_decoding_equals_the_whole_forward_at_every_step() {
        let qwen3_moe = "model_type = \"qwen3_moe\"\nnum_experts = 4\nnum_experts_per_tok = 2\nmoe_intermediate_size = 16";
        let qwen2 = "model_type = \"qwen2\"\ntie_word_embeddings = true";
        for m in [tiny(qwen3_moe), tiny(qwen2)] {
            decode_against_whole_forward(&m);
        }
    }

    fn decode_against_whole_forward(m: &CausalLm<B>) {
        let mut ids: Vec<u32> = vec![3, 17, 40, 8, 61];
        let mut cache = KvCache::new(m.layers.len());
        let mut logits = m.next_token_logits(&ids, &mut cache);
        for _ in 0..6 {
            let n = ids.len();
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, n]), &Default::default());
            let whole: Vec<f32> = m.forward(input).slice([0..1, n - 1..n]).into_data().to_vec().unwrap();
            let worst = whole.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let spread = whole.iter().fold(0.0f32, |m, a| m.max(a.abs()));
            assert!(spread > 0.1 && worst <= 1e-5 * spread.max(1.0), "after {n} tokens: cached logits differ by {worst} (largest {spread})");
            let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            ids.push(next);
            logits = m.next_token_logits(&[next], &mut cache);
        }
        assert_eq!(cache.len(), ids.len());
    }
}
