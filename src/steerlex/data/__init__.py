"""Text and prompt sources: named offline sets, local files and Hugging Face datasets.

Use :func:`load_texts` for any source and :func:`named_sets` to list the named ones.
"""

from steerlex.data.named import NamedSetInfo, named_sets
from steerlex.data.sources import load_texts
from steerlex.data.textset import BlankTextsWarning, TextItem, TextSet

__all__ = ["BlankTextsWarning", "NamedSetInfo", "TextItem", "TextSet", "load_texts", "named_sets"]
