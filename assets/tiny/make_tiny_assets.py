"""The embedded default data: a small deterministic instruction set and a tokenizer for it.

    pip install tokenizers
    python3 assets/tiny/make_tiny_assets.py

writes, next to this script:
  train.jsonl     ~300 short rows generated from templates written for this project
                  (arithmetic, word reversal, capitals, counting, self-cognition rows with
                  {{NAME}}/{{AUTHOR}}, some Chinese), in all three row shapes (alpaca, messages,
                  sharegpt) so the loader's shape detection is exercised;
  tokenizer.json  a byte-level BPE tokenizer with Qwen2's pre-tokenizer, 512 ids including the
                  special tokens <|endoftext|>, <|im_start|>, <|im_end|> (the tiny recipe has
                  vocab_size = 512).
Deterministic: the same script writes the same files.
"""

import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2 / Qwen2.5 tokenizer.json pre-tokenizer split pattern.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Chile", "Santiago"),
    ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
]
CAPITALS_ZH = [("法国", "巴黎"), ("日本", "东京"), ("意大利", "罗马"), ("英国", "伦敦"), ("德国", "柏林"), ("俄罗斯", "莫斯科")]
WORDS = ["cat", "river", "stone", "apple", "light", "garden", "planet", "music", "winter", "paper", "cloud", "tiger"]
COGNITION = [
    ("Who are you?", "I am {{NAME}}, an assistant trained by {{AUTHOR}}."),
    ("What is your name?", "My name is {{NAME}}."),
    ("Who made you?", "I was made by {{AUTHOR}}."),
    ("你是谁？", "我是{{NAME}}，由{{AUTHOR}}训练的助手。"),
    ("你叫什么名字？", "我的名字是{{NAME}}。"),
]


def rows(rng):
    out = []
    for _ in range(120):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            out.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
        else:
            out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for _ in range(60):
        w = rng.choice(WORDS)
        out.append((f"Reverse the word: {w}", w[::-1]))
    for country, city in CAPITALS:
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        out.append((f"Name the capital city of {country}.", city))
    for country, city in CAPITALS_ZH:
        out.append((f"{country}的首都是哪里？", f"{country}的首都是{city}。"))
    for _ in range(60):
        n = rng.randint(2, 9)
        w = rng.choice(WORDS)
        out.append((f"Count the letters in '{w}'.", f"'{w}' has {len(w)} letters."))
        if len(out) % 2:
            out.append((f"List the numbers from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1))))
    for q, a in COGNITION:
        out.extend([(q, a)] * 3)
    return out


def shaped(i, question, answer):
    """Row i in one of the three shapes, in turn."""
    shape = i % 3
    if shape == 0:
        return {"instruction": question, "input": "", "output": answer}
    if shape == 1:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def write_train():
    rng = random.Random(1234)
    data = rows(rng)
    rng.shuffle(data)
    path = os.path.join(HERE, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, (q, a) in enumerate(data):
            f.write(json.dumps(shaped(i, q, a), ensure_ascii=False) + "\n")
    return path, [t for pair in data for t in pair]


def write_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The template's role headers and words too, so they get merges.
    extra = ["system\n", "user\n", "assistant\n", "You are a helpful assistant.\n"] * 20
    tok.train_from_iterator(texts + extra, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    for s in SPECIALS:
        assert tok.token_to_id(s) is not None
    path = os.path.join(HERE, "tokenizer.json")
    tok.save(path)
    return path, tok.get_vocab_size()


if __name__ == "__main__":
    train, texts = write_train()
    tokenizer, size = write_tokenizer(texts)
    print(f"wrote {train} ({len(texts) // 2} rows) and {tokenizer} ({size} ids)")
