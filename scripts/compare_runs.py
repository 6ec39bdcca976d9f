"""Compare two `steerlex run` directories file by file, apart from timings and paths.

    python scripts/compare_runs.py RUN_A RUN_B [--json OUT]

JSON and JSONL files are compared after dropping timing keys (seconds, finished, time,
tokens_per_s, ...) and replacing each run directory's own path by ``<run>``; the SAE
weights by their tensors; other files byte for byte (with the paths replaced). Prints one
line per file (same / differs / only in A / only in B) and exits 1 when a compared file
differs. Used to check that a refactor leaves the results of a run unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TIMING_KEYS = {
    "seconds",
    "seconds_per_token",
    "finished",
    "time",
    "tokens_per_s",
    "generated",
    "started",
    "model_loads",
}
SKIP_SUFFIXES = (".pt", ".lock")  # training checkpoints hold RNG and optimizer state


def _normalise(value: Any, roots: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, roots) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_normalise(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<run>")
        return value
    return value


def _load(path: Path, roots: list[str]) -> Any:
    text = path.read_text(encoding="utf-8")
    for root in roots:
        text = text.replace(root, "<run>")
    if path.suffix == ".json":
        return _normalise(json.loads(text), roots)
    if path.suffix == ".jsonl":
        return [_normalise(json.loads(line), roots) for line in text.splitlines() if line.strip()]
    return text


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v.tolist() for k, v in sorted(load_file(str(path)).items())}


def compare(a: Path, b: Path) -> dict[str, str]:
    """``{relative path: "same" | "differs" | "only in A" | "only in B"}``."""
    roots_a = [str(a.resolve()), str(a)]
    roots_b = [str(b.resolve()), str(b)]
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    out: dict[str, str] = {}
    for rel in sorted(files_a | files_b):
        if rel.endswith(SKIP_SUFFIXES) or rel.startswith("stages/") or rel == "run.json":
            continue
        if rel not in files_b:
            out[rel] = "only in A"
            continue
        if rel not in files_a:
            out[rel] = "only in B"
            continue
        pa, pb = a / rel, b / rel
        if pa.suffix == ".safetensors":
            same = _tensors(pa) == _tensors(pb)
        elif pa.suffix in (".json", ".jsonl", ".md", ".html", ".svg", ".txt"):
            same = _load(pa, roots_a) == _load(pb, roots_b)
        else:
            same = pa.read_bytes() == pb.read_bytes()
        out[rel] = "same" if same else "differs"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    args = p.parse_args(argv)
    result = compare(args.a, args.b)
    width = max((len(k) for k in result), default=0)
    for rel, verdict in result.items():
        print(f"{rel.ljust(width)}  {verdict}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 1 if any(v != "same" for v in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
