"""The steering jobs: a model steered through SAE features (``generate``, ``chat``) and the
OpenAI-compatible server over it (``serve``)."""

from __future__ import annotations

import errno
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, cast

from steerlex.core.config import option
from steerlex.core.errors import SteeringError
from steerlex.data.sources import load_texts
from steerlex.jobs.context import RunContext
from steerlex.models.chat import check_text
from steerlex.models.loading import DTYPES, check_device
from steerlex.steer.batching import DEFAULT_REFUSAL, GUARD_MODES, GuardMode
from steerlex.steer.features import parse_feature_list
from steerlex.steer.probe import is_probe_file, load_probe
from steerlex.steer.runtime import SteeredModel, SteeredResponse
from steerlex.steer.server import API_KEY_ENV, ServerLimits, SteeringServer, make_server
from steerlex.steer.strategies import (
    DEFAULT_GATE_THRESHOLD,
    DEFAULT_TARGET,
    GATE_MODES,
    STRATEGY_NAMES,
    Gate,
    GateMode,
    make_strategy,
)

__all__ = [
    "ChatConfig",
    "GenerateConfig",
    "GenerateResult",
    "ServeConfig",
    "SteerConfig",
    "generate_job",
    "serve_job",
    "steered_model",
]

_LIMITS = ServerLimits()


@dataclass(frozen=True)
class SteerConfig:
    """A model steered through SAE features: which SAE and features, which strategy and
    how strong, optionally gated on harm features."""

    sae: str | None = option(
        None, required=True, help="SAE directory or file (trained on the model)"
    )
    model: str | None = option(None, help="model spec (default: the one the SAE records)")
    layer: int | None = option(None, help="0-based layer to edit (default: the SAE's)")
    features: str | None = option(
        None, required=True, metavar="FILE_OR_IDS",
        help="features to steer: ids like 3,17,42 or a selected_features.json",
    )  # fmt: skip
    strategy: str = option(
        "calibrate", choices=STRATEGY_NAMES,
        help="amplify: add alpha x unit directions; calibrate: raise features to --target "
        "(the paper's rule); clamp: set to --value; ablate: set to 0",
    )  # fmt: skip
    alpha: float | None = option(None, help="amplify: added length in residual units")
    target: float | None = option(
        None, help=f"calibrate: target activation m (default {DEFAULT_TARGET})"
    )
    value: float | None = option(None, help="clamp: activation to set (default 0)")
    keep_norm: bool | None = option(
        None,
        help="rescale edited positions to their norm (default: on for calibrate, off for amplify)",
    )
    harm: str | None = option(
        None, metavar="FILE_OR_IDS",
        help="conditional steering: act only where these harm features fire, or where a harm "
        "probe (a gate_probe.safetensors from steerlex eval) does",
    )  # fmt: skip
    harm_threshold: float | None = option(
        None,
        help="gate threshold on the harm features' mean activation "
        f"(default {DEFAULT_GATE_THRESHOLD}; for a probe its logit, default 0)",
    )
    gate: str | None = option(
        None, choices=GATE_MODES,
        help="prompt: decide once per prompt (default); token: decide at every token",
    )  # fmt: skip
    steer: bool = option(True, help="start with steering on")
    device: str = option("cpu", help="cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", choices=tuple(DTYPES), help="model dtype")
    ignore_weights_id: bool = option(
        False, help="use the SAE even if it records other model weights than the model's"
    )


@dataclass(frozen=True)
class SampledSteerConfig(SteerConfig):
    """A steered model and how it decodes."""

    max_new_tokens: int = option(128, help="new tokens per reply")
    sample: bool = option(False, help="sample instead of greedy decoding")
    temperature: float = option(1.0, help="with --sample")
    top_p: float = option(1.0, help="with --sample")
    seed: int | None = option(None, help="with --sample: reproducible sampling")
    system: str | None = option(None, help="system prompt")


