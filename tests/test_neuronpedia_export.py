"""steerlex export-neuronpedia writes what Neuronpedia's importer reads.

The tables below are from Neuronpedia's own schema and importer (hijohnnylin/neuronpedia at
commit ebb8426fc550ad5d1f76d52c271a624af3c08a57):

* ``apps/webapp/prisma/schema.prisma`` (and the squashed migration's ``CREATE TABLE``):
  which columns are NOT NULL without a database default. Prisma's ``@default(cuid())`` is
  computed by the Prisma client, not the database, so the raw insert below needs ``id``.
* ``apps/webapp/lib/db/import.ts`` ``importJsonlString``: features, activations and
  explanations go in by ``INSERT ... SELECT FROM jsonb_to_recordset`` over the keys of the
  *first* row of a batch file, so every row of a file must have the same keys.
* ``apps/webapp/app/api/admin/import/route.ts``: reads ``v1/<model>/<source>/model.jsonl``,
  ``sourceset.jsonl``, ``source.jsonl`` (plain JSONL, given to Prisma's ``create``, which
  rejects unknown fields), ``features/``, ``activations/`` (not recursing) and
  ``explanations/`` ``*.jsonl.gz``; and ``v1/config/*.jsonl`` (``importConfigFromS3``,
  given to Prisma's ``upsert``).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import SENTENCES, WORDS, save_tiny_model
from steerlex.cli import main
from steerlex.core.errors import ExplainError
from steerlex.explain.run import (
    NEURONPEDIA_AUTHOR_ID,
    Explanation,
    neuronpedia_model_id,
    neuronpedia_source_id,
    neuronpedia_source_set,
    neuronpedia_width,
    write_explanations,
)
from steerlex.jobs.context import RunContext
from steerlex.jobs.explain import NeuronpediaConfig, export_neuronpedia_job
from steerlex.models.loading import load_model
from steerlex.sae import SAEConfig, SparseAutoencoder, save_sae

STR, INT, NUM, BOOL, NULL = str, int, (int, float), bool, type(None)
STRS, NUMS = "list[str]", "list[number]"

# Columns that are required (NOT NULL, no database default) per table, with their JSON
# type; ``id`` is listed where only Prisma's client would fill it.
REQUIRED: dict[str, dict[str, Any]] = {
    "Neuron": {"modelId": STR, "layer": STR, "index": STR},
    "Explanation": {
        "id": STR, "modelId": STR, "layer": STR, "index": STR, "description": STR,
        "authorId": STR,
    },
    "Activation": {
        "id": STR, "tokens": STRS, "index": STR, "layer": STR, "modelId": STR,
        "maxValue": NUM, "maxValueTokenIndex": INT, "minValue": NUM, "values": NUMS,
        "creatorId": STR,
    },
    "Model": {"id": STR, "creatorId": STR, "layers": INT, "neuronsPerLayer": INT, "owner": STR},
    "SourceSet": {
        "modelId": STR, "name": STR, "description": STR, "creatorName": STR, "creatorId": STR,
        "urls": STRS,
    },
    "Source": {"id": STR, "modelId": STR, "setName": STR, "creatorId": STR},
    "ExplanationType": {
        "name": STR, "displayName": STR, "description": STR, "creatorName": STR,
        "creatorId": STR,
    },
    "ExplanationModelType": {
        "name": STR, "displayName": STR, "description": STR, "creatorName": STR,
    },
}  # fmt: skip

# Optional columns steerlex writes, with their JSON types (nullable where the schema is).
OPTIONAL: dict[str, dict[str, Any]] = {
    "Neuron": {"sourceSetName": (STR, NULL), "creatorId": (STR, NULL),
               "maxActApprox": (*NUM, NULL), "hasVector": BOOL},
    "Explanation": {"typeName": (STR, NULL), "explanationModelName": (STR, NULL),
                    "embedding": NULL, "umap_x": (*NUM, NULL), "umap_y": (*NUM, NULL),
                    "umap_cluster": (INT, NULL), "umap_log_feature_sparsity": (*NUM, NULL)},
    "Activation": {},
}  # fmt: skip

# Every scalar field of the tables the importer hands to Prisma's create/upsert (an
# unknown key there fails the import).
PRISMA_FIELDS = {
    "Model": {
        "id", "displayNameShort", "displayName", "creatorId", "tlensId", "openRouterId",
        "dimension", "thinking", "visibility", "defaultSourceSetName", "defaultSourceId",
        "defaultGraphSourceSetName", "inferenceEnabled", "instruct", "layers",
        "neuronsPerLayer", "createdAt", "owner", "updatedAt", "website",
    },
    "SourceSet": {
        "modelId", "name", "hasDashboards", "allowInferenceSearch", "visibility",
        "description", "type", "creatorName", "urls", "creatorEmail", "creatorId",
        "releaseName", "hasGraphs", "graphEnabled", "similarityMatrixEnabled",
        "defaultOfModelId", "defaultGraphModelId", "defaultRange", "defaultShowBreaks",
        "showDfa", "showCorrelated", "showHeadAttribution", "showUmap", "createdAt",
    },
    "Source": {
        "id", "modelId", "hasDashboards", "inferenceEnabled", "saelensConfig",
        "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility",
        "defaultOfModelId", "setName", "creatorId", "hasUmap", "hasUmapLogSparsity",
        "hasUmapClusters", "num_prompts", "num_tokens_in_prompt", "dataset", "notes",
        "cosSimMatchModelId", "cosSimMatchSourceId", "createdAt",
    },
    "ExplanationType": {
        "name", "displayName", "description", "featured", "isAttention",
        "explainerModelSettingsId", "settings", "url", "creatorName", "creatorId",
        "createdAt", "updatedAt",
    },
    "ExplanationModelType": {
        "name", "displayName", "description", "featured", "openRouterModelId", "url",
        "creatorName", "createdAt", "updatedAt",
    },
}  # fmt: skip

CONFIG_FILES = {
    "explanation_model_type.jsonl", "explanation_type.jsonl", "explanation_score_model.jsonl",
    "explanation_score_type.jsonl", "eval_type.jsonl",
}  # fmt: skip
CUID = re.compile(r"^c[^\s-]{8,}$", re.I)  # zod's z.string().cuid(), as the schema declares
BATCH = re.compile(r"^batch-\d+\.jsonl\.gz$")


def _has_type(value: Any, kind: Any) -> bool:
    if kind == STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == NUMS:
        return isinstance(value, list) and all(_has_type(v, NUM) for v in value)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # JSON true/false are not numbers
        return BOOL in kinds
    return isinstance(value, kinds)


def check_rows(table: str, rows: list[dict[str, Any]]) -> None:
    """Every required column present with its JSON type; optional ones typed."""
    assert rows, table
    for row in rows:
        for key, kind in REQUIRED[table].items():
            assert key in row, f"{table} row lacks required {key}: {row}"
            assert _has_type(row[key], kind), f"{table}.{key} = {row[key]!r} is not {kind}"
        for key, kind in OPTIONAL.get(table, {}).items():
            if key in row:
                assert _has_type(row[key], kind), f"{table}.{key} = {row[key]!r}"
        if table in PRISMA_FIELDS:
            assert set(row) <= PRISMA_FIELDS[table], set(row) - PRISMA_FIELDS[table]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def read_batches(directory: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    files = sorted(directory.iterdir())
    assert files and all(BATCH.match(f.name) for f in files), [f.name for f in files]
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            part = [json.loads(x) for x in fh.read().splitlines()]
        assert part, f"{f} is empty (the importer parses its first line)"
        keys = set(part[0])
        assert all(set(r) == keys for r in part), f"{f}: rows with other keys than the first"
        rows += part
    return rows


@pytest.fixture
def tiny(tmp_path: Path, cache_dir: Path) -> dict[str, Path]:
    model_dir = save_tiny_model(tmp_path / "tiny")
    weights_id = load_model(str(model_dir)).weights_id
    sae = SparseAutoencoder(
        SAEConfig(d_in=32, d_sae=24, k=4, model_spec=str(model_dir), weights_id=weights_id, layer=1)
    )
    save_sae(sae, tmp_path / "sae")
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    return {"model": model_dir, "sae": tmp_path / "sae", "vocab": vocab, "root": tmp_path}


def _explain(tiny: dict[str, Path], *args: str) -> Path:
    out = tiny["root"] / "expl"
    assert main(["explain", "--sae", str(tiny["sae"]), "--top-k", "6", "--out", str(out),
                 "--quiet", *args]) == 0  # fmt: skip
    return out


def _harvest(tiny: dict[str, Path]) -> Path:
    texts = tiny["root"] / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    acts = tiny["root"] / "acts"
    assert main(["harvest", "--model", str(tiny["model"]), "--layer", "1", "--source", str(texts),
                 "--out", str(acts), "--quiet"]) == 0  # fmt: skip
    return acts


def test_export_is_what_the_importer_reads(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    acts = _harvest(tiny)
    expl = _explain(tiny, "--method", "mi", "--method", "topact", "--vocab", str(tiny["vocab"]),
                    "--activations", str(acts))  # fmt: skip
    capsys.readouterr()
    out = tiny["root"] / "np"
    assert main(["export-neuronpedia", "--sae", str(tiny["sae"]), "--explanations", str(expl),
                 "--model-id", "tiny", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "tiny / 1-steerlex-res-24: 24 features" in printed

    # the layout of the neuronpedia-datasets bucket under v1/
    src = out / "tiny" / "1-steerlex-res-24"
    assert {p.name for p in (out / "config").iterdir()} == CONFIG_FILES
    assert {p.name for p in src.iterdir()} == {
        "model.jsonl", "sourceset.jsonl", "source.jsonl", "features", "activations",
        "explanations",
    }  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["config", "tiny"]

    (model,) = read_jsonl(src / "model.jsonl")
    (sourceset,) = read_jsonl(src / "sourceset.jsonl")
    (source,) = read_jsonl(src / "source.jsonl")
    check_rows("Model", [model])
    check_rows("SourceSet", [sourceset])
    check_rows("Source", [source])
    assert model["id"] == "tiny" and model["layers"] == 4 and model["dimension"] == 32
    assert model["neuronsPerLayer"] == 64 and model["owner"] == ""
    assert sourceset["name"] == "steerlex-res-24" == source["setName"]
    assert source["id"] == "1-steerlex-res-24" and source["modelId"] == sourceset["modelId"]

    features = read_batches(src / "features")
    explanations = read_batches(src / "explanations")
    activations = read_batches(src / "activations")
    check_rows("Neuron", features)
    check_rows("Explanation", explanations)
    check_rows("Activation", activations)
    assert [f["index"] for f in features] == [str(c) for c in range(24)]
    assert {f["layer"] for f in features} == {source["id"]}
    assert {f["sourceSetName"] for f in features} == {sourceset["name"]}

    keys = {(f["modelId"], f["layer"], f["index"]) for f in features}
    assert all((r["modelId"], r["layer"], r["index"]) in keys for r in explanations + activations)
    for rows in (explanations, activations):
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids) and all(CUID.match(i) for i in ids)
    assert not {r["id"] for r in explanations} & {r["id"] for r in activations}

    types = read_jsonl(out / "config" / "explanation_type.jsonl")
    check_rows("ExplanationType", types)
    assert {t["name"] for t in types} == {"steerlex-mi", "steerlex-topact"}
    assert {r["typeName"] for r in explanations} <= {t["name"] for t in types}
    assert {r["explanationModelName"] for r in explanations} == {None}
    assert read_jsonl(out / "config" / "explanation_model_type.jsonl") == []
    assert {r["authorId"] for r in explanations} == {NEURONPEDIA_AUTHOR_ID}
    assert {r["creatorId"] for r in activations + features + types} == {NEURONPEDIA_AUTHOR_ID}
    mi = [r for r in explanations if r["typeName"] == "steerlex-mi"]
    assert len(mi) == 24 and all(len(r["description"].split(", ")) == 6 for r in mi)

    # activation rows: TopAct examples with their per-token values
    for r in activations:
        assert len(r["tokens"]) == len(r["values"]) > 0
        assert r["maxValue"] == max(r["values"]) == r["values"][r["maxValueTokenIndex"]] > 0
        assert r["minValue"] == min(r["values"])
    by_feature: dict[str, list[float]] = {}
    for r in activations:
        by_feature.setdefault(r["index"], []).append(r["maxValue"])
    assert all(len(v) <= 20 for v in by_feature.values())
    assert all(f["maxActApprox"] == max(by_feature.get(f["index"], [0.0])) for f in features)
    words = set(" ".join(SENTENCES).split())
    assert words & {t.strip() for r in activations for t in r["tokens"]}

    # the same input gives the same bytes
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["export-neuronpedia", "--sae", str(tiny["sae"]), "--explanations", str(expl),
                 "--model-id", "tiny", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_export_without_topact_has_no_activation_rows(
    tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    expl = tiny["root"] / "expl"
    es = [Explanation(c, "mi", ("cat", "dog"), (0.5, 0.25)) for c in range(24)]
    es[3] = Explanation(3, "mi", ("rain",), (0.4,), "weather words")
    es[5] = Explanation(5, "mi", (), ())  # nothing to say: no row
    write_explanations(es, expl, "mi", {})
    assert main(["export-neuronpedia", "--sae", str(tiny["sae"]), "--explanations", str(expl),
                 "--explanation-model", "gpt-test", "--author-id", "user1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "0 activations" in printed and "has no TopAct examples" in printed
    root = expl / "neuronpedia"  # the default --out
    src = root / "tiny" / "1-steerlex-res-24"
    assert not (src / "activations").exists()
    rows = read_batches(src / "explanations")
    check_rows("Explanation", rows)
    assert len(rows) == 23 and {r["authorId"] for r in rows} == {"user1"}
    summarised = [r for r in rows if r["index"] == "3"]
    assert summarised[0]["description"] == "weather words"
    assert summarised[0]["explanationModelName"] == "gpt-test"
    assert {r["explanationModelName"] for r in rows if r["index"] != "3"} == {None}
    model_types = read_jsonl(root / "config" / "explanation_model_type.jsonl")
    check_rows("ExplanationModelType", model_types)
    assert [m["name"] for m in model_types] == ["gpt-test"]

    # a second source into the same root keeps the first one's config rows, and a rerun
    # removes batch files it no longer writes
    lens = [Explanation(c, "logitlens", (" the", " a"), (2.0, 1.0)) for c in (0, 1)]
    write_explanations(lens, expl, "logitlens", {})
    stale = src / "explanations" / "batch-7.jsonl.gz"
    stale.write_bytes(gzip.compress(b"{}\n"))
    cfg = NeuronpediaConfig(sae=str(tiny["sae"]), explanations=str(expl), methods=["logitlens"],
                            source_id="1-other-24", out=str(root))  # fmt: skip
    r = export_neuronpedia_job(cfg, RunContext(progress=False, log=None))
    assert r.path == root / "tiny" / "1-other-24" and r.explanations == 2 and r.activations == 0
    names = {t["name"] for t in read_jsonl(root / "config" / "explanation_type.jsonl")}
    assert names == {"steerlex-mi", "steerlex-logitlens"}
    export_neuronpedia_job(
        NeuronpediaConfig(sae=str(tiny["sae"]), explanations=str(expl), methods=["mi"]),
        RunContext(progress=False, log=None),
    )
    assert not stale.exists()


@pytest.mark.parametrize(
    ("d_sae", "label"),
    [(24, "24"), (512, "512"), (1000, "1k"), (1024, "1k"), (1536, "1536"), (2048, "2k"),
     (16384, "16k"), (65536, "65k"), (131072, "131k"), (1 << 20, "1m")],
)  # fmt: skip
def test_width_labels(d_sae: int, label: str) -> None:
    assert neuronpedia_width(d_sae) == label
    assert neuronpedia_source_id(8, d_sae) == f"8-steerlex-res-{label}"
    assert neuronpedia_source_set(f"8-steerlex-res-{label}") == f"steerlex-res-{label}"


def test_small_sae_source_id(tiny: dict[str, Path]) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=512, k=4, model_spec=str(tiny["model"]),
                                      layer=3))  # fmt: skip
    save_sae(sae, tiny["root"] / "sae512")
    expl = tiny["root"] / "sae512" / "explanations"
    write_explanations([Explanation(511, "mi", ("cat",), (1.0,))], expl, "mi", {})
    r = export_neuronpedia_job(
        NeuronpediaConfig(sae=str(tiny["root"] / "sae512")), RunContext(progress=False, log=None)
    )
    assert r.source_id == "3-steerlex-res-512" and r.features == 512
    assert r.model_id == "tiny" == neuronpedia_model_id(str(tiny["model"]))
    assert [x["index"] for x in read_batches(r.path / "explanations")] == ["511"]


def test_model_ids() -> None:
    assert neuronpedia_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2.5-0.5b-instruct"
    assert neuronpedia_model_id("embedded:qwen2.5-coder-0.5b-instruct") == (
        "qwen2.5-coder-0.5b-instruct"
    )
    assert neuronpedia_model_id("/models/My Model.gguf") == "my-model"


def test_bad_input(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ctx = RunContext(progress=False, log=None)
    sae = str(tiny["sae"])
    with pytest.raises(ExplainError, match="explanations directory .* does not exist"):
        export_neuronpedia_job(NeuronpediaConfig(sae=sae), ctx)
    empty = tiny["root"] / "empty"
    empty.mkdir()
    with pytest.raises(ExplainError, match="No explanation files"):
        export_neuronpedia_job(NeuronpediaConfig(sae=sae, explanations=str(empty)), ctx)
    (empty / "mi.jsonl").write_text("")
    with pytest.raises(ExplainError, match="hold no words or summaries"):
        export_neuronpedia_job(NeuronpediaConfig(sae=sae, explanations=str(empty)), ctx)
    write_explanations([Explanation(30, "mi", ("cat",), (1.0,))], empty, "mi", {})
    with pytest.raises(ExplainError, match=r"name features \[30\].*features 0..23"):
        export_neuronpedia_job(NeuronpediaConfig(sae=sae, explanations=str(empty)), ctx)
    with pytest.raises(ExplainError, match="must be <layer>-<source set>"):
        NeuronpediaConfig(sae=sae, source_id="steerlex-res-24").validate()
    with pytest.raises(ExplainError, match="only letters, digits"):
        NeuronpediaConfig(sae=sae, model_id="my model").validate()
    with pytest.raises(ExplainError, match="examples must be at least 0"):
        NeuronpediaConfig(sae=sae, examples=-1).validate()
    assert not (empty / "neuronpedia").exists()

    code = main(["export-neuronpedia", "--sae", sae, "--explanations", str(tiny["root"] / "no")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err
