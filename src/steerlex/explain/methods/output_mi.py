"""``mi`` and ``paper``: vocabulary words ranked by mutual information with a feature's
output-side direction (docs/mi.md). No corpus pass and no LLM: one chunked product of
feature vectors and word vectors plus two softmaxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from steerlex.explain.method import Explanation, ExplanationMethod, MethodOptions, register_method
from steerlex.explain.mi import Score, Side, Transform, feature_vectors, mi_scores
from steerlex.explain.vocabulary import word_vectors
from steerlex.models.loading import LoadedModel
from steerlex.sae.base import SparseAutoencoder


class _OutputMI(ExplanationMethod):
    describes = "output"
    needs_vocabulary = True

    def explain(
        self,
        sae: SparseAutoencoder,
        loaded: LoadedModel,
        features: Sequence[int],
        options: MethodOptions,
    ) -> list[Explanation]:
        assert options.vocab is not None  # explain_sae checks needs_vocabulary
        wv = word_vectors(options.vocab, loaded)
        fv = feature_vectors(
            sae,
            loaded.model,
            side=cast(Side, options.side),
            transform=cast(Transform, options.transform),
        )
        scores, idx = mi_scores(
            fv,
            wv.vectors,
            score=cast(Score, self.name),
            alpha=options.alpha,
            beta=options.beta,
            top_k=options.top_k,
        )
        return [
            Explanation(
                c,
                self.name,
                tuple(wv.words[i] for i in idx[c].tolist()),
                tuple(float(s) for s in scores[c].tolist()),
            )
            for c in features
        ]


@register_method("mi", order=10)
class OutputMI(_OutputMI):
    label = "MI words"
    help = (
        "output-side mutual information between a feature and the vocabulary (the paper's method)"
    )


@register_method("paper", order=20)
class PaperMI(_OutputMI):
    label = "paper (MI, the paper's formula)"
    help = "the authors' released scoring, p(w|c) log p(c|w), for comparison"
