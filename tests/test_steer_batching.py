"""BatchDecoder: differently-steered, differently-sampled rows decoded together on the tiny Llama
give what each gives alone."""

from __future__ import annotations

import pytest

from steerlex.core.errors import SteeringError
from steerlex.models.loading import LoadedModel
from steerlex.steer import (
    Amplification,
    Calibration,
    Gate,
    SteeredModel,
    SteeredResponse,
    encode_chat,
)
from steerlex.steer.batching import BatchDecoder, DecodeRequest
from test_steer_runtime import HARM, SELECTED, make_sae, set_harm

PROMPTS = [
    "tell me a short story about the cat",
    "what is a tree",
    "write a poem about rain and the sun",
    "please explain music",
    "water",
    "why is the night long and the day short when the sun is on the house",
]


def steered_model(loaded: LoadedModel) -> SteeredModel:
    sae = make_sae(loaded)
    set_harm(sae, 0.5)
    return SteeredModel(loaded, sae, Amplification(SELECTED, alpha=4.0))


def solo(steered: SteeredModel, request: DecodeRequest) -> SteeredResponse:
    """The same request through SteeredModel.generate, alone."""
    previous = steered.strategy
    if request.strategy != "model":
        steered.strategy = request.strategy  # type: ignore[assignment]
    enabled = steered.enabled if request.enabled is None else request.enabled
    try:
        with steered.steering(enabled):
            return steered.generate(
                [request.prompt],  # type: ignore[list-item]
                max_new_tokens=request.max_new_tokens,
                do_sample=request.do_sample,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
            )[0]
    finally:
        steered.strategy = previous


def assert_same_report(got: SteeredResponse, want: SteeredResponse) -> None:
    a, b = got.report, want.report
    assert (a.strategy, a.steered, a.gate_mode, a.gate_open, a.threshold) == (
        b.strategy, b.steered, b.gate_mode, b.gate_open, b.threshold,
    )  # fmt: skip
    assert (a.prompt_positions, a.edited_prompt_positions) == (
        b.prompt_positions, b.edited_prompt_positions,
    )  # fmt: skip
    assert (a.generated_positions, a.edited_generated_positions) == (
        b.generated_positions, b.edited_generated_positions,
    )  # fmt: skip
    assert [(f.feature, f.role) for f in a.fired()] == [(f.feature, f.role) for f in b.fired()]
    assert (a.harm_score is None) == (b.harm_score is None)
    if a.harm_score is not None:
        assert a.harm_score == pytest.approx(b.harm_score, abs=1e-5)
    for fa, fb in zip(a.features, b.features, strict=True):
        for sa, sb in zip(fa._all(), fb._all(), strict=True):
            assert (sa.max, sa.mean) == pytest.approx((sb.max, sb.mean), abs=1e-5)


def assert_same(got: SteeredResponse, want: SteeredResponse) -> None:
    assert got.token_ids == want.token_ids
    assert got.prompt_ids == want.prompt_ids
    assert got.finish_reason == want.finish_reason
    assert got.text == want.text
    assert_same_report(got, want)


def mixed_requests() -> list[DecodeRequest]:
    gated = Calibration(SELECTED, target=2.5, gate=Gate(HARM, 0.1, "prompt"))
    return [
        DecodeRequest(PROMPTS[0], max_new_tokens=12),  # the model's strategy, on
        DecodeRequest(PROMPTS[1], max_new_tokens=5, enabled=False),  # steering off
        DecodeRequest(PROMPTS[2], max_new_tokens=9, strategy=Amplification(SELECTED, alpha=8.0)),
        DecodeRequest(PROMPTS[3], max_new_tokens=12, strategy=gated),
        DecodeRequest(PROMPTS[4], max_new_tokens=7, strategy=None),
        DecodeRequest(PROMPTS[5], max_new_tokens=10, strategy=gated),  # shares the strategy
        DecodeRequest(
            PROMPTS[1],
            max_new_tokens=8,
            strategy=Amplification(SELECTED, alpha=1.0, gate=Gate(HARM, 0.0, "token")),
        ),
        DecodeRequest(PROMPTS[0], max_new_tokens=1, strategy=Amplification(SELECTED, alpha=2.0)),
    ]


