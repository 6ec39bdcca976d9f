"""Shared fixtures: a tiny random Llama with a word-level tokenizer and a chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from steerlex.models.loading import LoadedModel

WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "of",
    "to",
    "and",
    "in",
    "on",
    "for",
    "with",
    "how",
    "what",
    "why",
    "when",
    "where",
    "who",
    "can",
    "you",
    "me",
    "tell",
    "about",
    "write",
    "story",
    "poem",
    "cat",
    "dog",
    "rain",
    "sun",
    "code",
    "python",
    "list",
    "explain",
    "please",
    "help",
    "make",
    "short",
    "long",
    "day",
    "night",
    "water",
    "fire",
    "tree",
    "house",
    "car",
    "bike",
    "book",
    "music",
    "film",
    "one",
    "two",
    "three",
    "four",
]
SENTENCES = [
    "tell me a short story about the cat",
    "write a poem about rain",
    "how can you help me with python code",
    "explain why the sun is hot",
    "what is a tree",
    "make a list of one two three four",
    "who wrote the book about the dog and the car",
    "please explain music",
    "water",
    "why is the night long and the day short when the sun is on the house",
]

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "[BOS]{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=SPECIALS[3:],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path: Path) -> Path:
    """Save the tiny random Llama and its tokenizer as a local transformers directory."""
    tok = make_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_tiny_loaded() -> LoadedModel:
    """The tiny random Llama (seed 0) and its tokenizer as a LoadedModel."""
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    return LoadedModel(
        model=model,
        tokenizer=tok,
        spec="tiny:llama",
        kind="local",
        source="random init (tests)",
        weights_id="sha256:tiny-llama-seed0",
        path=None,
    )


@pytest.fixture
def tiny_loaded() -> LoadedModel:
    return make_tiny_loaded()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty steerlex cache for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STEERLEX_CACHE", str(root))
    return root
