"""Read and edit the residual stream of decoder-only transformers (transformers 5).

Indexing convention, used everywhere in steerlex:

* ``layer`` is a **0-based** index into the model's list of decoder blocks; negative indices are
  rejected (valid layers are ``0..num_layers(model) - 1``).
* "the output of layer L" is the residual stream right after decoder block ``L``, shaped
  ``[batch, seq, d]`` with ``d == residual_width(model)``.  For ``L < num_layers - 1`` it equals
  ``model(..., output_hidden_states=True).hidden_states[L + 1]`` (``hidden_states[0]`` is the
  input of block 0, i.e. the embeddings).  For the **last** layer it does *not*: transformers 5
  replaces ``hidden_states[-1]`` with ``last_hidden_state``, which has the final norm applied
  (``model.norm`` / ``ln_f`` / ``final_layer_norm``); the hooks here always give the raw block
  output, before the final norm.

Hooks are forward hooks on the block module named by :func:`hook_name`; they are always removed
when the ``with`` block exits, also on an exception.  Within one block, active edits run first (in
the order their ``with`` blocks were entered) and reads then see the edited value, i.e. exactly what
the next block receives.  The hooks run before the ones transformers installs to collect
``hidden_states``, so those reflect the edits too.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steerlex.core.errors import LayerError

__all__ = [
    "LayerError",
    "ResidualCapture",
    "check_layer",
    "decoder_layers",
    "edit_residual",
    "forward_to_layer",
    "hook_name",
    "num_layers",
    "read_residual",
    "residual_width",
]

# Dotted paths of the decoder-block list, most specific first.  Causal-LM wrappers, then
# multimodal wrappers (text model nested under ``language_model``), then bare base models.
_KNOWN_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3 text, Phi-3, OLMo, ...
    "model.language_model.layers",  # Gemma3ForConditionalGeneration, Llava, Qwen2-VL, ...
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon, CodeGen
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "transformer.blocks",  # MPT
    "layers",  # base models: LlamaModel, GPTNeoXModel, ...
    "h",  # GPT2Model
    "language_model.layers",
    "decoder.layers",
)

_LAYER_COUNT_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_KEYS: tuple[str, ...] = ("hidden_size", "n_embd", "d_model")


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _text_config(model: nn.Module) -> Any | None:
    """The model's text (decoder) config, or ``None`` if the model has no HF config."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        return get_text_config(decoder=True)
    return config


def _config_int(config: Any | None, keys: tuple[str, ...]) -> int | None:
    if config is None:
        return None
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the list of decoder blocks of ``model``.

    Known attribute paths are tried first (``"model.layers"``, ``"transformer.h"``,
    ``"gpt_neox.layers"``, ``"model.language_model.layers"``, ...); a path is accepted when it is an
    ``nn.ModuleList`` whose length equals the text config's ``num_hidden_layers`` (or ``n_layer``),
    or is non-empty if the model has no such config.  Otherwise the one ``nn.ModuleList`` in
    ``model.named_modules()`` with that length is used.

    Returns:
        ``(path, layers)``: the dotted module path of the list and the list itself.

    Raises:
        LayerError: no such list, or several candidates.
    """
    expected = _config_int(_text_config(model), _LAYER_COUNT_KEYS)
    for path in _KNOWN_PATHS:
        module = _get_submodule(model, path)
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (expected is None or len(module) == expected)
        ):
            return path, module

    name = _model_name(model)
    if expected is None:
        raise LayerError(
            f"cannot find the decoder layers of {name}: none of the known paths "
            f"({', '.join(_KNOWN_PATHS)}) is a ModuleList, and the model has no config with "
            f"num_hidden_layers/n_layer to search by; pass a transformers decoder-only model "
            f"(e.g. AutoModelForCausalLM) or one of these layouts"
        )
    lists = [
        (path, module)
        for path, module in model.named_modules()
        if path and isinstance(module, nn.ModuleList)
    ]
    matches = [(path, module) for path, module in lists if len(module) == expected]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        found = ", ".join(f"{path} ({len(module)})" for path, module in lists) or "none"
        raise LayerError(
            f"cannot find the decoder layers of {name}: its config says {expected} layers but no "
            f"nn.ModuleList has that length (ModuleLists found: {found}); check that the model "
            f"and its config match"
        )
    paths = ", ".join(path for path, _ in matches)
    raise LayerError(
        f"cannot tell which ModuleList holds the decoder layers of {name}: {len(matches)} have "
        f"{expected} entries ({paths}); pass the text-only causal LM (e.g. AutoModelForCausalLM) "
        f"instead"
    )


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks of ``model`` (the length of :func:`decoder_layers`)."""
    return len(decoder_layers(model)[1])


