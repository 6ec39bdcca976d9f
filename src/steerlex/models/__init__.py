"""Load models from spec strings, format chats, and hook the residual stream."""

from steerlex.models.embedded import DEFAULT_MODEL, EMBEDDED, SMALL_MODEL
from steerlex.models.loading import LoadedModel, load_model, resolve_spec

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "SMALL_MODEL", "LoadedModel", "load_model", "resolve_spec"]
