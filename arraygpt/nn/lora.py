"""LoRA (Hu et al. 2021, as PEFT implements it): low-rank adapters beside frozen weights.

A targeted weight W (out, in) gains A (r, in) and B (out, r); the layer computes
x W^T + (alpha / r) (x A^T) B^T (``layers.lora_linear_forward``), and training updates A and B
only. Merging folds them back: W + (alpha / r) B A.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from arraygpt.xp import Array, Backend, host_full, host_rng

__all__ = ["LORA_TARGETS", "LoRA", "init_adapters", "merge"]

# the weights a LoRA adapter may attach to (those of the model's MLP kind)
LORA_TARGETS = ("attn_wq", "attn_wk", "attn_wv", "attn_wo", "mlp_fc1", "mlp_fc2", "mlp_gate", "mlp_up", "mlp_down")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA adapters' settings (Hu et al. 2021; PEFT's LoraConfig): rank r, alpha (the update is
    scaled by alpha / r; PEFT's default lora_alpha is 8) and the weights they attach to (PEFT's
    default for Llama-style models: q_proj and v_proj, arraygpt's attn_wq and attn_wv)."""

    rank: int
    alpha: float = 8.0
    targets: tuple[str, ...] = ("attn_wq", "attn_wv")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise ValueError(
                f"LoRA targets must be distinct names among {', '.join(LORA_TARGETS)}, "
                f"got {', '.join(targets) or 'none'}"
            )
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def init_adapters(
    params: Mapping[str, Array], n_layer: int, lora: LoRA, seed: int, dtype: str, backend: Backend
) -> dict[str, Array]:
    """``layer{i}.<target>.lora_a`` (r, in) drawn as PEFT draws it (``kaiming_uniform_(a=sqrt(5))``:
    uniform in +-1/sqrt(in)) from a host generator seeded ``[seed, 17]``, and ``.lora_b`` (out, r)
    at zero, so that a model with fresh adapters computes what it computed before."""
    rng = host_rng([seed, 17])
    adapters = {}
    for i in range(n_layer):
        for target in lora.targets:
            out, fan_in = params[f"layer{i}.{target}"].shape
            bound = 1.0 / math.sqrt(fan_in)
            a = rng.uniform(-bound, bound, (lora.rank, fan_in))  # (r, in)
            adapters[f"layer{i}.{target}.lora_a"] = backend.asarray(a.astype(dtype))
            adapters[f"layer{i}.{target}.lora_b"] = backend.asarray(host_full((out, lora.rank), 0.0).astype(dtype))
    return adapters


def merge(params: Mapping[str, Array], adapters: Mapping[str, Array], lora: LoRA, n_layer: int) -> dict[str, Array]:
    """Each targeted weight with its adapters folded in: name -> W + (alpha / r) B A, (out, in)."""
    merged = {}
    for i in range(n_layer):
        for target in lora.targets:
            name = f"layer{i}.{target}"
            a, b = adapters[name + ".lora_a"], adapters[name + ".lora_b"]
            merged[name] = params[name] + lora.scale * (b @ a)  # (out, in)
    return merged
