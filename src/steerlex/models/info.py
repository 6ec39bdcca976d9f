"""What a model spec is, without loading weights: the embedded models' status and a model's
layout (layers, width, hook names, chat template)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from steerlex.models.chat import has_chat_template
from steerlex.models.embedded import DEFAULT_MODEL, EMBEDDED, converted_dir, package_dir
from steerlex.models.hooks import decoder_layers, hook_name, num_layers, residual_width
from steerlex.models.loading import load_config

__all__ = ["embedded_models", "model_info"]


def embedded_models() -> list[dict[str, Any]]:
    """One record per embedded model: spec, whether it is the default, architecture,
    description, upstream, licence, install command, sha256 and status (``cached``: converted
    and ready; ``installed``: its pip packages are there; else ``not installed``)."""
    out = []
    for m in EMBEDDED.values():
        installed = all(package_dir(p.module) is not None for p in m.parts)
        cached = (converted_dir(m.gguf_name, m.sha256) / "steerlex-model.json").is_file()
        out.append(
            {
                "spec": m.spec,
                "default": m.spec == DEFAULT_MODEL,
                "architecture": m.architecture,
                "description": m.description,
                "upstream": m.upstream,
                "licence": m.licence,
                "install": m.install,
                "sha256": m.sha256,
                "status": "cached" if cached else ("installed" if installed else "not installed"),
            }
        )
    return out


def model_info(spec: str) -> dict[str, Any]:
    """Describe a model without loading its weights (a meta-device skeleton gives the layout)."""
    config, tokenizer, resolved, source, weights_id = load_config(spec)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    path, _ = decoder_layers(skeleton)
    n = num_layers(skeleton)
    text_config = config.get_text_config()
    return {
        "spec": spec,
        "kind": resolved.kind,
        "architecture": (config.architectures or [type(skeleton).__name__])[0],
        "model_type": config.model_type,
        "layers": n,
        "valid_layers": f"0..{n - 1}",
        "width (d_model)": residual_width(skeleton),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "parameters": sum(p.numel() for p in skeleton.parameters()),
        "tied_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
        "hook_names": f"{path}.0 .. {hook_name(skeleton, n - 1)}",
        "chat_template": has_chat_template(tokenizer),
        "weights_source": source,
        "weights_id": weights_id,
    }
