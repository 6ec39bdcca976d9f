"""``logitlens``: the model tokens a feature's direction promotes most (the unembedding of
its decoder row, through the final norm)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from steerlex.explain.logitlens import logit_lens
from steerlex.explain.method import Explanation, ExplanationMethod, MethodOptions, register_method
from steerlex.explain.mi import Side, Transform
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder


@register_method("logitlens", order=40)
class LogitLens(ExplanationMethod):
    label = "LogitLens tokens"
    help = "the top unembedding tokens of each feature direction"
    describes = "output"
    needs_vocabulary = False
    words_are_tokens = True

    def explain(
        self,
        sae: SparseAutoencoder,
        loaded: LoadedModel,
        features: Sequence[int],
        options: MethodOptions,
    ) -> list[Explanation]:
        found = logit_lens(
            sae,
            loaded.model,
            loaded.tokenizer,
            top_k=options.top_k,
            transform=cast(Transform, options.transform),
            side=cast(Side, options.side),
            features=list(features),
        )
        return [
            Explanation(ft.feature, self.name, tuple(ft.tokens), tuple(float(s) for s in ft.scores))
            for ft in found
        ]
