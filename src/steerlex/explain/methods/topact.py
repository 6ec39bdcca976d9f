"""``topact``: words of each feature's top-activating contexts in an activation store —
the corpus-based baseline (docs/topact.md)."""

from __future__ import annotations

from collections.abc import Sequence

from steerlex.explain.method import Explanation, ExplanationMethod, MethodOptions, register_method
from steerlex.explain.topact import top_activations, topact_words
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder


@register_method("topact", order=50)
class TopAct(ExplanationMethod):
    label = "TopAct words (top-activating contexts)"
    help = "words of the top-activating contexts in an activation store (needs --activations)"
    describes = "input"
    needs_vocabulary = False
    needs_store = True

    def explain(
        self,
        sae: SparseAutoencoder,
        loaded: LoadedModel,
        features: Sequence[int],
        options: MethodOptions,
    ) -> list[Explanation]:
        assert options.store is not None  # explain_sae checks needs_store
        tok = loaded.tokenizer
        spans = top_activations(
            sae, options.store, features=features, tokenizer=tok, progress=options.progress
        )
        return [
            Explanation(
                c, self.name, tuple(topact_words(spans.get(c, []), tok, top_k=options.top_k)), ()
            )
            for c in features
        ]
