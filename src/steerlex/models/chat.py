"""Chat formatting through the tokenizer's own chat template, and token-position masks.

:func:`encode_prompt` tokenizes one user message (chat-formatted or raw) and tells,
for every token, whether it belongs to the template prefix (BOS, system prompt,
role header), to the user's own text, or to what follows it (end-of-turn and the
assistant header). Harvesting uses that to leave out template positions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from steerlex.core.errors import SteerlexError
from steerlex.models.hooks import forward_to_layer

if TYPE_CHECKING:
    from torch import Tensor

_SENTINEL = "\u2063STEERLEX\u2063"
_SURROGATE = re.compile("[\ud800-\udfff]")

Keep = Literal["all", "no-bos", "no-prefix", "content"]
KEEP_CHOICES: tuple[Keep, ...] = ("all", "no-bos", "no-prefix", "content")
"""Which token positions to keep:

- ``all``: every real (non-pad) token;
- ``no-bos``: all but a leading BOS/special token at position 0;
- ``no-prefix``: drop everything before the user's text (BOS, system prompt, role
  header) and keep the user's text and the template tokens after it;
- ``content``: only the user's text.
"""


def undecodable(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text, or ``None`` when it is.

    Bytes that are not UTF-8 reach Python as lone surrogates: ``sys.argv`` and a stdin in
    ``surrogateescape`` mode turn byte ``0xff`` into ``"\\udcff"``; JSON's ``"\\ud800"`` escape
    gives one too. Tokenizers cannot encode them (they fail with a bare ``TypeError``).
    """
    found = _SURROGATE.search(text)
    if found is None:
        return None
    i, code = found.start(), ord(found.group())
    near = "".join(_shown(c) for c in text[max(0, i - 20) : i + 20])
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    return f"{what} at character {i} (near '{near}')"


def _shown(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch if ch.isprintable() else repr(ch)[1:-1]


def check_text(text: str, what: str, error: type[SteerlexError] = SteerlexError) -> None:
    """Refuse ``text`` that is not valid UTF-8 (see :func:`undecodable`), naming it as ``what``."""
    why = undecodable(text)
    if why is not None:
        raise error(
            f"{what} is not valid UTF-8 text: {why}. Give it as UTF-8 (convert a file with e.g. "
            "iconv -f latin1 -t utf-8; in a terminal, use a UTF-8 locale such as LANG=C.UTF-8)."
        )


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(
    tokenizer: Any,
    user: str,
    *,
    system_prompt: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Format one user turn (and an optional system prompt) with the chat template."""
    if not has_chat_template(tokenizer):
        raise SteerlexError(
            "This tokenizer has no chat template, so it cannot format chat messages; "
            "use raw text (--no-chat) or a chat model."
        )
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text)


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt and where the user's text lies among them.

    ``content_start``/``content_end`` are token indices: tokens in
    ``[content_start, content_end)`` overlap the user's text.
    """

    input_ids: list[int]
    content_start: int
    content_end: int

    def keep_positions(self, keep: Keep, special_ids: set[int]) -> list[int]:
        """Token positions to keep under the ``keep`` rule."""
        n = len(self.input_ids)
        if keep == "all":
            return list(range(n))
        if keep == "no-bos":
            start = 1 if n and self.input_ids[0] in special_ids else 0
            return list(range(start, n))
        if keep == "no-prefix":
            return list(range(self.content_start, n))
        if keep == "content":
            return list(range(self.content_start, self.content_end))
        raise SteerlexError(f"Unknown keep rule '{keep}'; use one of {', '.join(KEEP_CHOICES)}.")


def encode_prompt(
    tokenizer: Any,
    text: str,
    *,
    chat: bool,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> EncodedPrompt:
    """Tokenize ``text`` (wrapped in the chat template when ``chat``) and locate it.

    A prompt longer than ``max_length`` tokens keeps its first ``max_length``
    tokens: the template prefix survives and the tail (possibly including the
    end-of-turn and assistant header) is cut.

    Raises:
        SteerlexError: ``text`` or ``system_prompt`` is not valid UTF-8 (:func:`check_text`).
    """
    check_text(text, "the prompt")
    if system_prompt is not None:
        check_text(system_prompt, "the system prompt")
    if chat:
        formatted = chat_text(tokenizer, text, system_prompt=system_prompt)
        start_char = _content_offset(tokenizer, formatted, text, system_prompt)
        enc = tokenizer(formatted, add_special_tokens=False, return_offsets_mapping=True)
    else:
        formatted = text
        start_char = 0
        enc = tokenizer(formatted, add_special_tokens=True, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    end_char = start_char + len(text)
    first = next(
        (i for i, (s, e) in enumerate(offsets) if e > start_char and s < end_char and e > s),
        len(ids),
    )
    last = max(
        (i + 1 for i, (s, e) in enumerate(offsets) if e > start_char and s < end_char and e > s),
        default=first,
    )
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
        first, last = min(first, max_length), min(last, max_length)
    return EncodedPrompt(ids, first, last)


def _content_offset(tokenizer: Any, formatted: str, text: str, system_prompt: str | None) -> int:
    """Character offset of the user's text inside the formatted chat string."""
    probe = chat_text(tokenizer, _SENTINEL, system_prompt=system_prompt)
    pos = probe.find(_SENTINEL)
    if pos >= 0 and formatted.startswith(probe[:pos]) and formatted[pos:].startswith(text):
        return pos
    # The template rewrote the content (e.g. stripped it): search after the prefix.
    found = formatted.find(text.strip(), max(pos, 0))
    if found < 0:
        raise SteerlexError(
            "Could not locate the user's text inside the chat-formatted prompt; "
            "use --keep all with this tokenizer."
        )
    return found


def pad_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def left_padded(
    seqs: Sequence[Sequence[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of token sequences padded on the left
    (real tokens end at the last column, so row ``i`` starts at ``width - len(seqs[i])``)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return ids, mask, pos


def prompt_residuals(
    loaded: Any,
    texts: Sequence[str],
    layer: int,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    system_prompt: str | None = None,
    skip_empty: bool = False,
) -> Iterator[tuple[list[EncodedPrompt], Tensor]]:
    """Encode ``texts`` as prompts (chat-formatted when the tokenizer has a template, raw
    otherwise), run them ``batch_size`` at a time, right-padded, to ``layer`` only, and yield
    ``(encodings, residual [n, width, d])`` per batch (row ``i`` belongs to ``encodings[i]``;
    positions past ``len(encodings[i].input_ids)`` are padding). ``skip_empty`` drops
    prompts with no token of user text before the forward pass.
    """
    tok, model = loaded.tokenizer, loaded.model
    chat = has_chat_template(tok)
    pad = pad_id(tok)
    for start in range(0, len(texts), batch_size):
        enc = [
            encode_prompt(tok, t, chat=chat, system_prompt=system_prompt, max_length=max_length)
            for t in texts[start : start + batch_size]
        ]
        if skip_empty:
            enc = [e for e in enc if e.content_end > e.content_start]
        if not enc:
            continue
        width = max(len(e.input_ids) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
        with torch.no_grad():
            resid = forward_to_layer(model, ids.to(loaded.device), mask.to(loaded.device), layer)
        yield enc, resid
