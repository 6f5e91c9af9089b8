"""The engine's commands: `arraygpt params` (table and --json) and `arraygpt backends`."""

from __future__ import annotations

import json

import pytest

from arraygpt import GPTConfig, count_params, shim
from arraygpt.cli import main
from arraygpt.shim import load_backend
from conftest import has_gpu

CATEGORIES = ["embedding", "key", "query", "value", "output", "up_projection", "down_projection", "unembedding", "other"]


@pytest.mark.parametrize("preset", ["gpt2", "gpt3-13b", "microgpt"])
def test_params_json_matches_count_params(capsys, preset):
    assert main(["params", "--preset", preset, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    counts = count_params(GPTConfig.preset(preset))
    assert data["total"] == counts.total
    assert list(data["by_category"]) == CATEGORIES
    assert data["by_category"] == counts.by_category
    assert data["by_name"] == counts.by_name
    if preset == "gpt2":
        assert data["total"] == 124_439_808


def test_params_json_applies_overrides(capsys):
    assert main(["params", "--preset", "gpt2", "--n-layer", "2", "--tie-embeddings", "false", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {
        "preset": "gpt2",
        **{k: v for k, v in vars(count_params(GPTConfig.preset("gpt2", n_layer=2, tie_embeddings=False))).items()},
    }


def test_params_table_lists_every_category(capsys):
    assert main(["params", "--preset", "gpt3-175b"]) == 0
    out = capsys.readouterr().out
    counts = count_params(GPTConfig.preset("gpt3-175b"))
    lines = out.splitlines()
    for category in CATEGORIES:
        (row,) = [line for line in lines if line.split() and line.split()[0] == category]
        assert row.rstrip().endswith(f"{counts.by_category[category]:,}"), row
    (total,) = [line for line in lines if line.startswith("total")]
    assert total.rstrip().endswith(f"{counts.total:,}")
    assert "12,288" in out and "tied" in out  # the shapes are printed, as in the seed's tally


def test_params_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit) as e:
        main(["params", "--preset", "gpt5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gpt5" in err and "gpt2" in err and "microgpt" in err


def test_params_reports_an_invalid_field(capsys):
    assert main(["params", "--preset", "gpt2", "--n-head", "7", "--json"]) == 2
    assert "n_head" in capsys.readouterr().err


def test_backends_lists_each_backend_with_availability(capsys, monkeypatch):
    monkeypatch.setattr(shim, "_active", None)
    monkeypatch.delenv("ARRAYGPT_BACKEND", raising=False)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "active backend: numpy" in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert {"numpy", "array_api_strict", "cupy", "torch"} <= set(rows)
    assert "available" in rows["numpy"] and "unavailable" not in rows["numpy"]
    assert f"threads={load_backend('numpy').threads}" in rows["numpy"]  # ARRAYGPT_NUM_THREADS or the cores
    gpu, why = has_gpu()
    if gpu:
        assert "unavailable" not in rows["cupy"]
    else:
        assert "unavailable" in rows["cupy"] and why in rows["cupy"]
        assert "CuPy" in rows["cupy"] or "CUDA" in rows["cupy"]
