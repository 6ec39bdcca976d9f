"""Hostile input to ``generate`` / ``chat`` / ``serve`` and to SteeredModel: each case fails at
once with one clear message (no traceback), or leaves the caller's objects as they were.

1. a prompt longer than the model's context; 2. prompts that are not UTF-8 (argv, stdin);
3. a port out of range or in use; 4. a device this torch cannot use; 5. the caller's tokenizer
padding side.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import GPT2Config, LlamaForCausalLM

from conftest import make_tiny_loaded, save_tiny_model
from steerlex.cli import main
from steerlex.core.errors import ModelSpecError, SteerlexError
from steerlex.jobs import steer as steer_jobs
from steerlex.models import loading
from steerlex.models.chat import encode_prompt
from steerlex.models.loading import LoadedModel, check_device, context_length, load_model
from steerlex.sae.base import SAEConfig, SparseAutoencoder
from steerlex.sae.formats import save_sae
from steerlex.steer import DenseDirection, SteeredModel, SteeringError

CONTEXT = 32  # max_position_embeddings of the saved model: a few words overflow it
LONG_PROMPT = " ".join(["the"] * 25_000)  # 100k characters, 25k tokens


def run(argv: Sequence[str]) -> int:
    return main(list(argv))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model whose config says max_position_embeddings=32, and an SAE on it."""
    root = tmp_path_factory.mktemp("hostile")
    model_dir = save_tiny_model(root / "tiny32")
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model_dir / "config.json").write_text(json.dumps(config))
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, k=8, layer=2, model_spec=str(model_dir)))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    save_sae(sae, root / "sae")
    return model_dir, root / "sae"


def base(sae_dir: Path, command: str = "generate") -> list[str]:
    return [command, "--sae", str(sae_dir), "--features", "3", "--strategy", "ablate"]


def small_context_loaded(context: int = 24) -> LoadedModel:
    loaded = make_tiny_loaded()
    loaded.model.config.max_position_embeddings = context
    return loaded


def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any generation fail loudly: the checks must come before it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("generation started")

    monkeypatch.setattr(LlamaForCausalLM, "generate", refuse)


def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the SAE or the model fail loudly: the checks must come before it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(steer_jobs, "steered_model", refuse)


def clean_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- 1. prompts longer than the context ---------------------------------------------------------


def test_context_length_reads_the_config() -> None:
    assert context_length(make_tiny_loaded().model) == 128
    assert context_length(GPT2Config(n_positions=77)) == 77
    nested = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=4096))
    assert context_length(nested) == 4096
    assert context_length(SimpleNamespace()) is None
    assert small_context_loaded(24).context_length == 24


