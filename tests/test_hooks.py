"""Residual-stream hooks on tiny random decoder-only models of each common architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers as tf
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel

from steerlex.core.errors import LayerError, SteerlexError
from steerlex.models.hooks import (
    check_layer,
    decoder_layers,
    edit_residual,
    forward_to_layer,
    hook_name,
    num_layers,
    read_residual,
    residual_width,
)

VOCAB = 97
WIDTH = 32
N_LAYERS = 3
_LLAMA_LIKE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": WIDTH,
    "intermediate_size": 64,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], PreTrainedModel]
    path: str  # expected decoder_layers path
    final_norm: str  # module applied to the last block's output before lm_head
    tuple_output: bool  # whether the blocks return a tuple (hidden, attn_weights)


def _make(config_cls: Any, model_cls: Any, **kwargs: Any) -> Callable[[], PreTrainedModel]:
    def build() -> PreTrainedModel:
        torch.manual_seed(0)
        model: PreTrainedModel = model_cls(config_cls(**kwargs)).eval()
        return model

    return build


ARCHS = [
    Arch(
        "llama",
        _make(tf.LlamaConfig, tf.LlamaForCausalLM, **_LLAMA_LIKE),
        "model.layers",
        "model.norm",
        False,
    ),
    Arch(
        "qwen2",
        _make(tf.Qwen2Config, tf.Qwen2ForCausalLM, **_LLAMA_LIKE),
        "model.layers",
        "model.norm",
        False,
    ),
    Arch(
        "mistral",
        _make(tf.MistralConfig, tf.MistralForCausalLM, **_LLAMA_LIKE),
        "model.layers",
        "model.norm",
        False,
    ),
    Arch(
        "gemma2",
        _make(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=8, **_LLAMA_LIKE),
        "model.layers",
        "model.norm",
        False,
    ),
    Arch(
        "gemma3",
        _make(
            tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=8, sliding_window=4, **_LLAMA_LIKE
        ),
        "model.layers",
        "model.norm",
        False,
    ),
    Arch(
        "phi3",
        _make(tf.Phi3Config, tf.Phi3ForCausalLM, **_LLAMA_LIKE),
        "model.layers",
        "model.norm",
        False,
    ),
    Arch(
        "gpt2",
        _make(
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            vocab_size=VOCAB,
            n_embd=WIDTH,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=64,
            **_SPECIAL,
        ),
        "transformer.h",
        "transformer.ln_f",
        False,
    ),
    Arch(
        "gpt_neox",
        _make(
            tf.GPTNeoXConfig,
            tf.GPTNeoXForCausalLM,
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            **_SPECIAL,
        ),
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        False,
    ),
    # Falcon and Bloom blocks still return (hidden_states, attn_weights) in transformers 5.
    Arch(
        "falcon",
        _make(
            tf.FalconConfig,
            tf.FalconForCausalLM,
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            **_SPECIAL,
        ),
        "transformer.h",
        "transformer.ln_f",
        True,
    ),
    Arch(
        "bloom",
        _make(
            tf.BloomConfig,
            tf.BloomForCausalLM,
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            n_layer=N_LAYERS,
            n_head=4,
            **_SPECIAL,
        ),
        "transformer.h",
        "transformer.ln_f",
        True,
    ),
]


@pytest.fixture(params=ARCHS, ids=[a.name for a in ARCHS], scope="module")
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.param


@pytest.fixture
def model(arch: Arch) -> PreTrainedModel:
    return arch.build()


def _inputs() -> tuple[Tensor, Tensor]:
    """A left-padded batch of two sequences and its attention mask."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :2] = 0
    mask[0, :2] = 0
    return ids, mask


def _no_hooks(model: PreTrainedModel) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def _hook_snapshot(model: PreTrainedModel) -> list[list[int]]:
    return [list(m._forward_hooks) for m in model.modules()]


def _counter(module: nn.Module, counts: list[int]) -> Any:
    def hook(*_: Any) -> None:
        counts.append(1)

    return module.register_forward_hook(hook)


# --- discovery --------------------------------------------------------------------------------


