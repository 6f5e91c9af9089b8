"""docs/tour.md runs as written: its ```python blocks, executed in order in one namespace, in a
temporary folder (so ``figures/`` and ``runs/`` land there, not in docs/).

It checks what the tour claims (each block's own asserts), that every picture the tour shows is
one its code wrote and one committed under docs/figures/ (small), and that the page was written.
Run from docs/ (``cd docs`` and the same blocks) the code rewrites docs/figures/tour-*.png."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
TOUR = DOCS / "tour.md"

pytest.importorskip("matplotlib", reason="the tour draws pictures (pip install 'arraygpt[viz]')")
pytest.importorskip("names", reason="the tour trains on the names data (pip install names)")


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TOUR.read_text(encoding="utf-8"), re.S)


def test_the_tour_has_the_documents_story():
    text = TOUR.read_text(encoding="utf-8")
    headings = re.findall(r"^## \d+\. (.+)$", text, re.M)
    assert headings == [
        "Tokens and embeddings",
        "One attention head",
        "Masking",
        "Softmax with temperature",
        "Predicting and sampling",
        "Counting GPT-3's parameters",
        "Training microgpt and looking at its distribution",
    ]
    assert len(blocks()) >= 10


def test_the_tour_runs_and_draws_its_pictures(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "tour"}
    start = time.perf_counter()
    for n, block in enumerate(blocks(), 1):
        exec(compile(block, f"docs/tour.md (python block {n})", "exec"), namespace)
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "[4, 12, 12, 0] -> 'emma'" in out
    assert "attention is 33% of the total" in out
    shown = re.findall(r"!\[[^\]]*\]\((figures/tour-[\w-]+\.png)\)", TOUR.read_text(encoding="utf-8"))
    assert len(shown) == len(set(shown)) >= 6
    written = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "figures").glob("*.png"))
    assert written == sorted(shown), "every picture the tour shows is one its code writes, and no other"
    for name in shown:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        committed = DOCS / name
        assert committed.is_file(), f"{committed} is not committed (run the tour's blocks from docs/)"
        assert committed.stat().st_size < 60_000, f"{committed} is not small"
    assert (tmp_path / "runs" / "tour.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert elapsed < 60, f"the tour took {elapsed:.0f} s; keep it to about 20"