@dataclass(frozen=True)
class GenerateConfig(SampledSteerConfig):
    """``steerlex generate``: steered replies to prompts."""

    prompt: list[str] = option(factory=list, repeat=True, help="a prompt; repeatable")
    prompts_file: str | None = option(
        None, help="prompts from a .txt (one per line), .jsonl, .json, .csv or a named set"
    )
    limit: int | None = option(None, help="first N prompts of --prompts-file")
    chat: bool = option(True, help="format prompts with the chat template")
    batch_size: int = option(8, help="prompts per batch")
    compare: bool = option(False, help="also generate the unsteered reply")


@dataclass(frozen=True)
class ChatConfig(SampledSteerConfig):
    """``steerlex chat``: an interactive steered conversation."""


@dataclass(frozen=True)
class ServeConfig(SteerConfig):
    """``steerlex serve``: an OpenAI-compatible HTTP API over the steered model."""

    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(8000, help="port (0 = any free)")
    api_key: str | None = option(
        None,
        help=f"require Authorization: Bearer KEY (default: ${API_KEY_ENV} if set; the "
        "environment keeps the key out of the process list)",
    )
    model_name: str | None = option(
        None, help="the model id clients send (default: the model's name)"
    )
    max_queue: int = option(
        _LIMITS.max_queue, help="requests that may wait while one runs; more get 429"
    )
    max_tokens_limit: int = option(
        _LIMITS.max_tokens, help="largest max_tokens a request may ask for"
    )
    default_max_tokens: int = option(
        _LIMITS.default_max_tokens, help="max_tokens when a request gives none"
    )
    max_prompt_tokens: int = option(
        _LIMITS.max_prompt_tokens, help="largest chat-formatted prompt in tokens"
    )
    max_messages: int = option(_LIMITS.max_messages, help="messages per request")
    max_body_bytes: int = option(_LIMITS.max_body_bytes, help="request body size in bytes")
    read_timeout: float = option(
        _LIMITS.read_timeout,
        help="seconds a client has to send its whole request (then 408)",
    )
    max_connections: int = option(
        _LIMITS.max_connections, help="connections served at once; more get 503 at once"
    )
    max_strength: float = option(
        _LIMITS.max_strength, help="largest steerlex.strength a request may ask for"
    )
    max_batch: int = option(
        _LIMITS.max_batch, help="requests (choices) decoded together in one batch; more wait"
    )
    max_n: int = option(_LIMITS.max_n, help="most choices (n) one request may ask for")
    guard: str = option(
        "steer", choices=GUARD_MODES,
        help="what the gate (--harm) does when it opens: steer (default), refuse (answer with "
        "--refusal, nothing generated) or abort (stop once the detector fires on the reply's "
        "own tokens); requests may choose their own with steerlex.guard",
    )  # fmt: skip
    refusal: str = option(DEFAULT_REFUSAL, help="the reply a refused request gets")
    shutdown_grace: float = option(
        10.0,
        help="on SIGTERM/SIGINT, seconds the running generation gets to finish before it is "
        "stopped (its client then gets an error)",
    )

    def validate(self) -> None:
        """Refuse a host or port that cannot be bound (before the model is loaded)."""
        if not self.host or not self.host.strip():
            raise SteeringError(
                "--host is empty; give an address to bind, e.g. 127.0.0.1 (this machine only) "
                "or 0.0.0.0 (every interface)."
            )
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise SteeringError(
                f"--port {port!r} is not a TCP port; give 0 to 65535 (0 picks any free port)."
            )
        grace = self.shutdown_grace
        if (
            isinstance(grace, bool)
            or not isinstance(grace, (int, float))
            or not (grace >= 0 and math.isfinite(grace))
        ):
            raise SteeringError(f"--shutdown-grace {grace!r} must be a number of seconds >= 0.")
        if self.guard != "steer" and self.harm is None:
            raise SteeringError(
                f"--guard {self.guard} acts on a harm detector; give --harm (harm feature ids, a "
                "selected_features.json or a gate_probe.safetensors from steerlex eval)."
            )
        if not self.refusal.strip():
            raise SteeringError("--refusal is empty; give the text a refused request gets.")
        check_text(self.refusal, "--refusal", SteeringError)


