"""``steerlex generate``, ``steerlex chat`` and ``steerlex serve``: steered replies from the
command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from steerlex.cli.options import add_options, config_from_args, context_from_args
from steerlex.core.errors import SteeringError
from steerlex.jobs.steer import (
    ChatConfig,
    GenerateConfig,
    ServeConfig,
    generate_job,
    serve_job,
    steered_model,
)
from steerlex.models.chat import check_text, undecodable
from steerlex.steer.runtime import SteeredModel, SteeringReport
from steerlex.steer.server import API_KEY_ENV

__all__ = ["register"]

CHAT_HELP = (
    "commands: /steer on|off, /strength X, /reset (forget the conversation), /quit; "
    "anything else is your message"
)


def _print_report(report: SteeringReport, labels: dict[int, str], limit: int) -> None:
    for line in report.lines(limit=limit, labels=labels):
        print(f"  {line}")


def cmd_generate(args: argparse.Namespace) -> int:
    r = generate_job(config_from_args(GenerateConfig, args), context_from_args(args))
    for i, (prompt, resp) in enumerate(zip(r.prompts, r.responses, strict=True)):
        if args.json:
            rec: dict[str, Any] = {
                "prompt": prompt, "text": resp.text, "finish_reason": resp.finish_reason,
            }  # fmt: skip
            if r.baseline is not None:
                rec["unsteered_text"] = r.baseline[i].text
            rec["report"] = resp.report.to_dict()
            print(json.dumps(rec, ensure_ascii=False))
            continue
        print(f"=== prompt {i + 1}: {prompt}")
        if r.baseline is not None:
            print(f"--- unsteered:\n{r.baseline[i].text}")
            print("--- steered:" if r.steered.enabled else "--- steering off:")
        print(resp.text)
        print("--- why:")
        _print_report(resp.report, r.labels, args.show)
    return 0


def _chat_command(line: str, steered: SteeredModel) -> bool:
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
        print(f"steering {'on' if steered.enabled else 'off'}: {steered.describe()}")
    elif cmd == "/strength":
        s = steered.strategy
        if s is None:
            print("error: nothing is steered")
            return True
        if not rest:
            print(f"{s.strength_name} = {s.strength:g}")
            return True
        try:
            steered.strategy = s.with_strength(float(rest[0]))
        except ValueError:
            print(f"error: /strength takes a number, got {rest[0]!r}")
            return True
        except SteeringError as exc:
            print(f"error: {exc}")
            return True
        print(f"now: {steered.describe()}")
    elif cmd == "/reset":
        print("conversation cleared")
    else:
        print(f"unknown command {cmd}; {CHAT_HELP}")
    return True


def _read_bytes_as_escapes() -> None:
    """Read stdin with ``surrogateescape``: a line that is not UTF-8 then arrives with its bad
    bytes kept (``check_text`` names them) instead of failing to decode, which would lose the
    whole buffered chunk of input."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdin, "errors", None) == "strict":
        reconfigure(errors="surrogateescape")


def cmd_chat(args: argparse.Namespace) -> int:
    cfg = config_from_args(ChatConfig, args)
    if cfg.system is not None:
        check_text(cfg.system, "--system", SteeringError)
    steered, labels = steered_model(cfg, context_from_args(args))
    _read_bytes_as_escapes()
    base: list[dict[str, str]] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(base)
    print(f"steering {'on' if steered.enabled else 'off'}: {steered.describe()}")
    print(CHAT_HELP)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        except UnicodeDecodeError as exc:  # a stdin that could not be switched to escapes
            raise SteeringError(
                f"standard input is not valid UTF-8 ({exc}); type or pipe UTF-8 text (in a "
                "terminal, use a UTF-8 locale such as LANG=C.UTF-8)."
            ) from None
        if not line:
            continue
        bad = undecodable(line)
        if bad is not None:
            print(
                f"error: your message is not valid UTF-8 text: {bad}; it was not sent. Type it "
                "again as UTF-8 (in a terminal, use a UTF-8 locale such as LANG=C.UTF-8)."
            )
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
                messages, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.sample,
                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
            )  # fmt: skip
        except SteeringError as exc:
            messages.pop()
            print(f"error: {exc}")
            continue
        print(f"assistant> {r.text}")
        _print_report(r.report, labels, args.show)
        if r.text.strip():
            messages.append({"role": "assistant", "content": r.text})
        else:  # an empty turn cannot be sent back; drop the exchange
            messages.pop()
            print("  (empty reply; this exchange is not kept in the conversation)")
    return 0


def _banner(cfg: ServeConfig, server: Any, api_key: str | None) -> None:
    url, model = server.url, server.model_name
    from_env = cfg.api_key is None and bool(api_key)
    key = f"${API_KEY_ENV}" if from_env else "<your key>" if api_key else "none"
    print(f"steering {'on' if server.steered.enabled else 'off'}: {server.steered.describe()}")
    print(f"serving {model} at {url}/v1 (auth {'on' if api_key else 'off'}); Ctrl-C stops")
    limits = server.limits
    strategy = server.steered.strategy
    guard = {"steer": "steer when the gate opens", "refuse": "refuse when the gate opens",
             "abort": "abort when the detector fires on the reply"}[server.guard]  # fmt: skip
    if strategy is None or strategy.gate is None:
        guard = "no gate (--harm): every reply is steered"
    print(f"guard: {server.guard} ({guard}); batch: up to {limits.max_batch} requests decoded "
          f"together, {limits.max_queue} more may wait")  # fmt: skip
    if not api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: {cfg.host} is reachable from other machines and there is no API key; "
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


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(ServeConfig, args)
    server, api_key = serve_job(cfg, context_from_args(args))
    _banner(cfg, server, api_key)

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


def register(sub: Any) -> None:
    """Add ``generate``, ``chat`` and ``serve``."""
    p = sub.add_parser("generate", help="steered replies to prompts, with the features that fired")
    add_options(p, GenerateConfig)
    p.add_argument("--show", type=int, default=8, help="fired features shown per reply (default 8)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat", help="interactive steered chat (/steer on|off, /strength X, /reset, /quit)"
    )
    add_options(p, ChatConfig)
    p.add_argument("--show", type=int, default=8, help="fired features shown per reply (default 8)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP API (/v1/chat/completions) over the steered model"
    )
    add_options(p, ServeConfig)
    p.set_defaults(func=cmd_serve)