def residual_width(model: nn.Module) -> int:
    """Width ``d`` of the residual stream (the text config's ``hidden_size``/``n_embd``/``d_model``).

    Raises:
        LayerError: the model has no config that states its hidden size.
    """
    width = _config_int(_text_config(model), _WIDTH_KEYS)
    if width is None:
        raise LayerError(
            f"cannot tell the residual width of {_model_name(model)}: its (text) config has none "
            f"of {', '.join(_WIDTH_KEYS)}; pass a transformers model with a config"
        )
    return width


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a 0-based decoder layer index and return it as a plain ``int``.

    Negative indices are rejected, so that a layer number always means the same block.

    Raises:
        LayerError: ``layer`` is not an integer, is negative, or is ``>= num_layers(model)``.
    """
    n = num_layers(model)
    name = _model_name(model)
    valid = f"valid layers are 0..{n - 1}"
    if isinstance(layer, bool):
        raise LayerError(f"layer must be an int, got the bool {layer!r}; {valid} for {name}")
    try:
        index = operator.index(layer)
    except TypeError:
        raise LayerError(
            f"layer must be an int, got {layer!r} ({type(layer).__name__}); "
            f"{valid} for {name} with {n} decoder layers"
        ) from None
    if index < 0:
        raise LayerError(
            f"layer {index} is negative; layers are 0-based and negative indices are not "
            f"accepted: {valid} for {name} with {n} decoder layers (the last one is {n - 1})"
        )
    if index >= n:
        raise LayerError(
            f"layer {index} is out of range for {name} with {n} decoder layers; {valid}"
        )
    return index


def hook_name(model: nn.Module, layer: int) -> str:
    """Dotted path of the module whose output is "the output of layer ``layer``", e.g. ``"model.layers.8"``."""
    index = check_layer(model, layer)
    return f"{decoder_layers(model)[0]}.{index}"


@dataclass(eq=False)
class ResidualCapture:
    """What :func:`read_residual` recorded: the output of one decoder layer on each forward call.

    Tensors are stored as the model produced them (not cloned, not detached), after any active
    :func:`edit_residual` at the same layer.
    """

    layer: int
    name: str
    values: list[Tensor] = field(default_factory=list)
    """One ``[batch, seq, d]`` tensor per forward call, oldest first (with a KV cache, each decoding
    step adds a ``[batch, new_tokens, d]`` tensor)."""

    @property
    def value(self) -> Tensor:
        """The ``[batch, seq, d]`` output of the layer on the most recent forward call.

        Raises:
            LayerError: no forward pass has gone through the layer yet.
        """
        if not self.values:
            raise LayerError(
                f"no forward pass has run through layer {self.layer} ({self.name}) yet; run the "
                f"model inside the `with read_residual(...)` block before reading .value"
            )
        return self.values[-1]


@dataclass(eq=False)
class _Slot:
    """The single steerlex hook on one block, and the edits/reads it currently serves."""

    handle: RemovableHandle
    edits: list[Callable[[Tensor], Tensor]] = field(default_factory=list)
    reads: list[ResidualCapture] = field(default_factory=list)


_SLOTS: weakref.WeakKeyDictionary[nn.Module, _Slot] = weakref.WeakKeyDictionary()


def _hidden_of(output: Any, where: str) -> Tensor:
    hidden = output[0] if isinstance(output, tuple) and output else output
    if not isinstance(hidden, Tensor):
        raise LayerError(
            f"{where} returned {type(output).__name__}, not a tensor or a tuple starting with one; "
            f"steerlex cannot hook this layer type"
        )
    return hidden


def _acquire(module: nn.Module, where: str) -> _Slot:
    slot = _SLOTS.get(module)
    if slot is not None:
        return slot

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        current = _SLOTS[_module]
        original = _hidden_of(output, where)
        hidden = original
        for edit in current.edits:
            hidden = edit(hidden)
        for capture in current.reads:
            capture.values.append(hidden)
        if hidden is original:
            return None
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    # Prepend, so that transformers' own hidden_states recorders see the edited value.
    slot = _Slot(handle=module.register_forward_hook(hook, prepend=True))
    _SLOTS[module] = slot
    return slot


def _release(module: nn.Module) -> None:
    slot = _SLOTS.get(module)
    if slot is not None and not slot.edits and not slot.reads:
        slot.handle.remove()
        del _SLOTS[module]


def _block(model: nn.Module, layer: int) -> tuple[int, nn.Module, str]:
    index = check_layer(model, layer)
    path, layers = decoder_layers(model)
    return index, layers[index], f"{path}.{index}"


@contextmanager
def read_residual(model: nn.Module, layer: int) -> Iterator[ResidualCapture]:
    """Record the output of decoder layer ``layer`` (0-based) on every forward call in the block.

    ``capture.value`` is the ``[batch, seq, d]`` output of the last call; ``capture.values`` holds
    all of them.  For ``layer < num_layers - 1`` this equals ``hidden_states[layer + 1]``; for the
    last layer it is the output before the final norm.  The hook is removed on exit.

    Raises:
        LayerError: bad ``layer`` (see :func:`check_layer`).
    """
    index, module, name = _block(model, layer)
    capture = ResidualCapture(layer=index, name=name)
    slot = _acquire(module, f"{_model_name(model)} layer {index} ({name})")
    slot.reads.append(capture)
    try:
        yield capture
    finally:
        slot.reads.remove(capture)
        _release(module)


def _checked_edit(fn: Callable[[Tensor], Tensor], where: str) -> Callable[[Tensor], Tensor]:
    def apply(hidden: Tensor) -> Tensor:
        out = fn(hidden)
        if isinstance(out, Tensor):
            if out.shape != hidden.shape:
                got, fix = f"shape {tuple(out.shape)}", ""
            elif out.dtype != hidden.dtype:
                got, fix = f"dtype {out.dtype}", " (cast with .to(h.dtype))"
            elif out.device != hidden.device:
                got, fix = f"a tensor on {out.device}", " (move it with .to(h.device))"
            else:
                return out
        else:
            got, fix = type(out).__name__, ""
        raise LayerError(
            f"the fn given to edit_residual for {where} returned {got}; it must return a tensor "
            f"with its input's shape {tuple(hidden.shape)} [batch, seq, d], dtype {hidden.dtype} "
            f"and device {hidden.device}{fix}"
        )

    return apply


@contextmanager
def edit_residual(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output ``h`` of decoder layer ``layer`` (0-based) with ``fn(h)`` inside the block.

    Applies on every forward call: the full prompt, and with a KV cache (``model.generate``) also
    each decoding step, where ``h`` is ``[batch, new_tokens, d]``.  ``fn`` must return a tensor of
    the same shape, dtype and device as ``h``; for tuple-returning blocks the rest of the tuple is
    kept.  Edits at the same layer compose in the order their ``with`` blocks were entered.  The
    hook is removed on exit.

    Raises:
        LayerError: bad ``layer`` or a non-callable ``fn``; during the forward pass, ``fn``
            returned something other than a tensor like its input.
    """
    index, module, name = _block(model, layer)
    where = f"{_model_name(model)} layer {index} ({name})"
    if not callable(fn):
        raise LayerError(
            f"edit_residual for {where} needs a callable fn(h) -> h', got {type(fn).__name__}"
        )
    edit = _checked_edit(fn, where)
    slot = _acquire(module, where)
    slot.edits.append(edit)
    try:
        yield
    finally:
        slot.edits.remove(edit)
        _release(module)