def steered_model(cfg: SteerConfig, ctx: RunContext) -> tuple[SteeredModel, dict[int, str]]:
    """The :class:`SteeredModel` ``cfg`` describes, and a short label per feature id."""
    if not cfg.sae or not cfg.features:
        raise SteeringError("steering needs --sae (an SAE) and --features (ids or a file).")
    check_device(cfg.device, "--device")  # before the SAE or the model is read
    sae = ctx.sae(cfg.sae, device=cfg.device)
    features = parse_feature_list(cfg.features, sae=sae)
    gate = None
    labels = dict(features.labels)
    mode: GateMode = "token" if cfg.gate == "token" else "prompt"
    if cfg.harm is not None and is_probe_file(cfg.harm):
        probe = load_probe(cfg.harm)
        threshold = 0.0 if cfg.harm_threshold is None else cfg.harm_threshold
        gate = Gate((), threshold, mode, top_k=None, probe=probe)
    elif cfg.harm is not None:
        harm = parse_feature_list(cfg.harm, what="--harm", sae=sae)
        threshold = DEFAULT_GATE_THRESHOLD if cfg.harm_threshold is None else cfg.harm_threshold
        gate = Gate(harm.ids, threshold, mode)
        labels.update({k: v for k, v in harm.labels.items() if k not in labels})
    elif cfg.harm_threshold is not None or cfg.gate is not None:
        raise SteeringError("--harm-threshold and --gate need --harm (the harm feature ids).")
    if cfg.strategy in ("clamp", "ablate") and gate is not None:
        raise SteeringError(
            f"--strategy {cfg.strategy} has no conditional mode; use --harm with amplify or "
            "calibrate."
        )
    strategy = make_strategy(
        cfg.strategy, features.ids, alpha=cfg.alpha, target=cfg.target, value=cfg.value,
        keep_norm=cfg.keep_norm, gate=gate,
    )  # fmt: skip
    spec = cfg.model or sae.cfg.model_spec
    if not spec:
        raise SteeringError(f"the SAE in {cfg.sae} does not record its model; pass --model.")
    loaded = ctx.model(spec, device=cfg.device, dtype=cfg.dtype)
    if gate is not None and gate.probe is not None:
        layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
        where = f"--harm {cfg.harm}"
        gate.probe.check_for(loaded.weights_id, -1 if layer is None else layer, where)
    steered = SteeredModel(
        loaded, sae, strategy, layer=cfg.layer, enabled=cfg.steer,
        check_weights=not cfg.ignore_weights_id,
    )  # fmt: skip
    return steered, labels


@dataclass(frozen=True)
class GenerateResult:
    """Each prompt's steered reply (and the unsteered one with ``compare``)."""

    steered: SteeredModel
    labels: dict[int, str]
    prompts: list[str]
    responses: list[SteeredResponse]
    baseline: list[SteeredResponse] | None


def generate_job(cfg: GenerateConfig, ctx: RunContext) -> GenerateResult:
    """Reply to ``cfg``'s prompts with the steered model.

    Prompts that are not valid UTF-8 are refused before the model is loaded; prompts longer
    than the model's context (with ``max_new_tokens``) before any is generated."""
    for i, text in enumerate(cfg.prompt):
        what = "--prompt" if len(cfg.prompt) == 1 else f"--prompt number {i + 1}"
        check_text(text, what, SteeringError)
    if cfg.system is not None:
        check_text(cfg.system, "--system", SteeringError)
    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts.extend(item.text for item in load_texts(cfg.prompts_file, limit=cfg.limit).items)
    if not prompts:
        raise SteeringError("no prompts; give --prompt TEXT (repeatable) or --prompts-file FILE.")
    steered, labels = steered_model(cfg, ctx)
    kw: dict[str, Any] = {
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.sample,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "system_prompt": cfg.system,
        "chat": cfg.chat,
        "batch_size": cfg.batch_size,
    }
    responses = steered.generate(prompts, **kw)
    baseline = None
    if cfg.compare:
        with steered.steering(False):
            baseline = steered.generate(prompts, **kw)
    return GenerateResult(steered, labels, prompts, responses, baseline)