def test_discovery(model: PreTrainedModel, arch: Arch) -> None:
    path, layers = decoder_layers(model)
    assert path == arch.path
    assert layers is model.get_submodule(arch.path)
    assert num_layers(model) == N_LAYERS
    assert residual_width(model) == WIDTH
    assert hook_name(model, 2) == f"{arch.path}.2"
    ids, mask = _inputs()
    outputs: list[Any] = []
    handle = layers[0].register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    assert isinstance(outputs[0], tuple) == arch.tuple_output


# --- (1) read hook vs hidden_states, and the last-layer norm ---------------------------------


@torch.no_grad()
def test_read_matches_hidden_states(model: PreTrainedModel, arch: Arch) -> None:
    ids, mask = _inputs()
    with (
        read_residual(model, 0) as r0,
        read_residual(model, 1) as r1,
        read_residual(model, N_LAYERS - 1) as last,
    ):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == N_LAYERS + 1
    assert r0.value.shape == (2, 7, WIDTH)
    assert torch.equal(r0.value, hidden[1])
    assert torch.equal(r1.value, hidden[2])
    assert len(r0.values) == 1
    # Last layer: hidden_states[-1] is the final-normed last_hidden_state, not the block output.
    final_norm = model.get_submodule(arch.final_norm)
    assert not torch.equal(last.value, hidden[-1])
    assert torch.equal(final_norm(last.value), hidden[-1])


# --- (2) identity edit, (3) non-trivial edit -------------------------------------------------


@torch.no_grad()
def test_identity_edit_keeps_logits(model: PreTrainedModel) -> None:
    ids, mask = _inputs()
    base = model(input_ids=ids, attention_mask=mask).logits
    for layer in range(N_LAYERS):
        with edit_residual(model, layer, lambda h: h.clone()):
            edited = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(edited, base)


@torch.no_grad()
def test_edit_changes_downstream(model: PreTrainedModel) -> None:
    ids, mask = _inputs()
    base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    shift = torch.full((WIDTH,), 0.5)
    shift[::2] = -1.0
    with edit_residual(model, 0, lambda h: h + shift), read_residual(model, 0) as r0:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert not torch.equal(out.logits, base.logits)
    # The read at the same layer sees the edited value, and so do transformers' hidden_states.
    assert torch.allclose(r0.value, base.hidden_states[1] + shift)
    assert torch.equal(out.hidden_states[1], r0.value)
    assert torch.equal(out.hidden_states[0], base.hidden_states[0])


# --- (4) forward_to_layer --------------------------------------------------------------------


@torch.no_grad()
def test_forward_to_layer_matches_read_and_stops(model: PreTrainedModel, arch: Arch) -> None:
    ids, mask = _inputs()
    _, layers = decoder_layers(model)
    lm_head = model.get_output_embeddings()
    final_norm = model.get_submodule(arch.final_norm)
    for attention_mask in (mask, None):
        for layer in range(N_LAYERS):
            with read_residual(model, layer) as capture:
                model(input_ids=ids, attention_mask=attention_mask)
            later: list[int] = []
            handles = [_counter(m, later) for m in (*layers[layer + 1 :], final_norm, lm_head)]
            try:
                result = forward_to_layer(model, ids, attention_mask, layer=layer)
            finally:
                for handle in handles:
                    handle.remove()
            assert later == []
            assert result.shape == (2, 7, WIDTH)
            assert torch.equal(result, capture.value)
    assert _no_hooks(model)


@torch.no_grad()
def test_forward_to_layer_applies_edits(model: PreTrainedModel) -> None:
    ids, _ = _inputs()
    plain = forward_to_layer(model, ids, layer=1)
    with edit_residual(model, 0, lambda h: h * 2):
        edited = forward_to_layer(model, ids, layer=1)
    assert not torch.equal(plain, edited)


# --- (5) hooks removed ------------------------------------------------------------------------


