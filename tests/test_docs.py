"""The README and docs/ say true things: the quick start runs, every relative link and picture
exists, the layout lists every module, and nothing names a path outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_pictures_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = [
        target
        for target in LINK.findall(text)
        if "://" not in target and not target.startswith("mailto:") and not (page.parent / target).exists()
    ]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_no_path_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    outside = re.findall(r"(?:\.\./shared|/work/|/root/|/tmp/\S+\.py|STYLE\.md)", text)
    assert not outside, f"{page.name} names paths outside the repository: {sorted(set(outside))}"


def test_the_readme_layout_lists_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    modules = [
        p.name
        for d in ("arraygpt", "backends", "plugins")
        for p in (ROOT / d).rglob("*.py")
        if p.name != "__init__.py" and p.parent.name != "cli"
    ]
    unlisted = sorted(name for name in modules if name not in layout)
    assert not unlisted, f"README's layout does not list {unlisted}"


def test_the_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("names", reason="the quick start trains on the names data: pip install 'arraygpt[names]'")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Quick start")
    (code,) = re.findall(r"```python\n(.*?)```", text[start : text.index("\n## ", start + 1)], re.S)[:1]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (quick start)", "exec"), {})
    printed = capsys.readouterr().out
    assert "embedding" in printed  # the tally by category was printed


PATH_REFERENCE = re.compile(r"(?<![\w/.-])((?:arraygpt|backends|plugins|tests|benchmarks|docs|examples)/[\w/.-]*\w)")


def _referenced_paths(text: str) -> set[str]:
    return {m for m in PATH_REFERENCE.findall(text) if "." in m.rsplit("/", 1)[-1] or m.endswith("/")}


def test_every_file_a_doc_or_a_comment_names_exists():
    """README, docs/ and every module's comments and docstrings name only files that exist."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    sources += [
        p for d in ("arraygpt", "backends", "plugins", "benchmarks", "tests") for p in sorted((ROOT / d).rglob("*.py"))
    ]
    missing = {}
    for source in sources:
        for name in _referenced_paths(source.read_text(encoding="utf-8")):
            if not (ROOT / name).exists() and not any(ch in name for ch in "*{<"):
                missing.setdefault(str(source.relative_to(ROOT)), []).append(name)
    assert not missing, f"names of files that do not exist: {missing}"


def test_every_arraygpt_module_a_doc_names_exists():
    """Dotted module names (``arraygpt.io.formats``) in README, docs/ and the code resolve."""
    import importlib.util

    dotted = re.compile(r"(?<![\w.])arraygpt(?:\.[a-z_][a-z0-9_]*)+")
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    sources += [p for d in ("arraygpt", "backends", "plugins") for p in sorted((ROOT / d).rglob("*.py"))]
    unknown = {}
    for source in sources:
        for name in set(dotted.findall(source.read_text(encoding="utf-8"))):
            parts = name.split(".")
            # the longest prefix that is a module; the rest must be an attribute of it
            for cut in range(len(parts), 0, -1):
                module = ".".join(parts[:cut])
                try:
                    found = importlib.util.find_spec(module) is not None
                except (ImportError, ValueError):
                    found = False
                if found:
                    break
            rest = parts[cut:]
            if rest:
                obj = importlib.import_module(module)
                for attr in rest:
                    if not hasattr(obj, attr):
                        unknown.setdefault(str(source.relative_to(ROOT)), []).append(name)
                        break
                    obj = getattr(obj, attr)
    assert not unknown, f"names that are neither a module nor an attribute: {unknown}"
