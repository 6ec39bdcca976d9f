"""Example conversations for the report: the same test prompts answered without a defence and
with a steering defence, and which reply tokens fire the selected features.

:func:`conversation_examples` reads the evaluation's ``generations.jsonl`` (and its
``scores.json`` beside it for the defence's headline strength), picks ``n`` test-split prompts
deterministically and, for both replies, runs the chat-formatted prompt + reply teacher-forced
through the model up to ``layer`` and encodes the reply positions with the SAE. The activations
are those of the model's own (unsteered) residual stream on the reply's tokens: what the
selected features read, before any steering edit, which is what a conditional gate sees.

Choice of prompts: half jailbreak (rounded up) and half benign; within each kind, prompts whose
rules-judge label differs between the two replies come first, the rest after, each group in the
order of a sha256 of the prompt id (stable, not alphabetical). Each example records why it was
chosen, so a reader knows the changed ones were preferred.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steerlex.core.errors import ReportError
from steerlex.core.io import read_json_object, write_json_atomic
from steerlex.models.chat import encode_prompt, has_chat_template
from steerlex.models.hooks import forward_to_layer
from steerlex.models.loading import LoadedModel
from steerlex.report.common import FIX, read_json_optional, read_jsonl_optional
from steerlex.report.features import token_decoder
from steerlex.sae.compat import check_sae_fits

__all__ = [
    "EXAMPLES_FILE",
    "conversation_examples",
    "headline_strength",
    "read_examples",
    "reply_activations",
    "write_examples",
]

EXAMPLES_FILE = "examples.json"
EXAMPLES_FORMAT = "steerlex-report-examples"
KINDS = ("jailbreak", "benign")


def headline_strength(scores: dict[str, Any], defence: str, path: Path) -> float | None:
    """``scores["tuning"]["chosen"][defence]["strength"]`` with errors naming ``path``."""
    chosen = scores.get("tuning", {}).get("chosen")
    if not isinstance(chosen, dict):
        raise ReportError(f"The evaluation scores {path} have no tuning.chosen block; {FIX}")
    if defence not in chosen:
        raise ReportError(
            f"The defence {defence!r} is not in the evaluation {path}; it has "
            f"{sorted(chosen)}. Pick one of those."
        )
    strength = chosen[defence].get("strength") if isinstance(chosen[defence], dict) else None
    return None if strength is None else float(strength)


def _same_strength(a: Any, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), b, rel_tol=1e-9, abs_tol=1e-12)


def _labels(row: dict[str, Any]) -> dict[str, str]:
    judges = row.get("judges") or {}
    return {
        name: str(v.get("label"))
        for name, v in judges.items()
        if isinstance(v, dict) and v.get("label") is not None
    }


def _by_prompt(
    rows: Sequence[dict[str, Any]], defence: str, strength: float | None
) -> dict[str, dict[str, Any]]:
    return {
        str(r["prompt_id"]): r
        for r in rows
        if r.get("defence") == defence
        and r.get("part") == "test"
        and r.get("prompt_kind") in KINDS
        and _same_strength(r.get("strength"), strength)
    }


def _order_key(prompt_id: str, changed: bool) -> tuple[bool, str]:
    return (not changed, hashlib.sha256(prompt_id.encode()).hexdigest())


def _choose(
    plain: dict[str, dict[str, Any]], steered: dict[str, dict[str, Any]], n: int
) -> list[tuple[str, bool]]:
    """``(prompt_id, label changed)`` of the chosen prompts (module docstring)."""
    pools: dict[str, list[tuple[str, bool]]] = {k: [] for k in KINDS}
    for pid in sorted(set(plain) & set(steered)):
        a = _labels(plain[pid]).get("rules")
        b = _labels(steered[pid]).get("rules")
        pools[str(plain[pid]["prompt_kind"])].append((pid, a != b))
    for pool in pools.values():
        pool.sort(key=lambda item: _order_key(*item))
    want = {"jailbreak": (n + 1) // 2, "benign": n // 2}
    spare = {k: max(0, want[k] - len(pools[k])) for k in KINDS}
    want = {
        "jailbreak": want["jailbreak"] + spare["benign"],
        "benign": want["benign"] + spare["jailbreak"],
    }
    return [item for k in KINDS for item in pools[k][: want[k]]]


def reply_activations(
    loaded: LoadedModel,
    sae: Any,
    layer: int,
    prompt: str,
    reply: str,
    features: Sequence[int],
    *,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """``{"tokens": [str], "token_ids": [int], "activations": [[float per feature] per token]}``
    of ``reply`` after the chat-formatted ``prompt``, teacher-forced to ``layer``."""
    tok, model = loaded.tokenizer, loaded.model
    enc = encode_prompt(tok, prompt, chat=has_chat_template(tok), system_prompt=system_prompt)
    reply_ids = [int(i) for i in tok(reply, add_special_tokens=False)["input_ids"]]
    if not reply_ids:
        return {"tokens": [], "token_ids": [], "activations": []}
    ids = torch.tensor([list(enc.input_ids) + reply_ids], dtype=torch.long, device=loaded.device)
    with torch.no_grad():
        resid = forward_to_layer(model, ids, torch.ones_like(ids), layer)[0]
        h = resid[len(enc.input_ids) :].to(sae.W_enc.device)
        f = sae.encode(h)[:, list(features)].float().cpu()
    decode = token_decoder(tok)
    return {
        "tokens": [decode(i) for i in reply_ids],
        "token_ids": reply_ids,
        "activations": [[float(f"{v:.4g}") for v in row] for row in f.tolist()],
    }


def _check_features(features: Sequence[int], sae: Any) -> list[int]:
    ids = [int(f) for f in features]
    d_sae = int(sae.cfg.d_sae)
    if not ids:
        raise ReportError("conversation_examples needs at least one selected feature id.")
    bad = [f for f in ids if not 0 <= f < d_sae]
    if bad:
        raise ReportError(f"Feature ids {bad[:5]} are outside the SAE's 0..{d_sae - 1}.")
    return ids


def conversation_examples(
    loaded: LoadedModel,
    sae: Any,
    layer: int,
    generations_path: str | Path,
    defence: str,
    features: Sequence[int],
    *,
    n: int = 4,
    scores_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    """``n`` test prompts answered without a defence and with ``defence`` at its headline
    strength, with the per-token activations of ``features`` on both replies.

    ``generations_path``: the evaluation's ``generations.jsonl``; ``scores_path``: its
    ``scores.json`` (default: beside it). Each example: ``prompt_id``, ``prompt_kind``,
    ``prompt``, ``defence``, ``strength``, ``features``, ``chosen_because`` and, for
    ``unsteered`` and ``steered``, ``reply``, ``judges`` (judge name -> label), ``tokens``,
    ``token_ids`` and ``activations`` (per reply token, one value per feature, in the order of
    ``features``). Fewer than ``n`` when fewer prompts have both replies.

    Raises:
        ReportError: missing or malformed evaluation files, an unknown defence, bad feature ids.
    """
    gen_path = Path(generations_path)
    s_path = Path(scores_path) if scores_path is not None else gen_path.parent / "scores.json"
    rows = read_jsonl_optional(gen_path, "evaluation generations")
    scores = read_json_optional(s_path, "evaluation scores")
    if rows is None or scores is None:
        missing = gen_path if rows is None else s_path
        raise ReportError(f"{missing} does not exist; run `steerlex eval` first.")
    ids = _check_features(features, sae)
    check_sae_fits(sae, loaded=loaded, layer=layer)
    strength = headline_strength(scores, defence, s_path)
    for i, r in enumerate(rows, start=1):
        if not all(k in r for k in ("defence", "prompt_id", "prompt", "reply")):
            raise ReportError(
                f"{gen_path} line {i} lacks defence, prompt_id, prompt or reply; {FIX}"
            )
    plain = _by_prompt(rows, "none", None)
    steered = _by_prompt(rows, defence, strength)
    out = []
    for pid, changed in _choose(plain, steered, max(0, n)):
        a, b = plain[pid], steered[pid]
        example: dict[str, Any] = {
            "prompt_id": pid,
            "prompt_kind": a["prompt_kind"],
            "prompt": a["prompt"],
            "defence": defence,
            "strength": strength,
            "features": ids,
            "chosen_because": "the rules judge's label changed"
            if changed
            else "next in the fixed (hashed prompt id) order",
        }
        for key, row in (("unsteered", a), ("steered", b)):
            acts = reply_activations(loaded, sae, layer, str(row["prompt"]), str(row["reply"]), ids)
            example[key] = {"reply": row["reply"], "judges": _labels(row), **acts}
        out.append(example)
    return out


def write_examples(path: str | Path, examples: Sequence[dict[str, Any]]) -> Path:
    """Write :func:`conversation_examples`' result as ``examples.json`` atomically."""
    out = Path(path)
    write_json_atomic(
        out, {"format": EXAMPLES_FORMAT, "format_version": 1, "examples": list(examples)}
    )
    return out


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """The examples in a file written by :func:`write_examples` (errors name the file)."""
    p = Path(path)
    data = read_json_object(p, what="report examples", fix=FIX, error=ReportError)
    examples = data.get("examples")
    if data.get("format") != EXAMPLES_FORMAT or not isinstance(examples, list):
        raise ReportError(f"{p} is not an examples file written by steerlex; {FIX}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not all(k in ex for k in ("prompt", "steered", "unsteered")):
            raise ReportError(f"{p}: example {i} lacks prompt, steered or unsteered; {FIX}")
    return examples