def test_generate_refuses_a_100k_character_prompt_at_once(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    no_generation(monkeypatch)
    code = run([*base(sae_dir), "--prompt", LONG_PROMPT, "--max-new-tokens", "8"])
    assert code == 2
    err = clean_error(
        capsys,
        "the prompt ('the the the",
        "has 25004 tokens; with max_new_tokens=8 that is 25012",
        "over the context of tiny32, 32 tokens",
        "shorten it to at most 24 tokens",
    )
    assert len(err) < 600  # the prompt itself is not echoed


def test_generate_names_the_prompt_that_is_too_long(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    no_generation(monkeypatch)
    long = " ".join(["cat"] * 30)
    code = run([*base(sae_dir), "--prompt", "what is a tree", "--prompt", long,
                "--max-new-tokens", "4"])  # fmt: skip
    assert code == 2
    clean_error(capsys, "prompt 1 ('cat cat", "has 34 tokens", "32 tokens")


def test_chat_refuses_a_message_over_the_context_and_goes_on(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    lines = [" ".join(["dog"] * 40), "what is a tree"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert run([*base(sae_dir, "chat"), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "error: the conversation has 44 tokens; with max_new_tokens=3 that is 47" in out
    assert "over the context of tiny32, 32 tokens; shorten it to at most 29 tokens" in out
    assert "/reset" in out
    assert out.count("assistant> ") == 1  # the next, short message is answered


def test_runtime_context_check_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = small_context_loaded(24)
    steered = SteeredModel(loaded, layer=2)
    n = len(steered.encode("what is a tree")[0].input_ids)
    r = steered.generate("what is a tree", max_new_tokens=24 - n)[0]  # exactly fills it
    assert len(r.prompt_ids) == n
    with pytest.raises(SteeringError) as info:
        steered.generate("what is a tree", max_new_tokens=25 - n)
    msg = str(info.value)
    assert f"has {n} tokens; with max_new_tokens={25 - n} that is 25" in msg
    assert f"lower max_new_tokens (the CLI: --max-new-tokens) to at most {24 - n}" in msg
    with pytest.raises(SteeringError, match="lower max_new_tokens .* to at most"):
        steered.generate("what is a tree", max_new_tokens=100)
    no_generation(monkeypatch)
    with pytest.raises(SteeringError, match="shorten it and lower max_new_tokens"):
        steered.generate(LONG_PROMPT, max_new_tokens=30)
    with pytest.raises(SteeringError, match="the conversation has"):
        steered.chat([{"role": "user", "content": LONG_PROMPT}], max_new_tokens=4)
    with pytest.raises(SteeringError, match=r"prompt 1 \('cat"):  # checked before any reply
        steered.generate(["what is a tree", LONG_PROMPT.replace("the", "cat")], max_new_tokens=2)


# --- 2. prompts that are not UTF-8 --------------------------------------------------------------


BAD_ARGV = os.fsdecode(b"tell me about the \xff cat")  # what Python makes of such argv bytes


def test_generate_refuses_a_non_utf8_argv_prompt(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    no_model_load(monkeypatch)
    assert run([*base(sae_dir), "--prompt", BAD_ARGV]) == 2
    clean_error(
        capsys,
        "--prompt is not valid UTF-8 text: byte 0xff at character 18",
        "near 'tell me about the \\xff cat'",
        "Give it as UTF-8",
    )
    assert run([*base(sae_dir), "--prompt", "hi", "--system", BAD_ARGV]) == 2
    clean_error(capsys, "--system is not valid UTF-8 text")
    assert run([*base(sae_dir, "chat"), "--system", BAD_ARGV]) == 2
    clean_error(capsys, "--system is not valid UTF-8 text")


def test_generate_refuses_non_utf8_argv_bytes_in_a_real_process(
    saved: tuple[Path, Path],
) -> None:
    _, sae_dir = saved
    argv = [sys.executable, "-m", "steerlex.cli", *base(sae_dir), "--prompt", b"the \xe9t\xe9 cat"]
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert "--prompt is not valid UTF-8 text: byte 0xe9 at character 4" in err


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_refuses_a_non_utf8_stdin_line_and_goes_on(
    saved: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    errors: str,
) -> None:
    _, sae_dir = saved
    raw = b"ok\nthe \xff cat\nwhat is a tree\n"
    stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert run([*base(sae_dir, "chat"), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert (
        "error: your message is not valid UTF-8 text: byte 0xff at character 4 "
        "(near 'the \\xff cat'); it was not sent." in captured.out
    )
    assert captured.out.count("assistant> ") == 2  # the lines before and after are answered


def test_runtime_refuses_non_utf8_text(tiny_loaded: LoadedModel) -> None:
    steered = SteeredModel(tiny_loaded, layer=2)
    with pytest.raises(SteeringError, match="prompt 1 is not valid UTF-8 text: byte 0xff"):
        steered.generate(["what is a tree", BAD_ARGV], max_new_tokens=2)
    with pytest.raises(SteeringError, match="system prompt is not valid UTF-8"):
        steered.generate("what is a tree", system_prompt=BAD_ARGV, max_new_tokens=2)
    lone = "what is \ud800 a tree"  # e.g. a JSON "\ud800" escape sent to the server
    with pytest.raises(SteeringError, match=r"message 0 \(user\) is not valid UTF-8 text: U\+D800"):
        steered.chat([{"role": "user", "content": lone}], max_new_tokens=2)
    with pytest.raises(SteerlexError, match="the prompt is not valid UTF-8"):
        encode_prompt(tiny_loaded.tokenizer, BAD_ARGV, chat=True)


# --- 3. ports -----------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range_before_loading(
    saved: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: str,
) -> None:
    _, sae_dir = saved
    no_model_load(monkeypatch)
    assert run([*base(sae_dir, "serve"), "--port", port]) == 2
    clean_error(capsys, f"--port {port} is not a TCP port; give 0 to 65535 (0 picks any free")


def test_serve_refuses_an_address_in_use_before_loading(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    no_model_load(monkeypatch)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run([*base(sae_dir, "serve"), "--port", str(port)]) == 2
    clean_error(
        capsys,
        f"cannot listen on 127.0.0.1:{port}: the address is already in use",
        "pick another --port, or give --port 0",
    )


def test_serve_refuses_a_host_that_is_not_here(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, sae_dir = saved
    no_model_load(monkeypatch)
    assert run([*base(sae_dir, "serve"), "--host", "203.0.113.7", "--port", "0"]) == 2
    clean_error(capsys, "'203.0.113.7' is not an address of this machine", "--host 127.0.0.1")
    assert run([*base(sae_dir, "serve"), "--host", " "]) == 2
    clean_error(capsys, "--host is empty")


def test_serve_turns_a_late_bind_failure_into_a_clear_error(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The port can be taken between the early check and the server's own bind."""
    _, sae_dir = saved

    def taken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(steer_jobs, "make_server", taken)
    assert run([*base(sae_dir, "serve"), "--port", "0"]) == 2
    clean_error(capsys, "cannot listen on 127.0.0.1:0: the address is already in use")


# --- 4. devices ---------------------------------------------------------------------------------


@pytest.fixture
def cpu_only_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch as a CPU-only build sees it, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)


@pytest.mark.usefixtures("cpu_only_torch")
def test_load_model_checks_the_device_before_reading_anything(
    saved: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, _ = saved

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model files were read")

    monkeypatch.setattr(loading, "model_dir", refuse)
    with pytest.raises(ModelSpecError) as info:
        load_model(str(model_dir), device="cuda")
    msg = str(info.value)
    assert "device 'cuda': this torch" in msg and "is built without CUDA" in msg
    assert "https://pytorch.org/get-started/locally/" in msg and "Devices here: cpu." in msg
    with pytest.raises(ModelSpecError, match="'gpu7' is not a torch device; use cpu, cuda"):
        load_model(str(model_dir), device="gpu7")
    with pytest.raises(ModelSpecError, match="'mps'.*macOS on Apple silicon only"):
        load_model(str(model_dir), device="mps")
    with pytest.raises(ModelSpecError, match="runs models on cpu, cuda, mps or xpu, not meta"):
        load_model(str(model_dir), device="meta")


def test_check_device_on_cuda_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelSpecError, match="has CUDA 12.8 but sees no GPU"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelSpecError, match=r"only 1 CUDA device \(cuda:0 to cuda:0\)"):
        check_device("cuda:3", "--device")
    assert check_device("cuda:0") == torch.device("cuda:0")
    assert check_device(" cpu ") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.usefixtures("cpu_only_torch")
@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "--device 'cuda': this torch"), ("cuda:1", "built without CUDA"),
     ("gpu7", "--device 'gpu7' is not a torch device"), ("", "is not a torch device")],
)  # fmt: skip
def test_generate_checks_the_device_before_loading(
    saved: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    device: str,
    message: str,
) -> None:
    _, sae_dir = saved
    assert run([*base(sae_dir), "--prompt", "hi", "--device", device]) == 2
    clean_error(capsys, message)


# --- 5. the caller's tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_steered_model_leaves_the_tokenizer_as_it_was(side: str) -> None:
    loaded = make_tiny_loaded()
    tok = loaded.tokenizer
    tok.padding_side = side
    before = (tok.padding_side, tok.truncation_side, tok.pad_token, tok.chat_template)
    generation = loaded.model.generation_config.to_dict()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    steered = SteeredModel(loaded, strategy=DenseDirection(direction=direction, alpha=4.0), layer=2)
    assert tok.padding_side == side
    prompts = ["tell me a short story about the cat", "water"]  # unequal lengths: padded
    replies = steered.generate(prompts, max_new_tokens=4, batch_size=2)
    steered.chat([{"role": "user", "content": "what is a tree"}], max_new_tokens=2)
    assert (tok.padding_side, tok.truncation_side, tok.pad_token, tok.chat_template) == before
    assert loaded.model.generation_config.to_dict() == generation
    # steerlex pads on the left itself: the tokenizer's side does not change the replies
    tok.padding_side = "left" if side == "right" else "right"
    again = steered.generate(prompts, max_new_tokens=4, batch_size=2)
    assert [r.token_ids for r in again] == [r.token_ids for r in replies]
