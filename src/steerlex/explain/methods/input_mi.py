"""``mi-input``: vocabulary words ranked by mutual information on the input side — what
makes a feature fire (docs/mi_input.md). Every word runs through the model in a few
neutral templates (to the SAE's layer only); the word-by-feature matrix is cached."""

from __future__ import annotations

from collections.abc import Sequence

from steerlex.core.errors import ExplainError
from steerlex.explain.method import Explanation, ExplanationMethod, MethodOptions, register_method
from steerlex.explain.mi_input import cached_word_activations, input_mi_scores
from steerlex.models.cache import cache_root
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder


@register_method("mi-input", order=30)
class InputMI(ExplanationMethod):
    label = "MI input side (what makes it fire)"
    help = "input-side mutual information: the words that make a feature fire"
    describes = "input"
    needs_vocabulary = True

    def explain(
        self,
        sae: SparseAutoencoder,
        loaded: LoadedModel,
        features: Sequence[int],
        options: MethodOptions,
    ) -> list[Explanation]:
        assert options.vocab is not None  # explain_sae checks needs_vocabulary
        if sae.cfg.layer is None:
            raise ExplainError(
                "The 'mi-input' method needs the SAE's layer; this SAE does not record one."
            )
        words = list(options.vocab.words)
        acts = cached_word_activations(
            loaded,
            sae,
            sae.cfg.layer,
            words,
            cache_root() / "word_activations",
            progress=options.progress,
        )
        scores, idx = input_mi_scores(acts, top_k=options.top_k)
        return [
            Explanation(
                c,
                self.name,
                tuple(words[i] for i in idx[c].tolist()),
                tuple(float(v) for v in scores[c].tolist()),
            )
            for c in features
        ]
