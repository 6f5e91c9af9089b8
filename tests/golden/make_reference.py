"""Write tests/golden/reference.safetensors: the reference of tests/test_golden.py, computed by
PyTorch autograd in float64 (the shape of llm.c's test_gpt2.c and its gpt2_124M_debug_state.bin).

The weights are arraygpt's initial weights (``GPT(config, seed=...)``), dumped; everything else is
computed here, in PyTorch, from those weights alone: the GPT forward is written out below from
the definitions in arraygpt/nn/core.py and arraygpt/nn/layers.py, the gradients come from autograd and
the optimizer is ``torch.optim.AdamW`` with arraygpt's decay rule (2-D parameters decay; gains
and biases do not) as two parameter groups.

Stored per config (``<config>/...``): inputs, targets, every initial weight (``param/<name>``),
logits, loss, every gradient (``grad/<name>``), the loss before each of STEPS AdamW steps on the
same batch (``losses``) and the weights after them (``final/<name>``). The configs and the
optimizer's hyperparameters are in the file's metadata, as JSON.

Run once, from the repository root, with torch installed:

    python tests/golden/make_reference.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arraygpt import GPT, GPTConfig
from arraygpt.io.safetensors import save_file
from arraygpt.xp import to_numpy

OUT = Path(__file__).resolve().parent / "reference.safetensors"
STEPS = 10
OPTIMIZER = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
B = 2


def configs() -> dict[str, tuple[GPTConfig, GPTConfig, int]]:
    """name -> (the model's config, the config whose init draws the weights, seed)."""
    gpt2 = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, init_std=0.1)
    micro = GPTConfig.preset("microgpt")
    # microgpt starts attn_wo and mlp_fc2 at zero, which zeroes the gradients of every other
    # block weight; draw those two like the rest so that every gradient is exercised.
    micro_init = GPTConfig.preset("microgpt", init_output="normal", init_std=0.1)
    return {"gpt2": (gpt2, gpt2, 1234), "microgpt": (micro, micro_init, 4321)}


def norm(cfg: GPTConfig, W: dict[str, torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    w, b = W.get(name), W.get(name + "_b")
    if cfg.norm == "layernorm":
        return F.layer_norm(x, (cfg.n_embd,), w, b, cfg.norm_eps)
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)  # RMSNorm
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out


def linear(W: dict[str, torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    return F.linear(x, W[name], W.get(name + "_b"))  # x @ w.T + b, w stored (out, in)


def activation(cfg: GPTConfig, x: torch.Tensor) -> torch.Tensor:
    if cfg.activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if cfg.activation == "gelu":
        return F.gelu(x)
    if cfg.activation == "relu":
        return F.relu(x)
    if cfg.activation == "relu2":
        return F.relu(x).square()
    raise ValueError(cfg.activation)


def forward(cfg: GPTConfig, W: dict[str, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor):
    Bsz, T = idx.shape
    NH, hs = cfg.n_head, cfg.head_dim
    x = W["wte"][idx] + W["wpe"][:T]  # (B, T, C)
    if cfg.norm_emb:
        x = norm(cfg, W, x, "norm_emb")
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"layer{i}."
        h = norm(cfg, W, x, p + "norm1")
        q, k, v = (linear(W, h, p + n).view(Bsz, T, NH, hs).transpose(1, 2) for n in ("attn_wq", "attn_wk", "attn_wv"))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, NH, T, T)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(Bsz, T, NH * hs)
        x = x + linear(W, y, p + "attn_wo")
        h = norm(cfg, W, x, p + "norm2")
        x = x + linear(W, activation(cfg, linear(W, h, p + "mlp_fc1")), p + "mlp_fc2")
    if cfg.norm_final:
        x = norm(cfg, W, x, "normf")
    logits = x @ (W["wte"] if cfg.tie_embeddings else W["lm_head"]).T  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-1)
    return logits, loss


def reference(name: str, cfg: GPTConfig, init_cfg: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    weights = {
        k: to_numpy(v).astype(np.float64) for k, v in GPT(init_cfg, seed=seed, dtype="float64").state_dict().items()
    }
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=(B, cfg.block_size), dtype=np.int64)
    targets = np.concatenate([idx[:, 1:], rng.integers(0, cfg.vocab_size, size=(B, 1))], axis=1).astype(np.int64)
    if name == "gpt2":
        targets[1, 3] = -1  # one position without a target (arraygpt's and PyTorch's ignore_index)

    W = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in weights.items()}
    idx_t, targets_t = torch.tensor(idx), torch.tensor(targets)
    logits, loss = forward(cfg, W, idx_t, targets_t)
    loss.backward()
    out = {
        f"{name}/inputs": idx,
        f"{name}/targets": targets,
        f"{name}/logits": logits.detach().numpy(),
        f"{name}/loss": np.array([loss.item()]),
    }
    out.update({f"{name}/param/{k}": v for k, v in weights.items()})
    out.update({f"{name}/grad/{k}": W[k].grad.numpy().copy() for k in weights})

    W = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in weights.items()}
    decay = [t for t in W.values() if t.ndim >= 2]
    no_decay = [t for t in W.values() if t.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPTIMIZER["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPTIMIZER["lr"],
        betas=tuple(OPTIMIZER["betas"]),
        eps=OPTIMIZER["eps"],
        foreach=False,
    )
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        _, loss = forward(cfg, W, idx_t, targets_t)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    out[f"{name}/losses"] = np.array(losses)
    out.update({f"{name}/final/{k}": t.detach().numpy().copy() for k, t in W.items()})
    return out


def main() -> None:
    torch.set_default_dtype(torch.float64)
    tensors: dict[str, np.ndarray] = {}
    metadata = {"optimizer": json.dumps(OPTIMIZER), "steps": str(STEPS), "torch": torch.__version__}
    for name, (cfg, init_cfg, seed) in configs().items():
        tensors.update(reference(name, cfg, init_cfg, seed))
        metadata[name] = json.dumps(cfg.to_dict())
        print(
            f"{name}: loss {tensors[name + '/loss'][0]:.6f}, losses {np.round(tensors[name + '/losses'], 4).tolist()}"
        )
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
