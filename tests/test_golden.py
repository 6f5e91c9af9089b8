"""The golden test, in the shape of llm.c's test_gpt2.c: a stored reference computed once by
PyTorch autograd in float64 (tests/golden/make_reference.py) against arraygpt's forward, backward
and 10 AdamW steps. Runs without PyTorch.

Two configs: a tiny GPT-2 (LayerNorm with biases, gelu_tanh, tied embeddings, one ignored target)
and microgpt's preset (RMSNorm without gain, no biases, ReLU, norm after the embedding, no final
norm, separate lm_head). Each tensor's max abs difference is printed next to its tolerance; the
test fails once, naming every tensor over it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arraygpt import GPT, GPTConfig
from arraygpt.io.safetensors import load_file, read_metadata
from arraygpt.training.optim import create_optimizer
from arraygpt.xp import to_numpy

REFERENCE = Path(__file__).resolve().parent / "golden" / "reference.safetensors"
CONFIGS = ("gpt2", "microgpt")

# float64 runs the same arithmetic in another order: differences are rounding, ~1e-15. float32
# rounds every step at eps ~1.2e-7; its tolerances are multiples of eps, per kind of tensor.
# The key bias is the exception after the AdamW steps: its gradient is zero in exact arithmetic
# (softmax ignores a constant added to every score of a row), so each side moves it by its own
# rounding noise divided by that noise's RMS (Adam's m / sqrt(v)); in float32 that noise is not far
# below eps=1e-8 and the drift differs by up to lr per step: the tolerance is lr * steps.
EPS32 = float(np.finfo(np.float32).eps)
TOLERANCE = {
    "float64": {"logits": 1e-10, "loss": 1e-10, "grad": 1e-10, "losses": 1e-10, "final": 1e-10, "final_wk_b": 1e-10},
    "float32": {
        "logits": 20 * EPS32,
        "loss": 20 * EPS32,
        "grad": 10 * EPS32,
        "losses": 100 * EPS32,
        "final": 100 * EPS32,
        "final_wk_b": None,
    },  # None: lr * steps
}


def load_reference(name: str) -> tuple[GPTConfig, dict, dict[str, np.ndarray]]:
    tensors = load_file(REFERENCE)
    meta = read_metadata(REFERENCE)
    prefix = name + "/"
    ref = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return (
        GPTConfig.from_dict(json.loads(meta[name])),
        {**json.loads(meta["optimizer"]), "steps": int(meta["steps"])},
        ref,
    )


def run_arraygpt(name: str, dtype: str, perturb=None) -> list[tuple[str, float, float]]:
    config, opt_cfg, ref = load_reference(name)
    tol = TOLERANCE[dtype]
    names = [k[len("param/") :] for k in ref if k.startswith("param/")]
    model = GPT(config, seed=0, dtype=dtype)
    model.load_state_dict({k: ref["param/" + k] for k in names})
    idx, targets = ref["inputs"], ref["targets"]

    logits, loss = model.forward(idx, targets)
    grads = {k: to_numpy(g).astype(np.float64) for k, g in model.backward().items()}
    if perturb is not None:
        perturb(grads)
    rows = [
        ("logits", _diff(to_numpy(logits), ref["logits"]), tol["logits"]),
        ("loss", abs(loss - float(ref["loss"][0])), tol["loss"]),
    ]
    if sorted(grads) != sorted(names):
        rows.append((f"grad names {sorted(set(grads) ^ set(names))}", float("inf"), 0.0))
    rows += [
        ("grad/" + k, _diff(grads[k], ref["grad/" + k]) if k in grads else float("inf"), tol["grad"]) for k in names
    ]

    model = GPT(config, seed=0, dtype=dtype)
    model.load_state_dict({k: ref["param/" + k] for k in names})
    opt = create_optimizer(
        "adamw", model.params, betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"]
    )
    losses = []
    for _ in range(opt_cfg["steps"]):
        _, step_loss = model.forward(idx, targets)
        losses.append(step_loss)
        opt.step(model.backward(), opt_cfg["lr"])
    rows.append(("losses", _diff(np.array(losses), ref["losses"]), tol["losses"]))
    drift = tol["final_wk_b"] if tol["final_wk_b"] is not None else opt_cfg["lr"] * opt_cfg["steps"]
    rows += [
        (
            "final/" + k,
            _diff(to_numpy(model.params[k]), ref["final/" + k]),
            drift if k.endswith("attn_wk_b") else tol["final"],
        )
        for k in names
    ]
    return rows


def _diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        return float("inf")
    return float(np.max(np.abs(ours - theirs))) if ours.size else 0.0


def report(name: str, dtype: str, rows: list[tuple[str, float, float]]) -> list[str]:
    """Print the per-tensor table; return the names of the tensors over their tolerance."""
    print(f"\n{name} ({dtype}): max abs difference against PyTorch autograd (float64)")
    failing = []
    for tensor, diff, tol in rows:
        ok = diff <= tol
        print(f"  {'OK ' if ok else 'BAD'} {tensor:<28} {diff:10.3e}  (tolerance {tol:.1e})")
        if not ok:
            failing.append(f"{tensor}: {diff:.3e} > {tol:.1e}")
    print(f"  overall: {'ok' if not failing else 'NOT OK'}")
    return failing


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", CONFIGS)
def test_golden(name, dtype):
    failing = report(name, dtype, run_arraygpt(name, dtype))
    assert not failing, f"{name} ({dtype}): {len(failing)} tensor(s) over tolerance:\n" + "\n".join(failing)


def test_golden_reference_is_complete_and_small():
    assert REFERENCE.stat().st_size < 1_000_000
    for name in CONFIGS:
        config, opt_cfg, ref = load_reference(name)
        names = set(GPT(config, seed=0, dtype="float64").state_dict())
        for kind in ("param", "grad", "final"):
            assert {k.split("/", 1)[1] for k in ref if k.startswith(kind + "/")} == names, (name, kind)
        assert ref["losses"].shape == (opt_cfg["steps"],) == (10,)
        assert ref["losses"][-1] < ref["losses"][0]  # the steps train: the reference is no constant
        assert all(np.any(ref["grad/" + k] != 0) for k in names if not k.endswith("attn_wk_b")), name
    assert GPTConfig.from_dict(json.loads(read_metadata(REFERENCE)["microgpt"])) == GPTConfig.preset("microgpt")


def test_golden_fails_on_a_wrong_gradient():
    """A gradient off by a little more than the tolerance is named in the failures."""

    def perturb(grads):
        grads["layer1.mlp_fc1"][0, 0] += 1e-8

    failing = report("gpt2", "float64", run_arraygpt("gpt2", "float64", perturb))
    assert [f.split(":")[0] for f in failing] == ["grad/layer1.mlp_fc1"]
