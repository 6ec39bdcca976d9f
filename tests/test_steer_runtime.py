"""SteeredModel: steered generate/chat on the tiny random Llama, with a KV cache and left padding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steerlex.core.errors import SAEError, SteerlexError
from steerlex.models.chat import EncodedPrompt
from steerlex.models.hooks import edit_residual, read_residual
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.steer import (
    Ablate,
    Amplification,
    Calibration,
    Clamp,
    DenseDirection,
    Gate,
    SteeredModel,
    SteeringError,
    encode_chat,
    feature_pre_acts,
)

LAYER = 2
PROMPTS = [
    "tell me a short story about the cat",
    "what is a tree",
    "write a poem about rain and the sun",
]
HELD_OUT = ["who wrote the book about the dog", "please explain music"]
SELECTED = (3, 11, 20)
HARM = (40, 41)


def make_sae(loaded: LoadedModel, seed: int = 0) -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=32,
        d_sae=64,
        k=8,
        layer=LAYER,
        model_spec=loaded.spec,
        weights_id=loaded.weights_id,
    )
    sae = SparseAutoencoder(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


def set_harm(sae: SparseAutoencoder, bias: float) -> None:
    with torch.no_grad():
        sae.b_enc[list(HARM)] = bias


def plain_generate(loaded: LoadedModel, steered: SteeredModel, prompts: list[str], n: int) -> list:
    """Greedy continuations from the bare HF model (no hooks), same left-padded inputs."""
    encoded = steered.encode(prompts)
    width = max(len(e.input_ids) for e in encoded)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.full((len(encoded), width), pad)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e.input_ids) :] = torch.tensor(e.input_ids)
        attn[i, width - len(e.input_ids) :] = 1
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False, pad_token_id=pad
        )
    return out[:, width:].tolist()


def ids_of(responses: list) -> list[tuple[int, ...]]:
    return [r.token_ids for r in responses]


def trimmed(rows: list[list[int]], eos: int) -> list[tuple[int, ...]]:
    out = []
    for row in rows:
        cut = row.index(eos) + 1 if eos in row else len(row)
        out.append(tuple(row[:cut]))
    return out


# --- exactness when not steering ------------------------------------------------------------------


def test_off_and_alpha_zero_are_exactly_the_unsteered_model(tiny_loaded: LoadedModel) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=0.0))
    eos = tiny_loaded.model.generation_config.eos_token_id
    expected = trimmed(plain_generate(tiny_loaded, steered, PROMPTS, 12), eos)
    assert ids_of(steered.generate(PROMPTS, max_new_tokens=12)) == expected
    steered.strategy = Amplification(SELECTED, alpha=8.0)
    changed = ids_of(steered.generate(PROMPTS, max_new_tokens=12))
    assert changed != expected
    with steered.steering(False):
        off = steered.generate(PROMPTS, max_new_tokens=12)
    assert ids_of(off) == expected
    assert all(not r.report.steered for r in off)
    assert all(r.report.edited_prompt_positions == 0 for r in off)
    assert steered.enabled
    steered.enabled = False
    assert ids_of(steered.generate(PROMPTS, max_new_tokens=12)) == expected
    with steered:
        assert steered.enabled
        assert ids_of(steered.generate(PROMPTS, max_new_tokens=12)) == changed
    assert not steered.enabled


# --- without an SAE --------------------------------------------------------------------------------


def test_no_sae_and_no_strategy_is_the_unsteered_model(tiny_loaded: LoadedModel) -> None:
    steered = SteeredModel(tiny_loaded, layer=LAYER)
    assert steered.sae is None and steered.strategy is None
    assert steered.describe() == "no steering"
    eos = tiny_loaded.model.generation_config.eos_token_id
    expected = trimmed(plain_generate(tiny_loaded, steered, PROMPTS, 12), eos)
    out = steered.generate(PROMPTS, max_new_tokens=12)
    assert ids_of(out) == expected
    report = out[0].report
    assert report.features == () and report.gate_mode is None and not report.steered
    assert report.strategy == "no steering" and report.prompt_positions > 0


def test_dense_direction_without_an_sae(tiny_loaded: LoadedModel) -> None:
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    strategy = DenseDirection(direction=direction, scale=4.0, alpha=2.0)
    steered = SteeredModel(tiny_loaded, None, strategy, layer=LAYER)
    got = steered.generate(PROMPTS, max_new_tokens=8)
    enc = steered.encode([PROMPTS[0]])[0]
    assert got[0].token_ids == manual_greedy(tiny_loaded, None, strategy, enc, 8)
    eos = tiny_loaded.model.generation_config.eos_token_id
    assert ids_of(got) != trimmed(plain_generate(tiny_loaded, steered, PROMPTS, 8), eos)
    report = got[0].report
    assert report.features == () and report.steered and report.edited_prompt_positions > 0
    with steered.steering(False):
        assert ids_of(steered.generate(PROMPTS, max_new_tokens=8)) == trimmed(
            plain_generate(tiny_loaded, steered, PROMPTS, 8), eos
        )


def test_without_an_sae_what_needs_one_is_refused(tiny_loaded: LoadedModel) -> None:
    with pytest.raises(SteeringError, match="pass layer"):
        SteeredModel(tiny_loaded, None, DenseDirection(direction=torch.ones(32)))
    with pytest.raises(SteeringError, match="needs the SAE"):
        SteeredModel(tiny_loaded, None, Amplification(SELECTED, alpha=1.0), layer=LAYER)
    steered = SteeredModel(tiny_loaded, layer=LAYER)
    with pytest.raises(SteeringError, match="needs the SAE"):
        steered.strategy = Calibration(SELECTED)
    with pytest.raises(SteeringError, match="width 8 but the layer has 32"):
        steered.strategy = DenseDirection(direction=torch.ones(8))


# --- the edit reaches the layer -------------------------------------------------------------------


def _prefill_residual(steered: SteeredModel, prompts: list[str]) -> torch.Tensor:
    with read_residual(steered.loaded.model, LAYER) as cap:
        steered.generate(prompts, max_new_tokens=1)
    return cap.values[0]


def test_amplification_raises_selected_activations_on_held_out_prompts(
    tiny_loaded: LoadedModel,
) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=2.0))
    with steered.steering(False):
        clean = _prefill_residual(steered, HELD_OUT)
    edited = _prefill_residual(steered, HELD_OUT)
    encoded = steered.encode(HELD_OUT)
    width = clean.shape[1]
    mask = torch.zeros(clean.shape[:2], dtype=torch.bool)
    for i, e in enumerate(encoded):
        mask[i, width - len(e.input_ids) + e.content_start :] = True
    before = feature_pre_acts(sae, clean, SELECTED)[mask]
    after = feature_pre_acts(sae, edited, SELECTED)[mask]
    assert (after > before).all()
    topk_before = sae.encode(clean)[..., list(SELECTED)][mask].mean()
    topk_after = sae.encode(edited)[..., list(SELECTED)][mask].mean()
    assert topk_after > topk_before
    # positions outside the mask (left padding, template prefix) are bit-identical
    assert torch.equal(edited[~mask], clean[~mask])
    assert (~mask).sum() > 0


@pytest.mark.parametrize(
    "strategy",
    [
        Calibration(SELECTED, target=1.0),
        Clamp(SELECTED, value=0.5),
        Ablate(SELECTED),
        Amplification(SELECTED, alpha=1.0, gate=Gate(HARM, 0.0, "token")),
    ],
    ids=lambda s: s.name,
)
def test_template_and_padding_positions_never_edited(
    tiny_loaded: LoadedModel, strategy: object
) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, strategy)  # type: ignore[arg-type]
    with steered.steering(False):
        clean = _prefill_residual(steered, PROMPTS)
    edited = _prefill_residual(steered, PROMPTS)
    encoded = steered.encode(PROMPTS)
    width = clean.shape[1]
    for i, e in enumerate(encoded):
        first = width - len(e.input_ids) + e.content_start
        assert e.content_start >= 2  # [BOS] <|user|> before the text
        assert torch.equal(edited[i, :first], clean[i, :first])


# --- conditional steering -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prompt", "token"])
def test_gate_closed_below_threshold_and_open_above(tiny_loaded: LoadedModel, mode: str) -> None:
    sae = make_sae(tiny_loaded)
    cond = Gate(HARM, threshold=0.1, mode=mode)  # type: ignore[arg-type]
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=8.0, gate=cond))
    with steered.steering(False):
        clean = steered.generate(PROMPTS, max_new_tokens=10)
    set_harm(sae, -100.0)  # harm features never fire
    closed = steered.generate(PROMPTS, max_new_tokens=10)
    assert ids_of(closed) == ids_of(clean)
    for r in closed:
        assert r.report.gate_open is False and r.report.gate_mode == mode
        assert r.report.edited_prompt_positions == 0
        assert r.report.edited_generated_positions == 0
        assert r.report.harm_score == 0.0
    set_harm(sae, 100.0)  # harm features fire everywhere
    opened = steered.generate(PROMPTS, max_new_tokens=10)
    assert ids_of(opened) != ids_of(clean)
    for r in opened:
        assert r.report.gate_open is True
        assert r.report.edited_prompt_positions == r.report.prompt_positions > 0
        assert r.report.edited_generated_positions == r.report.generated_positions


def test_prompt_gate_decision_holds_for_decoding(tiny_loaded: LoadedModel) -> None:
    """A gate opened by the prompt stays open while decoding, whatever the new tokens do."""
    sae = make_sae(tiny_loaded)
    cond = Gate(HARM, threshold=1.0, mode="prompt")
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=4.0, gate=cond))
    encoded = steered.encode(PROMPTS[:1])[0]
    calls = {"n": 0}

    def harm_only_in_prompt(h: torch.Tensor) -> torch.Tensor:
        # before the steering hook: make the harm features fire at prefill only
        calls["n"] += 1
        if calls["n"] == 1:
            direction = sae.W_enc[:, HARM[0]] / sae.W_enc[:, HARM[0]].norm()
            return h + 50 * direction
        return h

    with edit_residual(tiny_loaded.model, LAYER, harm_only_in_prompt):
        r = steered.generate([encoded], max_new_tokens=6)[0]
    assert r.report.gate_open is True
    assert r.report.edited_generated_positions == r.report.generated_positions == 5


# --- batching, caching, independence --------------------------------------------------------------

STRATEGIES = [
    Amplification(SELECTED, alpha=3.0),
    Calibration(SELECTED, target=2.5, gate=Gate(HARM, 0.0, "prompt")),
    Calibration(SELECTED, target=2.5, gate=Gate(HARM, 0.05, "token")),
    Clamp(SELECTED, value=1.0),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.describe())
def test_batch_and_single_agree(tiny_loaded: LoadedModel, strategy: object) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, strategy)  # type: ignore[arg-type]
    batch = steered.generate(PROMPTS, max_new_tokens=10)
    single = [steered.generate([p], max_new_tokens=10)[0] for p in PROMPTS]
    assert ids_of(batch) == ids_of(single)
    for b, s in zip(batch, single, strict=True):
        assert b.report.gate_open == s.report.gate_open
        assert b.report.edited_prompt_positions == s.report.edited_prompt_positions
        for fb, fs in zip(b.report.features, s.report.features, strict=True):
            assert fb.prompt.max == pytest.approx(fs.prompt.max, abs=1e-4)
            assert fb.generated.mean == pytest.approx(fs.generated.mean, abs=1e-4)


def manual_greedy(
    loaded: LoadedModel, sae: SparseAutoencoder | None, strategy: Any, enc: EncodedPrompt, n: int
) -> tuple[int, ...]:
    """Greedy decoding without a KV cache: the whole sequence is recomputed and edited each step."""
    ids = list(enc.input_ids)
    p = len(ids)
    gate = strategy.gate

    def edit(h: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(h.shape[:2], dtype=torch.bool)
        mask[0, enc.content_start :] = True
        gate_open = None
        if gate is not None and gate.mode == "prompt":  # decided from the prompt alone
            gate_open = gate.prompt_gate(h[:, :p], sae, mask[:, :p])
        return strategy(h, sae, mask, gate_open=gate_open)  # type: ignore[no-any-return]

    out: list[int] = []
    with torch.no_grad(), edit_residual(loaded.model, LAYER, edit):
        for _ in range(n):
            logits = loaded.model(torch.tensor([ids]), use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == loaded.model.generation_config.eos_token_id:
                break
    return tuple(out)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.describe())
def test_kv_cache_matches_no_cache_recompute(tiny_loaded: LoadedModel, strategy: Any) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, strategy)
    for prompt in PROMPTS:
        got = steered.generate([prompt], max_new_tokens=8)[0].token_ids
        enc = steered.encode([prompt])[0]
        assert got == manual_greedy(tiny_loaded, sae, strategy, enc, 8)


def test_calls_are_independent(tiny_loaded: LoadedModel) -> None:
    sae = make_sae(tiny_loaded)
    cond = Gate(HARM, threshold=0.5, mode="prompt")
    steered = SteeredModel(tiny_loaded, sae, Calibration(SELECTED, gate=cond))
    first = steered.generate(PROMPTS[1:2], max_new_tokens=8)[0]
    set_harm(sae, 100.0)
    steered.generate(PROMPTS, max_new_tokens=8)  # opens the gate for every row
    set_harm(sae, 0.0)
    again = steered.generate(PROMPTS[1:2], max_new_tokens=8)[0]
    assert again.token_ids == first.token_ids
    assert again.report == first.report


# --- reports --------------------------------------------------------------------------------------


def test_report_fields(tiny_loaded: LoadedModel) -> None:
    sae = make_sae(tiny_loaded)
    set_harm(sae, 100.0)
    cond = Gate(HARM, threshold=0.1, mode="prompt")
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=3.0, gate=cond))
    r = steered.generate(PROMPTS[:1], max_new_tokens=6)[0]
    rep = r.report
    assert rep.steered and rep.gate_mode == "prompt" and rep.gate_open
    assert rep.threshold == 0.1 and rep.harm_score is not None and rep.harm_score > 0.1
    enc = steered.encode(PROMPTS[:1])[0]
    assert rep.prompt_positions == len(enc.input_ids) - enc.content_start
    assert rep.generated_positions == len(r.token_ids) - 1
    roles = [(f.feature, f.role) for f in rep.features]
    assert roles == [
        (3, "selected"),
        (11, "selected"),
        (20, "selected"),
        (40, "harm"),
        (41, "harm"),
    ]
    for f in rep.features:
        assert f.prompt.max >= f.prompt.mean >= 0
        if f.role == "selected":
            assert f.prompt_steered.mean > f.prompt.mean
        else:
            assert f.prompt_steered == f.prompt
    assert {f.feature for f in rep.fired("harm")} == set(HARM)
    d = rep.to_dict()
    assert d["features"][0]["prompt"]["max"] == rep.features[0].prompt.max
    text = "\n".join(rep.lines(labels={3: "(cats)"}))
    assert "gate (prompt) open" in text and "selected 3 (cats)" in text
    assert r.finish_reason in ("stop", "length")
    assert isinstance(r.text, str)


def test_sampling_is_seeded_and_leaves_the_global_rng(tiny_loaded: LoadedModel) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=1.0))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = steered.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = steered.generate(PROMPTS, max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    assert ids_of(a) == ids_of(b)


# --- chat -----------------------------------------------------------------------------------------


def test_chat_multi_turn(tiny_loaded: LoadedModel) -> None:
    sae = make_sae(tiny_loaded)
    steered = SteeredModel(tiny_loaded, sae, Amplification(SELECTED, alpha=2.0))
    messages = [
        {"role": "system", "content": "you help"},
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "the cat"},
        {"role": "user", "content": "write a poem"},
    ]
    enc = encode_chat(tiny_loaded.tokenizer, messages)
    tokens = tiny_loaded.tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens[enc.content_start] == "tell"
    assert tokens[: enc.content_start] == [
        "[BOS]",
        "<|system|>",
        "you",
        "help",
        "<|end|>",
        "<|user|>",
    ]
    assert tokens[enc.content_end - 1] == "poem"
    r = steered.chat(messages, max_new_tokens=5)
    assert r.prompt_ids == tuple(enc.input_ids)
    assert r.report.prompt_positions == len(enc.input_ids) - enc.content_start
    single = steered.chat([{"role": "user", "content": "what is a tree"}], max_new_tokens=5)
    assert single.token_ids == steered.generate(["what is a tree"], max_new_tokens=5)[0].token_ids


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "empty"),
        ([{"role": "robot", "content": "hi"}], "roles are"),
        ([{"role": "user", "content": "  "}], "empty"),
        ([{"role": "user"}], "role.*content"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last"),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "x"},
                {"role": "user", "content": "hi"},
            ],
            "only the first",
        ),
        ("hello", "list"),
    ],
)
def test_chat_rejects_bad_messages(
    tiny_loaded: LoadedModel, messages: object, message: str
) -> None:
    steered = SteeredModel(tiny_loaded, make_sae(tiny_loaded), Ablate(SELECTED))
    with pytest.raises(SteeringError, match=message):
        steered.chat(messages)  # type: ignore[arg-type]


# --- checks ---------------------------------------------------------------------------------------


def test_sae_must_match_the_model(tiny_loaded: LoadedModel) -> None:
    sae = make_sae(tiny_loaded)
    wide = SparseAutoencoder(SAEConfig(d_in=48, d_sae=64, k=8, layer=LAYER))
    with pytest.raises(SAEError, match="d_in=48 does not match layer 2 width 32"):
        SteeredModel(tiny_loaded, wide, Ablate((1,)))
    sae.cfg.weights_id = "sha256:other"
    with pytest.raises(SAEError, match="sha256:other.*check_weights=False"):
        SteeredModel(tiny_loaded, sae, Ablate((1,)))
    SteeredModel(tiny_loaded, sae, Ablate((1,)), check_weights=False)
    sae.cfg.layer = None
    with pytest.raises(SteeringError, match="pass layer="):
        SteeredModel(tiny_loaded, sae, Ablate((1,)), check_weights=False)
    with pytest.raises(SteerlexError, match="out of range"):
        SteeredModel(tiny_loaded, sae, Ablate((1,)), layer=9, check_weights=False)
    sae.cfg.layer = LAYER
    with pytest.raises(SteeringError, match="d_sae=64"):
        SteeredModel(tiny_loaded, sae, Ablate((64,)), check_weights=False)


def test_bad_generate_arguments(tiny_loaded: LoadedModel) -> None:
    steered = SteeredModel(tiny_loaded, make_sae(tiny_loaded), Ablate(SELECTED))
    with pytest.raises(SteeringError, match="max_new_tokens"):
        steered.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(SteeringError, match="empty"):
        steered.generate([])
    with pytest.raises(SteeringError, match="prompt 1 is empty"):
        steered.generate(["what", " "])
    with pytest.raises(SteeringError, match="temperature"):
        steered.generate(PROMPTS, do_sample=True, temperature=0.0)
    with pytest.raises(SteeringError, match="strategy must be"):
        steered.strategy = "amplify"  # type: ignore[assignment]


def test_token_id_prompts_and_raw_text(tiny_loaded: LoadedModel) -> None:
    steered = SteeredModel(tiny_loaded, make_sae(tiny_loaded), Amplification(SELECTED, alpha=1.0))
    raw = steered.encode(["what is a tree"], chat=False)[0]
    assert raw.content_start == 1  # [BOS] is not edited
    by_ids = steered.generate([raw.input_ids], max_new_tokens=4)[0]
    by_text = steered.generate(["what is a tree"], max_new_tokens=4, chat=False)[0]
    assert by_ids.token_ids == by_text.token_ids
    assert by_ids.report.prompt_positions == len(raw.input_ids) - 1
