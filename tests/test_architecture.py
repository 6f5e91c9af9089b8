"""The shape of the house (docs/architecture.md), checked from the source: who may import whom,
argparse only in the command layer, a pure core, named caches."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom; a module may import its own level and those below, never one above.
LEVELS = {
    "cli": 6,
    "training": 5, "generation": 5, "interop": 5, "interop_llama": 5, "formats": 5, "checkpoint": 5,
    "data": 5, "viz": 5, "distributed": 5, "precision": 5, "runfolder": 5,
    "model": 4,
    "kernels": 3,
    "core": 2, "runner": 2, "optim": 2, "sampling": 2,
    "layers": 1, "safetensors": 1, "tokenizer": 1,
    "shim": 0, "errors": 0, "hookspecs": 0, "manager": 0,
}  # fmt: skip
# The upward imports the design allows, each inside a function: GPT.from_pretrained/save_pretrained
# delegate to arraygpt.formats, which knows the file formats.
ALLOWED_UPWARD = {("model", "formats")}
# What backends/ and plugins/ may use: the shim, the layers, the hooks and the small contract
# modules written for them (samplers, optimizers, kernels).
PLUGIN_MAY_IMPORT = {"shim", "layers", "hookspecs", "sampling", "optim", "kernels", "errors"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "arraygpt")
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _arraygpt_imports(path: Path) -> set[str]:
    """The arraygpt modules ``path`` imports, at the top or inside functions, leaving out imports
    under ``if TYPE_CHECKING:`` (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "arraygpt" else [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "arraygpt" and len(parts) > 1:
                found.add(parts[1])
    return found


LIBRARY = sorted(p for p in (ROOT / "arraygpt").rglob("*.py") if p.name != "__init__.py" or p.parent.name == "cli")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_a_module_above_it(path):
    me = _module_name(path)
    assert me in LEVELS, f"{path.name} has no level in this test and in docs/architecture.md: add it to both"
    upward = {
        other for other in _arraygpt_imports(path)
        if other in LEVELS and LEVELS[other] > LEVELS[me] and (me, other) not in ALLOWED_UPWARD
    }  # fmt: skip
    assert not upward, f"{me} (level {LEVELS[me]}) imports {sorted(upward)} from above it"


@pytest.mark.parametrize("folder", ["backends", "plugins"])
def test_backends_and_plugins_use_only_the_shim_layers_and_hooks(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        extra = _arraygpt_imports(path) - PLUGIN_MAY_IMPORT - {"backends", "plugins"}
        assert not extra, f"{folder}/{path.name} imports arraygpt.{sorted(extra)}"


def test_argparse_lives_only_in_the_command_layer():
    users = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "arraygpt").rglob("*.py")
        if "argparse" in p.read_text(encoding="utf-8") and _module_name(p) != "cli"
    )  # fmt: skip
    assert users == []


def test_the_core_holds_no_threads_generators_or_io():
    source = (ROOT / "arraygpt" / "core.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"threading", "concurrent", "os", "io", "pathlib", "json", "numpy", "random"}, imported
    assert "open(" not in source and "host_rng" not in source and "default_rng" not in source


def test_caches_are_named_records():
    """Layer and block caches are NamedTuples: attention_patterns reads ``.attn.probs`` by name."""
    import numpy as np

    from arraygpt import GPT, GPTConfig, core, layers

    model = GPT(GPTConfig.preset("gpt2", vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8))
    logits, loss, cache = core.gpt_forward(
        model._core_params, model.config, np.zeros((1, 4), dtype=np.int64), np.ones((1, 4), dtype=np.int64)
    )
    assert isinstance(cache, core.GPTCache) and isinstance(cache.blocks[0], core.BlockCache)
    assert isinstance(cache.blocks[0].attn, layers.AttentionCache)
    assert isinstance(cache.blocks[0].norm1, layers.NormCache) and isinstance(cache.unembed, layers.LinearCache)
    assert isinstance(cache.loss, layers.CrossEntropyCache) and isinstance(cache.encoder, layers.EncoderCache)
    probs = cache.blocks[0].attn.probs  # (B, NH, T, Tk)
    assert probs.shape == (1, 2, 4, 4) and np.allclose(probs.sum(-1), 1.0)