@torch.no_grad()
def test_hooks_removed_on_exit_and_exception(model: PreTrainedModel) -> None:
    ids, mask = _inputs()
    assert _no_hooks(model)
    with read_residual(model, 1), edit_residual(model, 1, lambda h: h), read_residual(model, 2):
        assert not _no_hooks(model)
        model(input_ids=ids, attention_mask=mask)
    assert _no_hooks(model)

    with pytest.raises(RuntimeError, match="boom"), read_residual(model, 0):
        model(input_ids=ids)
        raise RuntimeError("boom")
    assert _no_hooks(model)

    with pytest.raises(LayerError, match="shape"), edit_residual(model, 1, lambda h: h[..., :-1]):
        model(input_ids=ids)
    assert _no_hooks(model)

    forward_to_layer(model, ids, mask, layer=0)
    assert _no_hooks(model)

    # After output_hidden_states, transformers keeps its own recorder hooks; ours still go.
    model(input_ids=ids, output_hidden_states=True)
    before = _hook_snapshot(model)
    with pytest.raises(KeyError), edit_residual(model, 2, lambda h: h + 1):
        model(input_ids=ids, output_hidden_states=True)
        raise KeyError("x")
    assert _hook_snapshot(model) == before


# --- (6) bad layers ----------------------------------------------------------------------------


def test_bad_layers(model: PreTrainedModel) -> None:
    name = type(model).__name__
    with pytest.raises(
        LayerError,
        match=rf"layer 3 is out of range for {name} with 3 decoder layers; valid layers are 0\.\.2",
    ):
        check_layer(model, 3)
    with pytest.raises(LayerError, match=r"layer -1 is negative.*valid layers are 0\.\.2"):
        read_residual(model, -1).__enter__()
    with pytest.raises(LayerError, match=r"valid layers are 0\.\.2"):
        edit_residual(model, 99, lambda h: h).__enter__()
    with pytest.raises(LayerError, match=r"layer must be an int.*0\.\.2"):
        check_layer(model, 1.0)  # type: ignore[arg-type]
    with pytest.raises(LayerError, match=r"layer must be an int"):
        check_layer(model, True)
    with pytest.raises(LayerError, match=r"forward_to_layer needs layer=.*0\.\.2"):
        forward_to_layer(model, torch.ones(1, 2, dtype=torch.long))
    assert check_layer(model, torch.tensor(2)) == 2  # type: ignore[arg-type]
    assert issubclass(LayerError, SteerlexError)
    assert _no_hooks(model)


# --- (7) generate with KV cache -----------------------------------------------------------------


@torch.no_grad()
def test_edit_applies_on_every_generate_step(model: PreTrainedModel) -> None:
    ids, mask = _inputs()
    seen: list[int] = []

    def shift(h: Tensor) -> Tensor:
        seen.append(h.shape[1])
        return h + 3.0

    kwargs: dict[str, Any] = {
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "use_cache": True,
    }
    assert isinstance(model, GenerationMixin)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with edit_residual(model, 1, shift), read_residual(model, 1) as capture:
        steered = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert seen == [7, 1, 1, 1]  # prefill, then one decoding step per new token
    assert [v.shape[1] for v in capture.values] == seen
    assert steered.shape == plain.shape
    assert _no_hooks(model)


# --- architecture-independent behaviour ---------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    return ARCHS[0].build()


def test_read_before_forward_raises(llama: PreTrainedModel) -> None:
    with read_residual(llama, 1) as capture:
        with pytest.raises(
            LayerError, match=r"no forward pass has run through layer 1 \(model\.layers\.1\)"
        ):
            _ = capture.value
        assert capture.values == []


@torch.no_grad()
def test_bad_edit_fn(llama: PreTrainedModel) -> None:
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(LayerError, match=r"edit_residual .*needs a callable"):
        edit_residual(llama, 0, "nope").__enter__()  # type: ignore[arg-type]
    cases: list[tuple[Callable[[Tensor], Any], str]] = [
        (
            lambda h: None,
            r"returned NoneType; it must return a tensor with its input's shape \(1, 4, 32\)",
        ),
        (
            lambda h: h[:, :2],
            r"LlamaForCausalLM layer 0 \(model\.layers\.0\) returned shape \(1, 2, 32\)",
        ),
        (lambda h: h.double(), r"returned dtype torch\.float64.*\.to\(h\.dtype\)"),
        (lambda h: h.to("meta"), r"returned a tensor on meta.*device cpu.*\.to\(h\.device\)"),
    ]
    for fn, message in cases:
        with pytest.raises(LayerError, match=message), edit_residual(llama, 0, fn):
            llama(input_ids=ids)
    assert _no_hooks(llama)