def serve_job(cfg: ServeConfig, ctx: RunContext) -> tuple[SteeringServer, str | None]:
    """The server ``cfg`` describes, bound but not yet serving, and the API key it checks
    (``cfg.api_key``, else ``$STEERLEX_API_KEY``; ``None``: no auth).

    The host and port are checked, and tried, before the model is loaded: a bad port, an
    address in use or not on this machine fails at once with a SteeringError."""
    cfg.validate()
    limits = ServerLimits(
        max_body_bytes=cfg.max_body_bytes, max_messages=cfg.max_messages,
        max_tokens=cfg.max_tokens_limit,
        default_max_tokens=min(cfg.default_max_tokens, cfg.max_tokens_limit),
        max_prompt_tokens=cfg.max_prompt_tokens, max_queue=cfg.max_queue,
        read_timeout=cfg.read_timeout, max_connections=cfg.max_connections,
        max_strength=cfg.max_strength, max_batch=cfg.max_batch, max_n=cfg.max_n,
    )  # fmt: skip
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None
    _try_bind(cfg.host, cfg.port)
    steered, _labels = steered_model(cfg, ctx)
    try:
        server = make_server(
            steered, host=cfg.host, port=cfg.port, api_key=api_key, model_name=cfg.model_name,
            limits=limits, shutdown_grace=cfg.shutdown_grace,
            guard=cast(GuardMode, cfg.guard), refusal=cfg.refusal,
        )  # fmt: skip
    except (OSError, OverflowError, UnicodeError) as exc:
        raise _listen_error(cfg.host, cfg.port, exc) from None
    return server, api_key


def _try_bind(host: str, port: int) -> None:
    """Bind (and release) ``host:port`` the way the server will, so that an address in use or
    not on this machine fails before the model is loaded."""
    try:
        with socket.socket(SteeringServer.address_family, socket.SOCK_STREAM) as sock:
            if SteeringServer.allow_reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except (OSError, OverflowError, UnicodeError) as exc:
        raise _listen_error(host, port, exc) from None


def _listen_error(host: str, port: int, exc: BaseException) -> SteeringError:
    """A SteeringError that says why ``host:port`` cannot be listened on and what to do."""
    where = f"cannot listen on {host}:{port}"
    code = getattr(exc, "errno", None)
    if code == errno.EADDRINUSE:
        return SteeringError(
            f"{where}: the address is already in use (another server, or an earlier steerlex "
            "serve still running); stop it, pick another --port, or give --port 0 for any free "
            "port."
        )
    if code == errno.EACCES:
        return SteeringError(
            f"{where}: permission denied (ports below 1024 need root); pick --port 1024 or above."
        )
    if isinstance(exc, (socket.gaierror, UnicodeError)):
        return SteeringError(
            f"{where}: {host!r} is not a known host name ({exc}); use --host 127.0.0.1 "
            "(this machine only), 0.0.0.0 (every interface) or one of this machine's addresses."
        )
    if code == errno.EADDRNOTAVAIL:
        return SteeringError(
            f"{where}: {host!r} is not an address of this machine ({exc}); use --host 127.0.0.1 "
            "(this machine only) or 0.0.0.0 (every interface)."
        )
    return SteeringError(f"{where} ({exc}); check --host and --port.")