class _StopForward(Exception):
    """Raised by forward_to_layer's hook to stop the forward pass after the wanted layer."""


def _stop(_module: nn.Module, _args: Any, _output: Any) -> None:
    raise _StopForward


def forward_to_layer(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    layer: int | None = None,
) -> Tensor:
    """Run ``model`` only up to decoder layer ``layer`` (0-based) and return its output.

    The forward pass (``use_cache=False``) is stopped right after block ``layer``: later blocks, the
    final norm and the LM head do not run.  Active :func:`edit_residual` hooks at or before
    ``layer`` apply.  Gradient mode and train/eval mode are the caller's.

    Args:
        input_ids: ``[batch, seq]`` token ids.
        attention_mask: optional ``[batch, seq]`` mask (1 = token, 0 = padding).
        layer: the 0-based layer to stop after; required.

    Returns:
        ``[batch, seq, d]``, equal to what :func:`read_residual` records in a full pass.

    Raises:
        LayerError: ``layer`` missing or invalid, or the forward pass never reached the layer.
    """
    if layer is None:
        raise LayerError(
            f"forward_to_layer needs layer=<0-based index>; valid layers for "
            f"{_model_name(model)} are 0..{num_layers(model) - 1}"
        )
    index, module, name = _block(model, layer)
    with read_residual(model, index) as capture:
        handle = module.register_forward_hook(_stop)  # runs after the steerlex hook
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
    if not capture.values:
        raise LayerError(
            f"the forward pass of {_model_name(model)} finished without running layer {index} "
            f"({name}); check that this module is used by the model's forward"
        )
    return capture.values[-1]