@torch.no_grad()
def test_nested_edits_compose_in_entry_order(llama: PreTrainedModel) -> None:
    ids = torch.randint(3, VOCAB, (1, 4))
    with read_residual(llama, 0) as outer_read, edit_residual(llama, 0, lambda h: h + 1):
        with edit_residual(llama, 0, lambda h: h * 2), read_residual(llama, 1) as r1:
            llama(input_ids=ids)
            both = outer_read.value
        llama(input_ids=ids)
        only_first = outer_read.value
    plain = forward_to_layer(llama, ids, layer=0)
    assert torch.equal(both, (plain + 1) * 2)
    assert torch.equal(only_first, plain + 1)
    assert len(outer_read.values) == 2 and len(r1.values) == 1
    assert _no_hooks(llama)


@torch.no_grad()
def test_two_reads_at_one_layer(llama: PreTrainedModel) -> None:
    ids = torch.randint(3, VOCAB, (1, 4))
    with read_residual(llama, 1) as first:
        with read_residual(llama, 1) as second:  # exits while both captures are empty
            pass
        llama(input_ids=ids)
        with read_residual(llama, 1) as third:
            llama(input_ids=ids)
        llama(input_ids=ids)
    assert len(first.values) == 3 and second.values == [] and len(third.values) == 1
    assert torch.equal(third.value, first.values[1])
    assert _no_hooks(llama)


@torch.no_grad()
def test_multimodal_wrapper_uses_language_model() -> None:
    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(**{**_LLAMA_LIKE, "vocab_size": 300}, head_dim=8)
    vision = tf.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    # The vision tower also has a 3-entry ModuleList; the known path picks the text decoder.
    assert decoder_layers(model)[0] == "model.language_model.layers"
    assert residual_width(model) == WIDTH
    ids = torch.randint(3, 200, (1, 5))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(forward_to_layer(model, ids, layer=1), out.hidden_states[2])
        last = forward_to_layer(model, ids, layer=N_LAYERS - 1)
        assert torch.equal(model.model.language_model.norm(last), out.hidden_states[-1])


class _Toy(nn.Module):
    """A non-transformers model whose blocks live at an unknown path and return tuples."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: Tensor) -> tuple[Tensor, str]:
            return x + self.proj(x), "extra"

    def __init__(self, n_lists: int = 1, n_config: int | None = 2) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=n_config, hidden_size=8)
        self.stacks = nn.ModuleList(
            nn.ModuleList(self.Block() for _ in range(2)) for _ in range(n_lists)
        )
        self.extras: list[Any] = []

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False
    ) -> Tensor:
        h = input_ids.float().unsqueeze(-1).expand(*input_ids.shape, 8)
        blocks: nn.ModuleList = self.stacks[0]  # type: ignore[assignment]
        for block in blocks:
            h, extra = block(h)
            self.extras.append(extra)
        return h


@torch.no_grad()
def test_fallback_search_and_tuple_outputs() -> None:
    toy = _Toy()
    assert decoder_layers(toy)[0] == "stacks.0"
    ids = torch.arange(6).view(2, 3)
    with edit_residual(toy, 0, lambda h: h * 0), read_residual(toy, 1) as r1:
        out = toy(ids)
    assert toy.extras == ["extra", "extra"]  # the rest of the tuple is kept
    assert torch.equal(r1.value, out)
    assert torch.equal(
        forward_to_layer(toy, ids, layer=0),
        decoder_layers(toy)[1][0](ids.float().unsqueeze(-1).expand(2, 3, 8))[0],
    )

    with pytest.raises(LayerError, match=r"3 have 2 entries \(stacks\.0, stacks\.1, stacks\.2\)"):
        decoder_layers(_Toy(n_lists=3))
    with pytest.raises(
        LayerError,
        match=r"config says 5 layers but no nn.ModuleList has that length \(ModuleLists found: stacks \(1\), stacks\.0 \(2\)\)",
    ):
        decoder_layers(_Toy(n_config=5))
    with pytest.raises(LayerError, match=r"cannot find the decoder layers of _Toy.*no config"):
        decoder_layers(_Toy(n_config=None))
    with pytest.raises(LayerError, match=r"residual width of Linear"):
        residual_width(nn.Linear(2, 2))
