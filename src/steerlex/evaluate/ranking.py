"""Candidate features ranked by their measured effect on refusal: the check that gives the
explanation route a fair chance (issue 13). Explanations propose candidates (e.g. the 32
features whose words best match "safety"); each is steered alone on the selection split's
harmful tuning prompts and kept only if it makes a refusal more likely than compliance.

The refusal margin of a prompt is ``log P(REFUSAL) - log P(COMPLIANCE)``, the summed log
probabilities of two fixed reply openings, teacher-forced (no generation: one pass over the
prompts, whose KV cache both openings continue); a feature's effect is the mean change of the
margin it causes.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from steerlex.evaluate.cache import EvalCache, cache_key
from steerlex.models.chat import encode_prompt, has_chat_template, left_padded, pad_id
from steerlex.models.hooks import edit_residual
from steerlex.steer.runtime import SteeredModel
from steerlex.steer.strategies import SteeringStrategy

__all__ = [
    "COMPLIANCE",
    "RANK_MAX_TOKENS",
    "RANK_PROMPTS",
    "REFUSAL",
    "FeatureEffect",
    "rank_by_refusal",
]

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure, here is"
RANK_PROMPTS = 8
"""Harmful tuning prompts each candidate is measured on."""
RANK_MAX_TOKENS = 64
"""The longest of them, in tokens of the request."""


@dataclass(frozen=True)
class FeatureEffect:
    """One candidate: its mean change of the refusal margin (positive: more refusal)."""

    id: int
    effect: float


@torch.no_grad()
def _margins(
    steered: SteeredModel, strategy: SteeringStrategy | None, prompts: Sequence[str], batch: int
) -> list[float]:
    """The refusal margin of each prompt with ``strategy`` applied from the user's text on:
    one pass over the left-padded prompts (its KV cache shared), then each opening."""
    loaded = steered.loaded
    tok, model = loaded.tokenizer, loaded.model
    chat = has_chat_template(tok)
    answers = [
        list(tok(text, add_special_tokens=False)["input_ids"]) for text in (REFUSAL, COMPLIANCE)
    ]
    current: dict[str, Tensor] = {}  # the positions the next forward pass may edit
    # transformers 5 renamed the KV cache argument and output (past_key_values -> cache)
    cache_name = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else ("past_key_values")
    )

    def edit(h: Tensor) -> Tensor:
        assert strategy is not None
        return strategy(h, steered.sae, current["mask"].to(h.device))

    out: list[float] = []
    for b0 in range(0, len(prompts), batch):
        enc = [encode_prompt(tok, p, chat=chat) for p in prompts[b0 : b0 + batch]]
        ids, attn, pos = left_padded([e.input_ids for e in enc], pad_id(tok))
        width = ids.shape[1]
        editable = torch.zeros((len(enc), width), dtype=torch.bool)
        for i, e in enumerate(enc):
            editable[i, width - len(e.input_ids) + e.content_start :] = True
        dev = loaded.device
        ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
        current["mask"] = editable
        with edit_residual(model, steered.layer, edit) if strategy else nullcontext():
            # only the last position's logits are read: the first opening token
            first = model(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
            logp = []
            for answer in answers:
                n = len(answer)
                current["mask"] = torch.ones((len(enc), n), dtype=torch.bool)
                cont = torch.tensor([answer] * len(enc), device=dev)
                rest = model(
                    input_ids=cont,
                    attention_mask=torch.cat([attn, torch.ones_like(cont)], dim=1),
                    position_ids=pos[:, -1:] + 1 + torch.arange(n, device=dev),
                    use_cache=True,
                    **{cache_name: copy.deepcopy(first[cache_name])},
                )
                # log P(token j | prompt, answer[:j]): the prompt pass predicts token 0
                logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1).float()
                lp = F.log_softmax(logits, dim=-1).gather(2, cont[:, :, None]).squeeze(2)
                logp.append(lp.sum(dim=1).cpu())
        out += (logp[0] - logp[1]).tolist()
    return out


@torch.no_grad()
def rank_by_refusal(
    steered: SteeredModel,
    candidates: Sequence[int],
    strategy_of: Callable[[int], SteeringStrategy],
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = True,
    cache: EvalCache | None = None,
    context: dict[str, Any] | None = None,
) -> tuple[list[FeatureEffect], float]:
    """Every candidate's effect on the refusal margin of ``prompts`` (the first
    :data:`RANK_PROMPTS`), best first, and the unsteered mean margin.
    ``strategy_of(feature)`` steers that feature alone. With ``cache`` (the evaluation's),
    each strategy's margins are kept under a key of the strategy, the prompts and
    ``context`` (e.g. the SAE's fingerprint and the layer), so a rerun measures nothing
    twice."""
    ps = list(prompts[:RANK_PROMPTS])

    def margins(strategy: SteeringStrategy | None) -> list[float]:
        if cache is None:
            return _margins(steered, strategy, ps, batch_size)
        payload = {
            "strategy": repr(strategy),
            "prompts": ps,
            "answers": [REFUSAL, COMPLIANCE],
            **(context or {}),
        }
        key = cache_key(cache.model_id, "rank", payload)
        rec = cache.get(key)
        if rec is not None:
            return [float(v) for v in rec["value"]]
        got = _margins(steered, strategy, ps, batch_size)
        cache.put_many([{"key": key, "kind": "rank", "value": got}])
        return got

    base = margins(None)
    effects = []
    for f in tqdm(candidates, desc="rank features", unit="feature", disable=not progress):
        got = margins(strategy_of(int(f)))
        diff = sum(g - b for g, b in zip(got, base, strict=True)) / len(ps)
        effects.append(FeatureEffect(int(f), diff))
    effects.sort(key=lambda e: (-e.effect, e.id))
    return effects, sum(base) / len(base)
