"""The utility cost of a defence: KL(defence || none) over reference answers, teacher-forced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.evaluate.cache import cache_key
from steerlex.evaluate.defences.base import Condition
from steerlex.evaluate.generation import GenerationRunner
from steerlex.evaluate.metrics import kl_per_position
from steerlex.evaluate.sets import EvalPrompt
from steerlex.models.chat import (
    EncodedPrompt,
    encode_prompt,
    has_chat_template,
    left_padded,
    pad_id,
)
from steerlex.models.hooks import edit_residual
from steerlex.steer.runtime import SteeredModel

__all__ = ["answer_logits", "cached_kl", "kl_divergences"]


def _encode_with_answer(
    tok: Any, cond: Condition, prompt: str, answer_ids: list[int], chat: bool
) -> tuple[EncodedPrompt, list[int]]:
    enc = encode_prompt(tok, cond.wrap(prompt), chat=chat, system_prompt=cond.system_prompt)
    return enc, list(enc.input_ids) + answer_ids


@torch.no_grad()
def answer_logits(
    steered: SteeredModel,
    cond: Condition,
    prompts: Sequence[str],
    answers: Sequence[list[int]],
) -> list[Tensor]:
    """Teacher-forced logits ``[len(answer), vocab]`` predicting each answer token, per item,
    with ``cond`` applied as the runtime would (same editable positions, same prompt gate)."""
    loaded = steered.loaded
    tok, model = loaded.tokenizer, loaded.model
    chat = has_chat_template(tok)
    rows = [
        _encode_with_answer(tok, cond, p, a, chat) for p, a in zip(prompts, answers, strict=True)
    ]
    ids, attn, positions = left_padded([seq for _, seq in rows], pad_id(tok))
    n, width = ids.shape
    editable = torch.zeros((n, width), dtype=torch.bool)
    prompt_part = torch.zeros((n, width), dtype=torch.bool)
    for i, (enc, seq) in enumerate(rows):
        off = width - len(seq)
        editable[i, off + enc.content_start :] = True
        prompt_part[i, off + enc.content_start : off + len(enc.input_ids)] = True
    device = loaded.device
    ids, attn, positions = ids.to(device), attn.to(device), positions.to(device)
    strategy, sae = cond.strategy, steered.sae

    def edit(h: Tensor) -> Tensor:
        assert strategy is not None
        mask = editable.to(h.device)
        gate_open = None
        gate = strategy.gate
        if gate is not None and gate.mode == "prompt":
            gate_open = gate.prompt_gate(h, sae, prompt_part.to(h.device))
        return strategy(h, sae, mask, gate_open=gate_open)

    # rows are left-padded, so every answer lies in the last `keep` positions: only those
    # get logits (a long prompt's [width, vocab] logits would cost gigabytes)
    keep = max(len(seq) - len(enc.input_ids) for enc, seq in rows) + 1
    kw = {"input_ids": ids, "attention_mask": attn, "position_ids": positions,
          "logits_to_keep": keep}  # fmt: skip
    if strategy is None:
        logits = model(**kw).logits
    else:
        with edit_residual(model, steered.layer, edit):
            logits = model(**kw).logits
    out = []
    for i, (enc, seq) in enumerate(rows):
        start = keep - 1 - (len(seq) - len(enc.input_ids))
        out.append(logits[i, start : keep - 1].float().cpu())
    return out


def kl_divergences(
    steered: SteeredModel,
    conditions: Sequence[Condition],
    base: Condition,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int,
    max_tokens: int,
    lookup: Callable[[Condition, int], float | None] | None = None,
    store: Callable[[Condition, int, float], None] | None = None,
    progress: bool = True,
) -> dict[str, list[float | None]]:
    """Mean ``KL(condition || base)`` over the answer tokens of each (prompt, answer), per
    condition label; ``None`` for an empty answer.

    Answers are cut to ``max_tokens`` tokens. ``lookup``/``store`` give and keep cached values
    (by condition and item index); the base model runs once per batch that needs it.
    """
    tok = steered.loaded.tokenizer
    answer_ids = [
        list(tok(a, add_special_tokens=False)["input_ids"])[:max_tokens] if a.strip() else []
        for a in answers
    ]
    out: dict[str, list[float | None]] = {c.label: [None] * len(prompts) for c in conditions}
    todo = [i for i, a in enumerate(answer_ids) if a]
    bar = tqdm(total=len(todo) * len(conditions), desc="KL", unit="item", disable=not progress)
    for b0 in range(0, len(todo), batch_size):
        idx = todo[b0 : b0 + batch_size]
        need: list[Condition] = []
        for c in conditions:
            for i in idx:
                hit = lookup(c, i) if lookup is not None else None
                if hit is None:
                    need.append(c)
                    break
            else:
                for i in idx:
                    out[c.label][i] = lookup(c, i) if lookup is not None else None
                bar.update(len(idx))
        if not need:
            continue
        ps, ans = [prompts[i] for i in idx], [answer_ids[i] for i in idx]
        base_logits = answer_logits(steered, base, ps, ans)
        for c in need:
            logits = answer_logits(steered, c, ps, ans)
            for i, lb, ls in zip(idx, base_logits, logits, strict=True):
                value = float(kl_per_position(ls, lb).mean())
                out[c.label][i] = value
                if store is not None:
                    store(c, i, value)
            bar.update(len(idx))
    bar.close()
    return out


def cached_kl(
    runner: GenerationRunner,
    conditions: Sequence[Condition],
    base: Condition,
    reference: Condition,
    items: Sequence[EvalPrompt],
    *,
    max_tokens: int,
    progress: bool = True,
) -> tuple[dict[str, list[float | None]], list[str]]:
    """:func:`kl_divergences` of ``conditions`` against ``base`` over ``items``, through the
    run's cache, and the reference answers used: each item's ``meta["reference"]``, else its
    reply under ``reference`` (generated first if missing)."""
    cache = runner.cache
    runner.run([(reference, items)])
    refs = [p.meta.get("reference") or runner.reply(reference, p) for p in items]

    def kl_key(c: Condition, i: int) -> str:
        payload = {
            "prompt": items[i].text,
            "reference": refs[i],
            "defence": c.key,
            "max_tokens": max_tokens,
        }
        return cache_key(cache.model_id, "kl", payload)

    def lookup(c: Condition, i: int) -> float | None:
        rec = cache.records.get(kl_key(c, i))
        return float(rec["value"]) if rec is not None else None

    def store(c: Condition, i: int, value: float) -> None:
        cache.put_many(
            [{"key": kl_key(c, i), "kind": "kl", "prompt_id": items[i].id, "value": value}]
        )

    kl = kl_divergences(
        runner.steered,
        conditions,
        base,
        [p.text for p in items],
        refs,
        batch_size=int(runner.gen["batch_size"]),
        max_tokens=max_tokens,
        lookup=lookup,
        store=store,
        progress=progress,
    )
    return kl, refs
