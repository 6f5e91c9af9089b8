"""The shape of the house (docs/architecture.md), checked from the source: who may import whom,
no import circle, argparse only in the command layer, a pure core, named caches.

Every import counts: module level, inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "arraygpt": ROOT / "arraygpt",
    "arraygpt.backends": ROOT / "backends",
    "arraygpt.plugins": ROOT / "plugins",
}

# The layers, top to bottom; a module may import its own layer and those below, never one above.
LAYERS = {
    "cli": 7,
    "viz": 6,
    "training": 5,
    "generation": 4,
    "io": 3,
    "nn": 2,
    "config": 1,
    "xp": 0,
    "errors": 0,
    "hookspecs": 0,
    "manager": 0,
}
# What backends/ and plugins/ may use: the contract modules written for them.
PLUGIN_CONTRACTS = {
    "arraygpt.xp",
    "arraygpt.errors",
    "arraygpt.hookspecs",
    "arraygpt.config",
    "arraygpt.nn.layers",
    "arraygpt.nn.kernels",
    "arraygpt.nn.quant",  # quantized weights: the type a quantized_linear kernel takes, and its reference
    "arraygpt.training.optim",
    "arraygpt.generation.sampling",
}
MAX_TOP_LEVEL_MODULES = 6  # __init__, config, errors, hookspecs, manager, xp


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if package == "arraygpt" and parts and parts[0] in ("backends", "plugins"):
                continue
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The arraygpt module that ``name`` (a module, or a module's attribute) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _lazy_targets(tree: ast.Module) -> set[str]:
    """The modules named in the top package's ``_LAZY`` table (name -> module, imported on access)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            return {v.value for v in node.value.values}
    return set()


def imports_of(module: str) -> set[str]:
    """Every arraygpt module that ``module`` imports, however it imports it."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set(_lazy_targets(tree)) if module == "arraygpt" else set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [node.args[0].value]
        for name in names:
            if name.split(".")[0] == "arraygpt":
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_circle():
    """Tarjan's strongly connected components over every import: each must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert circles == [], f"import circles: {circles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_nothing_imports_a_layer_above_it(module):
    me = LAYERS[_layer(module)]
    upward = sorted(o for o in GRAPH[module] if _layer(o) and LAYERS[_layer(o)] > me)
    assert not upward, f"{module} (layer {_layer(module)}) imports {upward} from above it"


def test_every_library_module_has_a_layer():
    top = [
        m for m in MODULES if m.startswith("arraygpt.") and not m.startswith(("arraygpt.backends", "arraygpt.plugins"))
    ]
    assert [m for m in top if _layer(m) is None] == []
    top_level_files = [p for p in (ROOT / "arraygpt").glob("*.py")]
    assert len(top_level_files) <= MAX_TOP_LEVEL_MODULES, sorted(p.name for p in top_level_files)


@pytest.mark.parametrize("package", ["arraygpt.backends", "arraygpt.plugins"])
def test_backends_and_plugins_import_only_contracts(package):
    for module in sorted(m for m in MODULES if m.startswith(package)):
        extra = {o for o in GRAPH[module] if not o.startswith(package)} - PLUGIN_CONTRACTS
        assert not extra, f"{module} imports {sorted(extra)}; plugins may import only {sorted(PLUGIN_CONTRACTS)}"


def test_config_imports_nothing_of_arraygpt_but_errors():
    assert GRAPH["arraygpt.config"] <= {"arraygpt.errors"}


def test_the_layers_cannot_reach_a_plugin():
    """Nothing the layers import, directly or not, imports a plugin (a broken plugin cannot break the math)."""
    seen, todo = set(), ["arraygpt.nn.layers"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    assert not {m for m in seen if m.startswith(("arraygpt.backends", "arraygpt.plugins"))}, sorted(seen)


def test_argparse_lives_only_in_the_command_layer():
    users = sorted(
        module
        for module, path in MODULES.items()
        if "argparse" in path.read_text(encoding="utf-8") and _layer(module) != "cli"
    )
    assert users == []


def test_the_core_holds_no_threads_generators_or_io():
    source = (ROOT / "arraygpt" / "nn" / "core.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"threading", "concurrent", "os", "io", "pathlib", "json", "numpy", "random"}, imported
    assert "open(" not in source and "host_rng" not in source and "default_rng" not in source


def test_caches_are_named_records():
    """Layer and block caches are NamedTuples: attention_patterns reads ``.attn.probs`` by name."""
    import numpy as np

    from arraygpt import GPT, GPTConfig
    from arraygpt.nn import core, layers

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
