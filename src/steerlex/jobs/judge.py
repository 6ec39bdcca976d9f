"""The judge job: label each reply of a JSONL file harmful or not with a registered judge.

Input lines carry ``behavior`` (the harmful request; ``behaviour`` is accepted too) and
``reply``, optionally ``prompt`` (the full prompt the model saw) and ``context``. The output
has the same lines, in order, with ``harmful`` (``true``/``false``; ``null`` when the judge
failed on the line, counted as unjudged), ``judge`` (the judge's versioned name) and
``reason`` added. Verdicts are cached, so a rerun after an interruption only judges what is
left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlex.core.config import option, section
from steerlex.core.errors import EvalError
from steerlex.core.io import write_bytes_atomic
from steerlex.jobs.context import RunContext
from steerlex.judges import JudgeConfig, JudgeEnv, JudgeItem, make_judge
from steerlex.models.cache import cache_root
from steerlex.models.loading import DTYPES

__all__ = ["JudgeJobConfig", "JudgeSummary", "judge_job", "read_judge_input"]


@dataclass
class JudgeJobConfig:
    """``steerlex judge``: which file, where to, and which judge."""

    input: str = option(required=True, help="JSONL file: behavior, reply[, prompt, context]")
    out: str = option(required=True, help="output JSONL file (the input lines plus verdicts)")
    judge: JudgeConfig = section(JudgeConfig, help="the judge and its options")
    cache: str | None = option(
        None, help="folder of cached verdicts (default: the steerlex cache's judges/)"
    )
    device: str = option("cpu", help="torch device of a judge model")
    dtype: str = option(
        "float32",
        choices=DTYPES,
        help="dtype of an llm or guard judge's model (a probe judge: the one its head was fitted on)",
    )


@dataclass(frozen=True)
class JudgeSummary:
    """What a judge job did: the output file, the judge, and the counts."""

    out: Path
    judge: str
    n: int
    harmful: int
    unjudged: int


def _text(line: dict[str, Any], key: str, where: str, *, required: bool) -> str | None:
    value = line.get(key)
    if value is None:
        if required:
            raise EvalError(f"{where} has no {key!r}; every line needs 'behavior' and 'reply'.")
        return None
    if not isinstance(value, str):
        raise EvalError(f"{where}: {key!r} must be a string, got {type(value).__name__}.")
    return value


def read_judge_input(path: Path) -> tuple[list[dict[str, Any]], list[JudgeItem]]:
    """The lines of ``path`` and one :class:`JudgeItem` per line.

    Raises:
        EvalError: a missing or empty file, a line that is not a JSON object, or one without
            ``behavior``/``reply`` (named by file and line number).
    """
    if not path.is_file():
        raise EvalError(f"The judge input {path} does not exist (a JSONL file is expected).")
    lines: list[dict[str, Any]] = []
    items: list[JudgeItem] = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            raw_lines = fh.readlines()
        except UnicodeDecodeError as exc:
            raise EvalError(f"The judge input {path} is not UTF-8 text ({exc}).") from None
    for no, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        where = f"{path} line {no}"
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where} is not JSON ({exc.msg}).") from None
        if not isinstance(line, dict):
            raise EvalError(f"{where} must be a JSON object, got {type(line).__name__}.")
        key = "behavior" if "behavior" in line else "behaviour"
        behaviour = _text(line, key, where, required=True)
        reply = _text(line, "reply", where, required=True)
        assert behaviour is not None and reply is not None
        prompt = _text(line, "prompt", where, required=False)
        context = _text(line, "context", where, required=False)
        lines.append(line)
        items.append(JudgeItem(behaviour, reply, prompt=prompt, context=context or None))
    if not items:
        raise EvalError(f"The judge input {path} holds no lines to judge.")
    return lines, items


def judge_job(cfg: JudgeJobConfig, ctx: RunContext) -> JudgeSummary:
    """Judge every line of ``cfg.input`` and write ``cfg.out`` atomically."""
    src, out = Path(cfg.input), Path(cfg.out)
    if out.resolve() == src.resolve():
        raise EvalError(f"--out {out} is the input file; write the verdicts to another file.")
    if out.parent.exists() and not out.parent.is_dir():
        raise EvalError(f"--out {out}: {out.parent} is not a folder.")
    lines, items = read_judge_input(src)
    cache = Path(cfg.cache) if cfg.cache else cache_root() / "judges"
    env = JudgeEnv(
        cfg.judge, cfg.device, cfg.dtype, cache,
        lambda spec, dtype: ctx.model(spec, device=cfg.device, dtype=dtype),
    )  # fmt: skip
    judge = make_judge(env)
    verdicts = judge.judge_many(items, progress=ctx.progress)
    rows = []
    for line, v in zip(lines, verdicts, strict=True):
        harmful = None if v.label == "unjudged" else v.label == "harmful"
        rows.append({**line, "harmful": harmful, "judge": v.judge, "reason": v.reason})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, text.encode("utf-8"))
    return JudgeSummary(
        out,
        judge.name,
        len(rows),
        sum(1 for r in rows if r["harmful"] is True),
        sum(1 for r in rows if r["harmful"] is None),
    )
