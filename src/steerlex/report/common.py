"""What the report and the feature browser share: reading a run directory's files (a missing
file is a stage that did not run; a malformed one is an error naming it), the page shell with its
inline CSS, and safe embedding of data and text in HTML."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from steerlex.core.errors import ReportError
from steerlex.core.io import read_json_object

__all__ = [
    "NOT_RUN",
    "ReportError",
    "dig",
    "esc",
    "json_for_script",
    "page",
    "read_json_optional",
    "read_jsonl_optional",
]

#: What a section shows when the stage that writes its input did not run.
NOT_RUN = "not run"

FIX = "rerun the stage that writes it (or delete it to show the section as not run)."


def dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...`` or ``None`` when any level is missing or not a mapping."""
    for k in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(k)
    return data


def esc(value: object) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def read_json_optional(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when the file does not exist; a
    :class:`ReportError` naming the file when it is not a JSON object."""
    if not path.exists():
        return None
    return read_json_object(path, what=what, fix=FIX, error=ReportError)


def read_jsonl_optional(path: Path, what: str) -> list[dict[str, Any]] | None:
    """The JSON objects of a JSON-lines file, ``None`` when it does not exist; a
    :class:`ReportError` naming the file and line when a line is not a JSON object."""
    if not path.exists():
        return None
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"Cannot read the {what} {path} ({exc}); {FIX}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ReportError(
                f"The {what} {path} line {n} is not valid JSON ({exc}); {FIX}"
            ) from None
        if not isinstance(row, dict):
            raise ReportError(
                f"The {what} {path} line {n} is not a JSON object but {type(row).__name__}; {FIX}"
            )
        rows.append(row)
    return rows


def require_keys(data: Mapping[str, Any], keys: Iterable[str], path: Path, what: str) -> None:
    """Raise :class:`ReportError` naming ``path`` unless ``data`` has every key."""
    missing = [k for k in keys if k not in data]
    if missing:
        raise ReportError(f"The {what} {path} lacks the key(s) {missing}; {FIX}")


def _finite(data: Any) -> Any:
    """``data`` with NaN and infinities replaced by ``None`` (JSON.parse rejects them)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {str(k): _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def json_for_script(data: Any) -> str:
    """``data`` as JSON that is safe inside ``<script type="application/json">``: ``<``, ``>``
    and ``&`` are written as ``\\u`` escapes, so no text in it can close the tag."""
    text = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


CSS = """
:root { --fg: #1d1d1f; --muted: #666; --line: #ddd; --accent: #1f77b4; --bg2: #f6f7f9; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; line-height: 1.45; font-size: 15px; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 64px; }
h1 { font-size: 1.6em; margin: 0.4em 0; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg2); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: var(--bg2); padding: 8px; overflow: auto; font-size: 0.85em; max-height: 480px; }
code { font-size: 0.9em; }
details { margin: 8px 0; }
summary { cursor: pointer; color: var(--accent); }
a { color: var(--accent); }
.muted, .note { color: var(--muted); }
.not-run { color: #a05a00; background: #fff6e5; border: 1px solid #f0d8a8; padding: 6px 10px;
           display: inline-block; border-radius: 4px; }
.words { font-size: 0.9em; }
.badge { display: inline-block; padding: 1px 6px; border-radius: 8px; font-size: 0.8em;
         background: #e8f0fa; color: #1f4f7a; margin-right: 4px; }
.badge.refusal { background: #e6f4ea; color: #1e6b34; }
.badge.compliance { background: #fde8e8; color: #9b1c1c; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace;
          font-size: 0.85em; background: var(--bg2); padding: 8px; border-radius: 4px; }
mark { background: rgba(255, 140, 0, 0.5); color: inherit; border-radius: 2px; }
.conv { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.conv > div { min-width: 0; }
.prompt { white-space: pre-wrap; max-height: 220px; overflow: auto; background: var(--bg2);
          padding: 8px; font-size: 0.85em; border-radius: 4px; }
img.plot, svg.plot { max-width: 100%; height: auto; }
.panel { border: 1px solid #b9d3ec; background: #f2f7fc; padding: 4px 14px; border-radius: 6px;
         margin: 10px 0 14px; }
"""


def page(title: str, body: str, *, extra_head: str = "") -> str:
    """A complete HTML document with the shared inline CSS; ``body`` is already HTML."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n{extra_head}</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