@pytest.mark.parametrize("max_batch", [8, 3])
def test_greedy_mixed_rows_match_each_alone(tiny_loaded: LoadedModel, max_batch: int) -> None:
    """max_batch=8: all rows prefill together; 3: rows join as others finish (mid-decode)."""
    steered = steered_model(tiny_loaded)
    requests = mixed_requests()
    together = BatchDecoder(steered, max_batch=max_batch).run(requests)
    assert len(together) == len(requests)
    for request, got in zip(requests, together, strict=True):
        assert_same(got, solo(steered, request))
    assert together[1].report.steered is False
    assert together[3].report.gate_open is not None
    # the two strengths really differ, so the rows did not share an edit
    assert (
        together[0].token_ids != together[2].token_ids or together[0].report != together[2].report
    )


def test_rows_submitted_mid_decode_match_alone(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    decoder = BatchDecoder(steered, max_batch=4)
    first = DecodeRequest(PROMPTS[5], max_new_tokens=12)
    chat = encode_chat(
        tiny_loaded.tokenizer,
        [{"role": "system", "content": "be short"}, {"role": "user", "content": PROMPTS[3]}],
    )
    later = [
        DecodeRequest(PROMPTS[4], max_new_tokens=6, enabled=False),
        DecodeRequest(chat, max_new_tokens=7),  # an encoded conversation
        DecodeRequest([2, 30, 31, 32], max_new_tokens=5, chat=False),  # token ids
        DecodeRequest(PROMPTS[2], max_new_tokens=8, strategy=Amplification(SELECTED, alpha=8.0)),
    ]
    tickets = {decoder.submit(first): first}
    results: dict[int, SteeredResponse] = {}
    for _ in range(3):
        results.update(decoder.step())
    assert decoder.running == 1 and not results
    for r in later:
        tickets[decoder.submit(r)] = r
    assert decoder.waiting == 4
    while decoder.running or decoder.waiting:
        results.update(decoder.step())
    assert set(results) == set(tickets)
    for ticket, request in tickets.items():
        assert_same(results[ticket], solo(steered, request))


def test_gate_decided_per_row_within_a_shared_strategy(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    probe = Calibration(SELECTED, target=2.5, gate=Gate(HARM, 0.0, "prompt", top_k=None))
    scores = sorted(
        {
            r.report.harm_score
            for r in BatchDecoder(steered).run(
                [DecodeRequest(p, max_new_tokens=1, strategy=probe) for p in PROMPTS]
            )
        }
    )
    assert len(scores) >= 2
    threshold = (scores[0] + scores[-1]) / 2
    gated = Calibration(SELECTED, target=2.5, gate=Gate(HARM, threshold, "prompt", top_k=None))
    requests = [DecodeRequest(p, max_new_tokens=6, strategy=gated) for p in PROMPTS]
    together = BatchDecoder(steered).run(requests)
    opened = {r.report.gate_open for r in together}
    assert opened == {True, False}
    for request, got in zip(requests, together, strict=True):
        assert_same(got, solo(steered, request))


def test_seeded_sampling_is_the_same_alone_and_together(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    sampled = [
        DecodeRequest(PROMPTS[0], max_new_tokens=10, do_sample=True, temperature=1.3, seed=7),
        DecodeRequest(
            PROMPTS[3],
            max_new_tokens=8,
            do_sample=True,
            temperature=0.9,
            top_p=0.9,
            seed=11,
            strategy=Amplification(SELECTED, alpha=8.0),
        ),
    ]
    others = [
        DecodeRequest(PROMPTS[2], max_new_tokens=9),
        DecodeRequest(PROMPTS[5], max_new_tokens=6, do_sample=True, seed=3, enabled=False),
    ]
    alone = [BatchDecoder(steered).run([r])[0] for r in sampled]
    mixed = BatchDecoder(steered, max_batch=3).run([others[0], sampled[0], others[1], sampled[1]])
    for a, m in zip(alone, [mixed[1], mixed[3]], strict=True):
        assert_same(m, a)
    # and the same as SteeredModel.generate with that seed (transformers' sampler, global RNG)
    for request, a in zip(sampled, alone, strict=True):
        assert a.token_ids == solo(steered, request).token_ids
    again = BatchDecoder(steered).run(sampled)
    assert [r.token_ids for r in again] == [r.token_ids for r in alone]
    reseeded = BatchDecoder(steered).run(
        [DecodeRequest(PROMPTS[0], max_new_tokens=10, do_sample=True, temperature=1.3, seed=8)]
    )
    assert reseeded[0].token_ids != alone[0].token_ids


def test_eos_per_row(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    base = BatchDecoder(steered).run([DecodeRequest(PROMPTS[0], max_new_tokens=8)])[0]
    stop = base.token_ids[1]
    cut = base.token_ids.index(stop) + 1
    rows = BatchDecoder(steered).run(
        [
            DecodeRequest(PROMPTS[0], max_new_tokens=8, eos_token_ids=(stop,)),
            DecodeRequest(PROMPTS[0], max_new_tokens=8, eos_token_ids=()),
        ]
    )
    assert rows[0].token_ids == base.token_ids[:cut]
    assert rows[0].finish_reason == "stop"
    assert rows[1].token_ids == base.token_ids[:8] or rows[1].finish_reason == "length"
    assert len(rows[1].token_ids) == 8


def test_bad_input_is_a_steering_error(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    decoder = BatchDecoder(steered)
    with pytest.raises(SteeringError, match="empty"):
        decoder.run([])
    with pytest.raises(SteeringError, match="max_new_tokens"):
        decoder.run([DecodeRequest(PROMPTS[0], max_new_tokens=0)])
    with pytest.raises(SteeringError):
        decoder.run([DecodeRequest(PROMPTS[0], strategy=Amplification((3, 64), alpha=2.0))])
    with pytest.raises(SteeringError, match="temperature"):
        decoder.submit(DecodeRequest(PROMPTS[0], do_sample=True, temperature=0.0))
    with pytest.raises(SteeringError, match="empty"):
        decoder.submit(DecodeRequest("   "))
    with pytest.raises(SteeringError, match="context"):
        decoder.submit(DecodeRequest(PROMPTS[0], max_new_tokens=500))
    with pytest.raises(SteeringError, match="max_batch"):
        BatchDecoder(steered, max_batch=0)
    # a refused request queues nothing, and the decoder still works
    assert decoder.waiting == 0 and decoder.running == 0
    assert decoder.run([DecodeRequest(PROMPTS[1], max_new_tokens=2)])[0].token_ids


# --- guards --------------------------------------------------------------------------------------


def _split_gate(steered: SteeredModel) -> Gate:
    """A prompt gate whose threshold lies between the prompts' harm scores: opens on some."""
    probe = Calibration(SELECTED, target=2.5, gate=Gate(HARM, 0.0, "prompt", top_k=None))
    scores = sorted(
        {
            r.report.harm_score
            for r in BatchDecoder(steered).run(
                [DecodeRequest(p, max_new_tokens=1, strategy=probe) for p in PROMPTS]
            )
        }
    )
    return Gate(HARM, (scores[0] + scores[-1]) / 2, "prompt", top_k=None)


def test_refuse_guard_answers_open_gates_with_the_refusal(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    gated = Calibration(SELECTED, target=2.5, gate=_split_gate(steered))
    refusal = "No, I will not."
    requests = [
        DecodeRequest(p, max_new_tokens=6, strategy=gated, guard="refuse", refusal=refusal)
        for p in PROMPTS
    ]
    got = BatchDecoder(steered, max_batch=3).run(requests)
    opened = [r.report.gate_open for r in got]
    assert set(opened) == {True, False}
    tok = tiny_loaded.tokenizer
    for request, r in zip(requests, got, strict=True):
        if r.report.gate_open:
            assert (r.text, r.finish_reason, r.guard) == (refusal, "content_filter", "refused")
            assert r.token_ids == tuple(tok.encode(refusal, add_special_tokens=False))
            assert r.report.generated_positions == 0
        else:  # a closed gate: the same reply as plain steering behind the gate
            assert r.guard is None and r.finish_reason in ("stop", "length")
            assert_same(r, solo(steered, DecodeRequest(request.prompt, 6, strategy=gated)))


def test_abort_guard_stops_where_the_detector_fires(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    gate = Gate(HARM, 0.0, "prompt", top_k=None)
    strategy = Calibration(SELECTED, target=2.5, gate=gate)
    plain = BatchDecoder(steered).run([DecodeRequest(PROMPTS[0], 10, strategy=strategy)])[0]
    assert plain.guard is None and len(plain.token_ids) > 2
    # a threshold no position reaches: nothing stops; one every position reaches: the first
    # reply token fed back stops the reply after one token
    never = DecodeRequest(PROMPTS[0], 10, strategy=strategy, guard="abort", abort_threshold=1e9)
    always = DecodeRequest(PROMPTS[0], 10, strategy=strategy, guard="abort", abort_threshold=-1e9)
    late, early = BatchDecoder(steered).run([never, always])
    assert late.token_ids == plain.token_ids and late.guard is None
    assert early.token_ids == plain.token_ids[:1]
    assert (early.finish_reason, early.guard) == ("content_filter", "aborted")


def test_guards_need_a_gate_and_valid_settings(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    decoder = BatchDecoder(steered)
    with pytest.raises(SteeringError, match="acts on the strategy's gate"):
        decoder.submit(DecodeRequest(PROMPTS[0], 4, guard="refuse"))  # Amplification: no gate
    gated = Calibration(SELECTED, target=2.5, gate=Gate(HARM, 0.1, "prompt"))
    with pytest.raises(SteeringError, match="guard must be one of"):
        decoder.submit(DecodeRequest(PROMPTS[0], 4, strategy=gated, guard="block"))  # type: ignore[arg-type]
    with pytest.raises(SteeringError, match="refusal must be a non-empty"):
        decoder.submit(DecodeRequest(PROMPTS[0], 4, strategy=gated, guard="refuse", refusal=" "))
    with pytest.raises(SteeringError, match="abort_threshold must be a finite"):
        decoder.submit(
            DecodeRequest(
                PROMPTS[0], 4, strategy=gated, guard="abort", abort_threshold=float("nan")
            )
        )


# --- stop strings, log-probabilities, callbacks, cancel -----------------------------------------


def test_stop_string_ends_the_row_and_cuts_the_text(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    tok = tiny_loaded.tokenizer
    base = BatchDecoder(steered).run([DecodeRequest(PROMPTS[0], max_new_tokens=12)])[0]
    # a stop string that the reply's text reaches at some token k < 12
    k = next(
        i for i in range(2, 12) if tok.decode(base.token_ids[:i]) != tok.decode(base.token_ids[:1])
    )
    text_k = tok.decode(base.token_ids[:k], skip_special_tokens=True)
    previous = tok.decode(base.token_ids[: k - 1], skip_special_tokens=True)
    stop = text_k[len(previous) - 1 :] if len(previous) else text_k
    cut = text_k.find(stop)
    assert cut >= 0
    rows = BatchDecoder(steered).run(
        [
            DecodeRequest(PROMPTS[0], max_new_tokens=12, stop=("never-in-the-reply", stop)),
            DecodeRequest(PROMPTS[0], max_new_tokens=12, stop=("never-in-the-reply",)),
        ]
    )
    got = rows[0]
    assert got.finish_reason == "stop"
    assert len(got.token_ids) <= k and got.token_ids == base.token_ids[: len(got.token_ids)]
    assert got.text == base.text[: base.text.find(stop)]
    assert stop not in got.text
    assert_same(rows[1], base)  # a stop string that never comes changes nothing
    with pytest.raises(SteeringError, match="empty string"):
        BatchDecoder(steered).submit(DecodeRequest(PROMPTS[0], stop=("",)))
    with pytest.raises(SteeringError, match="list of strings"):
        BatchDecoder(steered).submit(DecodeRequest(PROMPTS[0], stop=(3,)))  # type: ignore[arg-type]


def test_logprobs_are_the_models_and_greedy_picks_the_top(tiny_loaded: LoadedModel) -> None:
    import torch

    steered = steered_model(tiny_loaded)
    request = DecodeRequest(PROMPTS[2], max_new_tokens=6, logprobs=3)
    got = BatchDecoder(steered).run([request, DecodeRequest(PROMPTS[0], max_new_tokens=4)])[0]
    assert got.logprobs is not None and len(got.logprobs) == len(got.token_ids)
    plain = BatchDecoder(steered).run([DecodeRequest(PROMPTS[2], max_new_tokens=6)])[0]
    assert plain.logprobs is None and plain.token_ids == got.token_ids
    for entry, token in zip(got.logprobs, got.token_ids, strict=True):
        assert entry.token == token and entry.logprob <= 0
        assert len(entry.top) == 3
        assert entry.top[0][0] == token  # greedy: the chosen token is the likeliest
        assert entry.top[0][1] == pytest.approx(entry.logprob)
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
    # unsteered, the first token's log-probability is the model's own from one forward pass
    bare = BatchDecoder(steered).run(
        [DecodeRequest(PROMPTS[2], max_new_tokens=1, strategy=None, logprobs=2)]
    )[0]
    assert bare.logprobs is not None
    encoded = steered.encode([PROMPTS[2]])[0]
    with torch.no_grad():
        logits = tiny_loaded.model(torch.tensor([encoded.input_ids])).logits
    want = torch.log_softmax(logits[0, -1].float(), -1)
    assert bare.logprobs[0].logprob == pytest.approx(float(want[bare.token_ids[0]]), abs=1e-4)
    assert bare.logprobs[0].top[1][1] == pytest.approx(float(want.topk(2).values[1]), abs=1e-4)
    zero = BatchDecoder(steered).run([DecodeRequest(PROMPTS[2], max_new_tokens=2, logprobs=0)])[0]
    assert zero.logprobs is not None and all(e.top == () for e in zero.logprobs)
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(SteeringError, match="logprobs"):
            BatchDecoder(steered).submit(DecodeRequest(PROMPTS[0], logprobs=bad))  # type: ignore[arg-type]


def test_on_token_sees_every_token_in_order(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    seen: dict[int, list[int]] = {0: [], 1: []}
    requests = [
        DecodeRequest(
            PROMPTS[i], max_new_tokens=n, logprobs=1 if i == 0 else None,
            on_token=lambda t, lp, i=i: seen[i].append(t) if (lp is None) == (i == 1) else None,
        )
        for i, n in ((0, 7), (1, 5))
    ]  # fmt: skip
    rows = BatchDecoder(steered, max_batch=2).run(requests)
    assert seen[0] == list(rows[0].token_ids) and seen[1] == list(rows[1].token_ids)
    with pytest.raises(SteeringError, match="callable"):
        BatchDecoder(steered).submit(DecodeRequest(PROMPTS[0], on_token=3))  # type: ignore[arg-type]


def test_cancel_drops_waiting_and_running_rows(tiny_loaded: LoadedModel) -> None:
    steered = steered_model(tiny_loaded)
    decoder = BatchDecoder(steered, max_batch=2)
    keep = DecodeRequest(PROMPTS[3], max_new_tokens=10)
    tickets = [
        decoder.submit(keep),
        decoder.submit(DecodeRequest(PROMPTS[5], max_new_tokens=10)),
        decoder.submit(DecodeRequest(PROMPTS[1], max_new_tokens=10)),  # waits
    ]
    results = dict(decoder.step())
    assert decoder.running == 2 and decoder.waiting == 1
    assert decoder.cancel(tickets[1]) and decoder.cancel(tickets[2])
    assert not decoder.cancel(tickets[2]) and not decoder.cancel(999)
    while decoder.running or decoder.waiting:
        results.update(decoder.step())
    assert set(results) == {tickets[0]}
    assert_same(results[tickets[0]], solo(steered, keep))  # the survivor is unchanged
    assert not decoder.cancel(tickets[0])  # finished
