"""``steerlex generate``, ``steerlex chat`` and ``steerlex serve``: steered replies from the command line.

:func:`add_steer_parsers` adds the subcommands to steerlex's argparse subparsers; the main CLI
turns a :class:`~steerlex.core.errors.SteerlexError` into one message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from steerlex.core.errors import SteeringError
from steerlex.steer.server import API_KEY_ENV
from steerlex.steer.strategies import DEFAULT_GATE_THRESHOLD, GATE_MODES, STRATEGY_NAMES, Condition

__all__ = ["FeatureList", "add_steer_parsers", "parse_feature_list"]

CHAT_HELP = (
    "commands: /steer on|off, /strength X, /reset (forget the conversation), /quit; "
    "anything else is your message"
)


@dataclass(frozen=True)
class FeatureList:
    """Feature ids from ``--features``/``--harm``, with a short label per id when a file gave one."""

    ids: tuple[int, ...]
    labels: dict[int, str]
    source: str


def parse_feature_list(spec: str, *, what: str = "--features", sae: Any = None) -> FeatureList:
    """Comma-separated ids (``"3,17,42"``) or a ``selected_features.json`` file.

    The file holds ``{"features": [{"id": int, "score": float, "reason": str, ...}, ...]}``
    (written by ``steerlex select``); labels come from each entry's ``words`` or ``reason``. When
    the file records its SAE (``"sae": {"d_sae", "weights_id"}``) and ``sae`` is given, they must
    agree.

    Raises:
        SteeringError: neither a readable file nor a list of integers.
    """
    text = spec.strip()
    path = Path(text).expanduser()
    if path.is_file() or text.endswith(".json"):
        return _read_selection(path, what, sae)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise SteeringError(f"{what} is empty; give ids like 3,17,42 or a selected_features.json.")
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        raise SteeringError(
            f"{what} {spec!r} is neither an existing file nor comma-separated integer ids "
            "(e.g. 3,17,42)."
        ) from None
    return FeatureList(ids, {}, f"{what} {text}")


def _read_selection(path: Path, what: str, sae: Any) -> FeatureList:
    if not path.is_file():
        raise SteeringError(f"{what} file {path} does not exist; run `steerlex select` first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SteeringError(f"{what} file {path} is not readable JSON ({exc}).") from None
    fix = 'expected {"features": [{"id": 12, "score": 0.9, "reason": "..."}, ...]}'
    feats = data.get("features") if isinstance(data, dict) else None
    if not isinstance(feats, list):
        raise SteeringError(f'{what} file {path} has no "features" list; {fix}.')
    if not feats:
        raise SteeringError(f"{what} file {path} selects no features; choose some first.")
    ids: list[int] = []
    labels: dict[int, str] = {}
    for i, rec in enumerate(feats):
        fid = rec.get("id") if isinstance(rec, dict) else None
        if isinstance(fid, bool) or not isinstance(fid, int):
            raise SteeringError(f'{what} file {path}: entry {i} has no integer "id"; {fix}.')
        ids.append(fid)
        words = rec.get("words")
        if isinstance(words, list) and words:
            labels[fid] = "(" + ", ".join(str(w) for w in words[:4]) + ")"
        elif isinstance(rec.get("reason"), str) and rec["reason"]:
            reason = rec["reason"]
            labels[fid] = "(" + (reason if len(reason) <= 60 else reason[:57] + "...") + ")"
    recorded = data.get("sae")
    if sae is not None and isinstance(recorded, dict):
        d_sae, wid = recorded.get("d_sae"), recorded.get("weights_id")
        if isinstance(d_sae, int) and d_sae != sae.d_sae:
            raise SteeringError(
                f"{what} file {path} was made for an SAE with d_sae={d_sae}, but this SAE has "
                f"d_sae={sae.d_sae}; select features for this SAE."
            )
        if wid and sae.cfg.weights_id and wid != sae.cfg.weights_id:
            raise SteeringError(
                f"{what} file {path} was made for an SAE of model weights {wid}, but this SAE "
                f"belongs to {sae.cfg.weights_id}; select features for this SAE."
            )
    return FeatureList(tuple(ids), labels, f"{what} {path}")


# --- shared setup ---------------------------------------------------------------------------------


def _build(args: argparse.Namespace) -> tuple[Any, dict[int, str]]:
    """The :class:`SteeredModel` the arguments describe, and the feature labels."""
    from steerlex.models.loading import load_model
    from steerlex.sae.formats import load_sae
    from steerlex.steer.runtime import SteeredModel
    from steerlex.steer.strategies import make_strategy

    sae = load_sae(args.sae, device=args.device)
    features = parse_feature_list(args.features, sae=sae)
    condition = None
    labels = dict(features.labels)
    if args.harm is not None:
        harm = parse_feature_list(args.harm, what="--harm", sae=sae)
        threshold = DEFAULT_GATE_THRESHOLD if args.harm_threshold is None else args.harm_threshold
        condition = Condition(harm.ids, threshold, args.gate or "prompt")
        labels.update({k: v for k, v in harm.labels.items() if k not in labels})
    elif args.harm_threshold is not None or args.gate is not None:
        raise SteeringError("--harm-threshold and --gate need --harm (the harm feature ids).")
    if args.strategy in ("clamp", "ablate") and condition is not None:
        raise SteeringError(
            f"--strategy {args.strategy} has no conditional mode; use --harm with amplify or "
            "calibrate."
        )
    strategy = make_strategy(
        args.strategy,
        features.ids,
        alpha=args.alpha,
        target=args.target,
        value=args.value,
        keep_norm=args.keep_norm,
        condition=condition,
    )
    spec = args.model or sae.cfg.model_spec
    if not spec:
        raise SteeringError(f"the SAE in {args.sae} does not record its model; pass --model.")
    loaded = load_model(spec, device=args.device, dtype=args.dtype)
    steered = SteeredModel(
        loaded,
        sae,
        strategy,
        layer=args.layer,
        enabled=not args.no_steer,
        check_weights=not args.ignore_weights_id,
    )
    return steered, labels


def _print_report(report: Any, labels: dict[int, str], out: TextIO, limit: int) -> None:
    for line in report.lines(limit=limit, labels=labels):
        print(f"  {line}", file=out)


# --- generate -------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from steerlex.data import load_texts

    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file:
        prompts.extend(item.text for item in load_texts(args.prompts_file, limit=args.limit).items)
    if not prompts:
        raise SteeringError("no prompts; give --prompt TEXT (repeatable) or --prompts-file FILE.")
    steered, labels = _build(args)
    kw: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "system_prompt": args.system,
        "chat": not args.no_chat,
        "batch_size": args.batch_size,
    }
    responses = steered.generate(prompts, **kw)
    baseline = None
    if args.compare:
        with steered.steering(False):
            baseline = steered.generate(prompts, **kw)
    for i, (prompt, r) in enumerate(zip(prompts, responses, strict=True)):
        if args.json:
            rec = {"prompt": prompt, "text": r.text, "finish_reason": r.finish_reason}
            if baseline is not None:
                rec["unsteered_text"] = baseline[i].text
            rec["report"] = r.report.to_dict()
            print(json.dumps(rec, ensure_ascii=False))
            continue
        print(f"=== prompt {i + 1}: {prompt}")
        if baseline is not None:
            print(f"--- unsteered:\n{baseline[i].text}")
            print("--- steered:" if steered.enabled else "--- steering off:")
        print(r.text)
        print("--- why:")
        _print_report(r.report, labels, sys.stdout, args.show)
    return 0


# --- chat -----------------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    steered, labels = _build(args)
    base: list[dict[str, str]] = []
    if args.system:
        base.append({"role": "system", "content": args.system})
    messages = list(base)
    print(f"steering {'on' if steered.enabled else 'off'}: {steered.strategy.describe()}")
    print(CHAT_HELP)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _chat_command(line, steered):
                break
            if line.split()[0] == "/reset":
                messages = list(base)
            continue
        messages.append({"role": "user", "content": line})
        try:
            r = steered.chat(
                messages,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.sample,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
            )
        except SteeringError as exc:
            messages.pop()
            print(f"error: {exc}")
            continue
        print(f"assistant> {r.text}")
        _print_report(r.report, labels, sys.stdout, args.show)
        if r.text.strip():
            messages.append({"role": "assistant", "content": r.text})
        else:  # an empty turn cannot be sent back; drop the exchange
            messages.pop()
            print("  (empty reply; this exchange is not kept in the conversation)")
    return 0


def _chat_command(line: str, steered: Any) -> bool:
    """Run one /command; False means quit."""
    cmd, *rest = line.split()
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/steer":
        if rest and rest[0] in ("on", "off"):
            steered.enabled = rest[0] == "on"
        elif rest:
            print("usage: /steer on|off")
            return True
        print(f"steering {'on' if steered.enabled else 'off'}: {steered.strategy.describe()}")
    elif cmd == "/strength":
        if not rest:
            s = steered.strategy
            print(f"{s.strength_name} = {s.strength:g}")
            return True
        try:
            value = float(rest[0])
            steered.strategy = steered.strategy.with_strength(value)
        except ValueError:
            print(f"error: /strength takes a number, got {rest[0]!r}")
            return True
        except SteeringError as exc:
            print(f"error: {exc}")
            return True
        print(f"now: {steered.strategy.describe()}")
    elif cmd == "/reset":
        print("conversation cleared")
    else:
        print(f"unknown command {cmd}; {CHAT_HELP}")
    return True


# --- serve ----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from steerlex.steer.server import ServerLimits, make_server

    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_tokens=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        max_prompt_tokens=args.max_prompt_tokens,
        max_queue=args.max_queue,
    )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    steered, _labels = _build(args)
    try:
        server = make_server(
            steered,
            host=args.host,
            port=args.port,
            api_key=api_key,
            model_name=args.model_name,
            limits=limits,
        )
    except OSError as exc:
        raise SteeringError(
            f"cannot listen on {args.host}:{args.port} ({exc}); pick another --port."
        ) from None
    url, model = server.url, server.model_name
    from_env = args.api_key is None and bool(api_key)
    key = f"${API_KEY_ENV}" if from_env else "<your key>" if api_key else "none"
    print(f"steering {'on' if steered.enabled else 'off'}: {steered.strategy.describe()}")
    print(f"serving {model} at {url}/v1 (auth {'on' if api_key else 'off'}); Ctrl-C stops")
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: {args.host} is reachable from other machines and there is no API key; "
            f"set {API_KEY_ENV} or --api-key",
            file=sys.stderr,
        )
    auth = f' -H "Authorization: Bearer {key}"' if api_key else ""
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
        '"steerlex": {"steer": true}}'
    )
    print("try:")
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'")
    print("or in Python:")
    print("  from openai import OpenAI")
    print(f'  client = OpenAI(base_url="{url}/v1", api_key="{key}")')
    print(
        f'  r = client.chat.completions.create(model="{model}", '
        'messages=[{"role": "user", "content": "Hello"}], '
        'extra_body={"steerlex": {"strength": 1.5}})'
    )
    print("  print(r.choices[0].message.content, r.model_extra['steerlex']['fired'])")
    sys.stdout.flush()

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
    return 0


# --- parsers --------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    _steering_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--seed", type=int, help="with --sample: reproducible sampling")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--show", type=int, default=8, help="fired features shown per reply (default 8)")


def _steering_args(p: argparse.ArgumentParser) -> None:
    """The arguments :func:`_build` reads: model, SAE, features, strategy, device."""
    p.add_argument("--sae", required=True, help="SAE directory or file (trained on the model)")
    p.add_argument("--model", help="model spec (default: the one the SAE records)")
    p.add_argument("--layer", type=int, help="0-based layer to edit (default: the SAE's)")
    p.add_argument(
        "--features", required=True, metavar="FILE_OR_IDS",
        help="features to steer: ids like 3,17,42 or a selected_features.json",
    )  # fmt: skip
    p.add_argument(
        "--strategy", choices=STRATEGY_NAMES, default="calibrate",
        help="amplify: add alpha x unit directions; calibrate: raise features to --target "
        "(the paper's rule); clamp: set to --value; ablate: set to 0 (default calibrate)",
    )  # fmt: skip
    p.add_argument("--alpha", type=float, help="amplify: added length in residual units")
    p.add_argument("--target", type=float, help="calibrate: target activation m (default 2.5)")
    p.add_argument("--value", type=float, help="clamp: activation to set (default 0)")
    p.add_argument(
        "--keep-norm", action=argparse.BooleanOptionalAction, default=None,
        help="rescale edited positions to their norm (default: on for calibrate, off for amplify)",
    )  # fmt: skip
    p.add_argument(
        "--harm", metavar="FILE_OR_IDS",
        help="conditional steering: act only where these harm features fire",
    )  # fmt: skip
    p.add_argument(
        "--harm-threshold", type=float,
        help=f"gate threshold on the harm features' mean activation (default {DEFAULT_GATE_THRESHOLD})",
    )  # fmt: skip
    p.add_argument(
        "--gate", choices=GATE_MODES,
        help="prompt: decide once per prompt (default); token: decide at every token",
    )  # fmt: skip
    p.add_argument("--no-steer", action="store_true", help="start with steering off")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument(
        "--dtype", default="float32", help="float32, bfloat16, float16 (default float32)"
    )
    p.add_argument(
        "--ignore-weights-id", action="store_true",
        help="use the SAE even if it records other model weights than the model's",
    )  # fmt: skip


def add_steer_parsers(sub: Any) -> None:
    """Add ``generate``, ``chat`` and ``serve`` to ``sub`` (the result of ``add_subparsers``)."""
    p = sub.add_parser("generate", help="steered replies to prompts, with the features that fired")
    _common(p)
    p.add_argument("--prompt", action="append", help="a prompt; repeatable")
    p.add_argument(
        "--prompts-file",
        help="prompts from a .txt (one per line), .jsonl, .json, .csv or a named set",
    )
    p.add_argument("--limit", type=int, help="first N prompts of --prompts-file")
    p.add_argument("--no-chat", action="store_true", help="raw text, no chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--compare", action="store_true", help="also print the unsteered reply")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat", help="interactive steered chat (/steer on|off, /strength X, /reset, /quit)"
    )
    _common(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP API (/v1/chat/completions) over the steered model"
    )
    _steering_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument(
        "--api-key",
        help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV} if set; the "
        "environment keeps the key out of the process list)",
    )
    p.add_argument("--model-name", help="the model id clients send (default: the model's name)")
    p.add_argument(
        "--max-queue", type=int, default=16,
        help="requests that may wait while one runs; more get 429 (default 16)",
    )  # fmt: skip
    p.add_argument(
        "--max-tokens-limit", type=int, default=512,
        help="largest max_tokens a request may ask for (default 512)",
    )  # fmt: skip
    p.add_argument(
        "--default-max-tokens", type=int, default=256,
        help="max_tokens when a request gives none (default 256)",
    )  # fmt: skip
    p.add_argument(
        "--max-prompt-tokens", type=int, default=4096,
        help="largest chat-formatted prompt in tokens (default 4096)",
    )  # fmt: skip
    p.add_argument("--max-messages", type=int, default=64, help="per request (default 64)")
    p.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="request body size (default 1 MiB)"
    )
    p.set_defaults(func=cmd_serve)
