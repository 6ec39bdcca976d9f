"""Replies under each condition, through the generation cache, and their judged records."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from steerlex.evaluate.cache import EvalCache, cache_key
from steerlex.evaluate.config import GenerationConfig
from steerlex.evaluate.defences.base import Condition
from steerlex.evaluate.sets import EvalPrompt
from steerlex.judges.rules import RuleJudge
from steerlex.models.chat import encode_prompt, has_chat_template
from steerlex.steer.runtime import SteeredModel

__all__ = ["GenerationRunner", "Job", "Reply", "generate_replies"]

Job = tuple[Condition, Sequence[EvalPrompt]]
"""A condition and the prompts to answer under it."""


@dataclass(frozen=True)
class Reply:
    """One generated reply and what it cost (``seconds``: its share of the batch's wall time);
    ``gate_open``: the conditional gate's decision (``None`` without a gate)."""

    text: str
    tokens: int
    finish_reason: str
    seconds: float
    gate_open: bool | None = None


def generate_replies(
    steered: SteeredModel,
    cond: Condition,
    prompts: Sequence[str],
    *,
    gen: dict[str, Any],
    on_batch: Callable[[list[int], list[Reply]], None],
) -> None:
    """Reply to ``prompts`` under ``cond`` in length-sorted batches of ``gen["batch_size"]``;
    ``on_batch(indices, replies)`` after each batch (to cache and count progress)."""
    tok = steered.loaded.tokenizer
    chat = has_chat_template(tok)
    wrapped = [cond.wrap(p) for p in prompts]
    lengths = [
        len(encode_prompt(tok, w, chat=chat, system_prompt=cond.system_prompt).input_ids)
        for w in wrapped
    ]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    batch_size = int(gen["batch_size"])
    kw = {k: v for k, v in gen.items() if k != "batch_size"}
    steered.enabled = cond.strategy is not None
    steered.strategy = cond.strategy
    try:
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            t0 = time.perf_counter()
            responses = steered.generate(
                [wrapped[i] for i in idx],
                system_prompt=cond.system_prompt,
                chat=chat,
                batch_size=len(idx),
                **kw,
            )
            share = (time.perf_counter() - t0) / len(idx)
            replies = [
                Reply(r.text, len(r.token_ids), r.finish_reason, share, r.report.gate_open)
                for r in responses
            ]
            on_batch(idx, replies)
    finally:
        steered.enabled = False


class GenerationRunner:
    """Generates what the cache lacks and reads judged records back.

    ``bar`` (a tqdm bar, optional) is advanced by one per generated reply.
    """

    def __init__(
        self,
        steered: SteeredModel,
        cache: EvalCache,
        generation: GenerationConfig,
        judge: RuleJudge,
    ) -> None:
        self.steered = steered
        self.cache = cache
        self.judge = judge
        g = generation
        self.gen: dict[str, Any] = {
            "max_new_tokens": g.max_new_tokens,
            "batch_size": g.batch_size,
            "do_sample": g.do_sample,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "seed": g.seed,
        }
        self.gen_key = {k: v for k, v in self.gen.items() if k != "batch_size"}
        self.bar: Any = None

    def key(self, cond: Condition, prompt: EvalPrompt) -> str:
        """The cache key of ``prompt``'s reply under ``cond``."""
        return cache_key(
            self.cache.model_id,
            "generation",
            {"prompt": prompt.text, "defence": cond.key, "generation": self.gen_key},
        )

    def missing(self, jobs: Sequence[Job]) -> int:
        """How many (condition, prompt) pairs of ``jobs`` are not cached yet (each pair once)."""
        keys = {self.key(c, p) for c, ps in jobs for p in ps}
        return sum(1 for k in keys if k not in self.cache)

    def cached(self, jobs: Sequence[Job]) -> int:
        """How many (condition, prompt) pairs of ``jobs`` are cached (each pair once)."""
        keys = {self.key(c, p) for c, ps in jobs for p in ps}
        return sum(1 for k in keys if k in self.cache)

    def run(self, jobs: Sequence[Job]) -> None:
        """Generate every uncached (condition, prompt) of ``jobs``."""
        for cond, prompts in jobs:
            todo = [p for p in prompts if self.key(cond, p) not in self.cache]
            if not todo:
                continue
            if self.bar is not None:
                self.bar.set_postfix_str(cond.label)

            def on_batch(
                idx: list[int],
                replies: list[Reply],
                c: Condition = cond,
                ps: list[EvalPrompt] = todo,
            ) -> None:
                self.cache.put_many(
                    {
                        "key": self.key(c, ps[i]),
                        "kind": "generation",
                        "prompt_id": ps[i].id,
                        "defence": c.key,
                        "generation": self.gen_key,
                        "text": r.text,
                        "tokens": r.tokens,
                        "finish_reason": r.finish_reason,
                        "seconds": r.seconds,
                        "gate_open": r.gate_open,
                        "time": time.time(),
                    }
                    for i, r in zip(idx, replies, strict=True)
                )
                if self.bar is not None:
                    self.bar.update(len(idx))

            generate_replies(
                self.steered, cond, [p.text for p in todo], gen=self.gen, on_batch=on_batch
            )

    def reply(self, cond: Condition, prompt: EvalPrompt) -> str:
        """The cached reply text (it must be generated)."""
        return str(self.cache.records[self.key(cond, prompt)]["text"])

    def records(self, cond: Condition, prompts: Sequence[EvalPrompt]) -> list[dict[str, Any]]:
        """One judged record per prompt (all must be generated)."""
        out = []
        for p in prompts:
            rec = self.cache.records[self.key(cond, p)]
            harmful = p.kind in ("jailbreak", "harmful")
            verdict = self.judge.judge(
                str(rec["text"]),
                harmful=harmful,
                behaviour=p.behaviour,
                finished=rec["finish_reason"] == "stop",
            )
            out.append(
                {
                    "defence": cond.defence,
                    "kind": cond.kind,
                    "strength": cond.strength,
                    "part": p.part,
                    "prompt_id": p.id,
                    "prompt_kind": p.kind,
                    "behaviour": p.behaviour,
                    "prompt": p.text,
                    "reply": rec["text"],
                    "tokens": rec["tokens"],
                    "finish_reason": rec["finish_reason"],
                    "seconds": rec["seconds"],
                    "gate_open": rec.get("gate_open"),
                    "meta": dict(p.meta),
                    "judges": {"rules": verdict.to_json()},
                }
            )
        return out
