"""The GPT as two pure functions: ``gpt_forward`` walks the blocks and collects named caches,
``gpt_backward`` walks them in reverse, calling each layer's backward from ``layers.py``.

Data flow (pre-norm transformer, Radford et al. 2019):

    idx (B,T) -> encoder: wte[idx] + wpe[t] (no wpe with RoPE) -> [dropout] -> [norm_emb]
      -> n_layer x block:  x = x + dropout(attn_wo @ attention([rope](q), [rope](k), v))
                               with q, k, v = attn_wq, attn_wk, attn_wv @ norm1(x)
                           x = x + dropout(mlp_fc2 @ act(mlp_fc1 @ norm2(x)))            (standard MLP)
                           x = x + dropout(mlp_down @ (silu(mlp_gate @ h) * (mlp_up @ h)))  (SwiGLU, h = norm2(x))
      -> [normf] -> unembedding (lm_head, or wte when tied) -> logits (B,T,V)
      -> softmax cross-entropy against targets -> loss

Queries have n_head heads, keys and values n_kv_head (grouped-query attention when fewer), so
the fused q/k/v projection's output (B, T, D + 2 Dkv) has unequal parts. Rotary positions
(``config.position == "rope"``) rotate q and k after the projection, at positions offset by the
KV cache's length; the cache stores the rotated keys.

Read it as picoGPT's ``gpt2()`` and llm.c's ``gpt2_forward``/``gpt2_backward``. Parameters come
as one flat dict, name -> array (weights stored (out, in)). Which forward/backward pair runs for
each layer is a :class:`Kernels` record: the reference pairs of ``layers.py`` by default, or a
backend's fused kernels that must equal them. No threads, no random generators (dropout takes a
function that returns uniform coins), no I/O, no input checks: ``arraygpt.nn.model.GPT`` does those.

Not here: parameter storage and initialization, the thread runner, checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from arraygpt.nn import layers, quant
from arraygpt.xp import Array, namespace

if TYPE_CHECKING:
    from arraygpt.config import GPTConfig

Pair = tuple[Callable[..., Any], Callable[..., Any]]  # (forward, backward)
Coins = Callable[[tuple[int, ...]], Array]  # shape -> uniform [0, 1) numbers, for dropout


def layer_by_layer(
    params: Mapping[str, Array], config: GPTConfig, x: Array, kv_cache: KVCache, rope: Any, kernels: Kernels
) -> None:
    """The reference of :attr:`Kernels.decode`: no fused step (None), so :func:`gpt_forward` runs
    the blocks' layers one by one."""
    return None


def no_backward(*args: Any) -> Any:
    """The backward of a forward that keeps nothing to differentiate (a decode step)."""
    raise RuntimeError("a decode step has no backward: generation with a KV cache keeps no activations")


class Kernels(NamedTuple):
    """The forward/backward pair the core calls for each kind of layer. A kernel takes the
    reference's arguments, returns its outputs, and its backward accepts its own forward's cache.

    ``decode`` runs every block at once, for one new token with a KV cache (batch 1, no dropout,
    no LoRA): ``decode(params, config, x (1, 1, C), kv_cache, rope, kernels)`` returns the last
    block's output with the token's keys and values stored in ``kv_cache`` (``KVCache.buffers``),
    or None where it does not take the model (then the layers run one by one)."""

    norm: Pair
    linear: Pair
    attention: Pair
    activation: Pair
    crossentropy: Pair
    rope: Pair = (layers.rope_forward, layers.rope_backward)
    swiglu: Pair = (layers.swiglu_forward, layers.swiglu_backward)
    quantized_linear: Pair = (quant.quantized_linear_pair_forward, quant.quantized_linear_backward)
    decode: Pair = (layer_by_layer, no_backward)


def reference_kernels(config: GPTConfig) -> Kernels:
    """The pairs of ``layers.py`` for this config: the definition every kernel must equal."""
    return Kernels(
        norm=layers.NORMS[config.norm],
        linear=(layers.linear_forward, layers.linear_backward),
        attention=(layers.attention_forward, layers.attention_backward),
        activation=layers.ACTIVATIONS[config.activation],
        crossentropy=(layers.crossentropy_forward, layers.crossentropy_backward),
        rope=(layers.rope_forward, layers.rope_backward),
        swiglu=(layers.swiglu_forward, layers.swiglu_backward),
        quantized_linear=(quant.quantized_linear_pair_forward, quant.quantized_linear_backward),
    )


def _linear_forward(kernels: Kernels) -> Callable[..., Any]:
    """The linear forward for a weight: ``kernels.quantized_linear``'s for a
    quantized weight (``arraygpt.nn.quant``: GGUF blocks, inference only), else ``kernels.linear``'s."""
    linear, quantized = kernels.linear[0], kernels.quantized_linear[0]

    def forward(x: Array, w: Any, b: Array | None = None) -> tuple[Array, Any]:
        return (quantized if quant.is_quantized(w) else linear)(x, w, b)

    return forward


# ----------------------------------------------------------------------------------------------
# the KV cache of generation


class KVCache:
    """Keys and values of past positions, per layer, so that each new token costs one position's
    work. Per layer, buffers of (B, capacity, Dkv) hold the keys and values (Dkv = n_kv_head *
    head_dim: grouped-query attention stores only the key/value heads, so memory is proportional
    to n_kv_head). They are allocated on first use and filled left to right; the capacity starts
    at min(block_size, 256) positions and doubles as needed up to block_size, so a model with a
    long context (Llama's 131072) does not reserve it all for a short generation.

    With RoPE the stored keys are already rotated, at positions 0 .. length-1 of the cache."""

    _START = 256  # positions of a fresh buffer (at most block_size)

    def __init__(self, config: GPTConfig):
        self.block_size = config.block_size
        self.keys: list[Array | None] = [None] * config.n_layer
        self.values: list[Array | None] = [None] * config.n_layer
        self.length = 0  # positions stored so far

    def append(self, layer: int, k: Array, v: Array) -> tuple[Array, Array]:
        """Store k, v (B, T, Dkv) after the past positions; return all keys and values (B, length+T, Dkv)."""
        keys, values = self.buffers(layer, k)
        end = self.length + k.shape[1]
        keys[:, self.length : end, :] = k
        values[:, self.length : end, :] = v
        return keys[:, :end, :], values[:, :end, :]

    def buffers(self, layer: int, k: Array) -> tuple[Array, Array]:
        """The layer's key and value buffers (B, capacity, Dkv), grown to hold k's T positions
        (B, T, Dkv) after the past ones; positions from ``length`` on are free to write."""
        xp = namespace(k)
        B, T, D = k.shape
        end = self.length + T
        keys, values = self.keys[layer], self.values[layer]
        if keys is not None and keys.shape[0] != B:
            raise ValueError(f"KV cache holds a batch of {keys.shape[0]}, got a batch of {B}")
        if keys is None or keys.shape[1] < end:
            old = 0 if keys is None else keys.shape[1]
            capacity = max(end, min(self.block_size, max(self._START, 2 * old)))
            grown_k = xp.zeros((B, capacity, D), dtype=k.dtype, device=k.device)
            grown_v = xp.zeros((B, capacity, D), dtype=k.dtype, device=k.device)
            if keys is not None and self.length:
                grown_k[:, : self.length, :] = keys[:, : self.length, :]
                grown_v[:, : self.length, :] = values[:, : self.length, :]
            self.keys[layer], self.values[layer] = keys, values = grown_k, grown_v
        return keys, values

    def reset(self) -> None:
        """Forget every stored position; the buffers are kept for reuse."""
        self.length = 0

    def advance(self, T: int) -> None:
        """Mark T more positions as stored (called once per forward, after every layer appended)."""
        self.length += T


# ----------------------------------------------------------------------------------------------
# the caches: one named record per block and one for the whole forward


class BlockCache(NamedTuple):
    norm1: Any  # the norm's cache (layers.NormCache for the reference)
    qkv: Any  # the fused query/key/value projection's linear cache
    attn: Any  # layers.AttentionCache for the reference: .probs are the attention patterns
    attn_out: Any  # the output projection attn_wo
    attn_drop: Array | None  # residual dropout mask after attention
    norm2: Any
    fc1: Any  # mlp_fc1's linear cache; SwiGLU: the fused gate/up projection's
    act: Any  # the activation's cache; SwiGLU: layers.SwiGLUCache
    fc2: Any  # mlp_fc2's linear cache; SwiGLU: mlp_down's
    mlp_drop: Array | None
    rope_q: Any = None  # the rotary embedding's caches of the queries and keys (RoPE only)
    rope_k: Any = None
    lora: dict[str, layers.LoRACache] | None = None  # LoRA only: adapted weight's short name -> its cache


class GPTCache(NamedTuple):
    encoder: layers.EncoderCache
    emb_drop: Array | None
    norm_emb: Any | None
    blocks: list[BlockCache]  # empty for a forward with a KV cache (generation keeps no activations)
    normf: Any | None
    unembed: Any  # the unembedding's linear cache
    loss: Any | None  # the cross-entropy's cache (None without targets)


def _dropout(x: Array, p: float, coins: Coins | None) -> tuple[Array, Array | None]:
    if p == 0.0:
        return x, None
    return layers.dropout_forward(x, p, coins(tuple(x.shape)))


def _fused_weight(
    params: Mapping[str, Array], prefix: str, fused: str, parts: tuple[str, ...], suffix: str
) -> Array | None:
    """The weights ``parts`` stacked along their output axis (or their biases, ``suffix`` "_b"):
    the caller's stored fused buffer ``prefix + fused + suffix`` when it keeps one (GPT does),
    else stacked here."""
    buffer = params.get(prefix + fused + suffix)
    if buffer is not None:
        return buffer
    arrays = [params.get(prefix + part + suffix) for part in parts]
    return None if arrays[0] is None else namespace(arrays[0]).concat(arrays)


QKV = ("attn_wq", "attn_wk", "attn_wv")  # stacked as the fused buffer attn_wqkv: (D + 2 Dkv, C)
GATE_UP = ("mlp_gate", "mlp_up")  # stacked as the fused buffer mlp_gate_up: (2H, C)


def _qkv_weight(params: Mapping[str, Array], prefix: str, suffix: str) -> Array | None:
    """The stacked (D + 2 Dkv, C) query/key/value weight (or (D + 2 Dkv,) bias)."""
    return _fused_weight(params, prefix, "attn_wqkv", QKV, suffix)


def _add_lora(
    params: Mapping[str, Array],
    prefix: str,
    parts: tuple[str, ...],
    widths: tuple[int, ...],
    x: Array,
    out: Array,
    scale: float | None,
    caches: dict[str, Any],
) -> Array:
    """LoRA: add each adapted part's ``scale (x A^T) B^T`` to its slice of ``out`` (a linear over x
    whose output stacks ``parts`` of ``widths`` columns; the adapters ``<name>.lora_a``/``.lora_b``)."""
    start = 0
    for part, width in zip(parts, widths):
        a = None if scale is None else params.get(prefix + part + ".lora_a")
        if a is not None:
            delta, caches[part] = layers.lora_forward(x, a, params[prefix + part + ".lora_b"], scale)
            out[..., start : start + width] += delta  # (B, T, width)
        start += width
    return out


def rope_tables(config: GPTConfig, xp: Any, T: int, past: int, dtype: Any, device: Any) -> tuple[Array, Array]:
    """cos, sin (T, head_dim) of positions past .. past + T - 1 (``layers.rope_tables``)."""
    inv_freq = layers.rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    return layers.rope_tables(xp, T, past, inv_freq, dtype, device)


# ----------------------------------------------------------------------------------------------
# forward


def block_forward(
    params: Mapping[str, Array],
    config: GPTConfig,
    i: int,
    x: Array,
    kernels: Kernels,
    *,
    dropout: float = 0.0,
    coins: Coins | None = None,
    kv_cache: KVCache | None = None,
    rope: tuple[Array, Array] | None = None,
    lora_scale: float | None = None,
) -> tuple[Array, BlockCache]:
    """Block ``i``: x (B, T, C) -> x (B, T, C) and its cache. ``rope``: the (cos, sin) tables of
    this forward's positions (computed here when None and the config uses RoPE). ``lora_scale``:
    alpha / r of the LoRA adapters in ``params`` (None: no adapters)."""
    p, name, D, Dkv = params, f"layer{i}.", config.attn_dim, config.kv_dim
    lora: dict[str, Any] = {}
    norm_forward, linear_forward = kernels.norm[0], _linear_forward(kernels)
    h, norm1 = norm_forward(x, p.get(name + "norm1"), p.get(name + "norm1_b"), config.norm_eps)
    qkv, qkv_lin = linear_forward(h, _qkv_weight(p, name, ""), _qkv_weight(p, name, "_b"))  # (B, T, D + 2Dkv)
    qkv = _add_lora(p, name, QKV, (D, Dkv, Dkv), h, qkv, lora_scale, lora)
    q, k, v = qkv[..., :D], qkv[..., D : D + Dkv], qkv[..., D + Dkv :]  # (B, T, D), (B, T, Dkv) x2
    rope_q = rope_k = None
    if config.position == "rope":
        if rope is None:
            past = 0 if kv_cache is None else kv_cache.length
            rope = rope_tables(config, namespace(x), x.shape[1], past, x.dtype, x.device)
        q, rope_q = kernels.rope[0](q, *rope)  # (B, T, D)
        k, rope_k = kernels.rope[0](k, *rope)  # (B, T, Dkv)
    if kv_cache is not None:
        k, v = kv_cache.append(i, k, v)  # (B, Tk, Dkv): the past positions and these
    attn_coins = None
    if dropout > 0.0:
        B, T = q.shape[:2]
        attn_coins = coins((B, config.n_head, T, k.shape[1]))
    if config.n_kv_head == config.n_head:  # the plain call, which every attention kernel takes
        y, attn = kernels.attention[0](q, k, v, config.n_head, dropout, attn_coins)  # (B, T, D)
    else:
        y, attn = kernels.attention[0](q, k, v, config.n_head, dropout, attn_coins, n_kv_head=config.n_kv_head)
    y_in = y
    y, attn_out = linear_forward(y, p[name + "attn_wo"], p.get(name + "attn_wo_b"))  # (B, T, C)
    y = _add_lora(p, name, ("attn_wo",), (config.n_embd,), y_in, y, lora_scale, lora)
    y, attn_drop = _dropout(y, dropout, coins)
    x, _ = layers.residual_forward(x, y)
    h, norm2 = norm_forward(x, p.get(name + "norm2"), p.get(name + "norm2_b"), config.norm_eps)
    if config.mlp == "swiglu":
        H = config.mlp_hidden
        gate_up = _fused_weight(p, name, "mlp_gate_up", GATE_UP, "")
        g, fc1 = linear_forward(h, gate_up, _fused_weight(p, name, "mlp_gate_up", GATE_UP, "_b"))  # (B, T, 2H)
        g = _add_lora(p, name, GATE_UP, (H, H), h, g, lora_scale, lora)
        g, act = kernels.swiglu[0](g[..., :H], g[..., H:])  # (B, T, H)
        h, fc2 = linear_forward(g, p[name + "mlp_down"], p.get(name + "mlp_down_b"))  # (B, T, C)
        h = _add_lora(p, name, ("mlp_down",), (config.n_embd,), g, h, lora_scale, lora)
    else:
        g, fc1 = linear_forward(h, p[name + "mlp_fc1"], p.get(name + "mlp_fc1_b"))  # (B, T, H)
        g = _add_lora(p, name, ("mlp_fc1",), (config.mlp_hidden,), h, g, lora_scale, lora)
        g, act = kernels.activation[0](g)
        h, fc2 = linear_forward(g, p[name + "mlp_fc2"], p.get(name + "mlp_fc2_b"))  # (B, T, C)
        h = _add_lora(p, name, ("mlp_fc2",), (config.n_embd,), g, h, lora_scale, lora)
    h, mlp_drop = _dropout(h, dropout, coins)
    x, _ = layers.residual_forward(x, h)
    return x, BlockCache(
        norm1, qkv_lin, attn, attn_out, attn_drop, norm2, fc1, act, fc2, mlp_drop, rope_q, rope_k, lora or None
    )


def embed(
    params: Mapping[str, Array],
    config: GPTConfig,
    idx: Array,
    kernels: Kernels,
    *,
    past: int = 0,
    dropout: float = 0.0,
    coins: Coins | None = None,
) -> tuple[Array, tuple[Any, Any, Any]]:
    """The residual stream's start: idx (B, T) -> x (B, T, C), positions offset by ``past``
    (no position table with RoPE: attention rotates q and k instead)."""
    wpe = params["wpe"] if config.position == "learned" else None
    wte = params["wte"]
    if isinstance(wte, quant.QuantizedWeight):  # decode only the rows looked up: a table of B*T rows
        xp, (B, T) = namespace(idx), idx.shape
        wte = quant.embedding_rows(wte, xp.reshape(idx, (B * T,)))  # (B*T, C)
        idx = xp.reshape(xp.arange(B * T, device=idx.device), (B, T))  # (the cache's idx: rows of that table)
    x, encoder = layers.encoder_forward(idx, wte, wpe, past)  # (B, T, C)
    x, emb_drop = _dropout(x, dropout, coins)
    norm_emb = None
    if config.norm_emb:
        x, norm_emb = kernels.norm[0](x, params.get("norm_emb"), params.get("norm_emb_b"), config.norm_eps)
    return x, (encoder, emb_drop, norm_emb)


def unembed(params: Mapping[str, Array], config: GPTConfig, x: Array, kernels: Kernels) -> tuple[Array, Any, Any]:
    """The residual stream's end: x (B, T, C) -> [normf] -> logits (B, T, V), and both caches."""
    normf = None
    if config.norm_final:
        x, normf = kernels.norm[0](x, params.get("normf"), params.get("normf_b"), config.norm_eps)
    w = params["wte"] if config.tie_embeddings else params["lm_head"]
    logits, unembed_cache = _linear_forward(kernels)(x, w)  # (B, T, V)
    return logits, normf, unembed_cache


def gpt_forward(
    params: Mapping[str, Array],
    config: GPTConfig,
    idx: Array,
    targets: Array | None = None,
    *,
    kernels: Kernels | None = None,
    dropout: float = 0.0,
    coins: Coins | None = None,
    kv_cache: KVCache | None = None,
    last_only: bool = False,
    reduction: str = "mean",
    lora_scale: float | None = None,
) -> tuple[Array, Array | None, GPTCache]:
    """Logits, the loss and the caches of one forward pass.

    Args:
        params: name -> array (backend arrays of one dtype).
        config: the GPTConfig.
        idx: (B, T) token ids on the backend; targets: (B, T), -1 where ignored, or None.
        kernels: the layer pairs to run (default :func:`reference_kernels`).
        dropout, coins: dropout probability, and the function that draws its uniform coins.
        kv_cache: keys and values of earlier positions (generation); idx holds the next ones.
        last_only: unembed only the last position: logits (B, 1, V).
        reduction: ``mean`` or ``sum`` of the per-position losses.
        lora_scale: alpha / r of the LoRA adapters in ``params`` (``layer{i}.<weight>.lora_a``
            (r, in) and ``.lora_b`` (out, r)); None: no adapters.

    Returns:
        ``(logits (B, T, V), loss (0-d array) or None, GPTCache)``.
    """
    kernels = kernels or reference_kernels(config)
    B, T = idx.shape
    past = 0 if kv_cache is None else kv_cache.length
    x, (encoder, emb_drop, norm_emb) = embed(params, config, idx, kernels, past=past, dropout=dropout, coins=coins)
    rope = rope_tables(config, namespace(x), T, past, x.dtype, x.device) if config.position == "rope" else None
    # one token at batch 1 with a KV cache: the kernels' decode step may run every block (None: it did not)
    one_token = kv_cache is not None and B == 1 and T == 1 and dropout == 0.0 and lora_scale is None
    fused = kernels.decode[0](params, config, x, kv_cache, rope, kernels) if one_token else None
    blocks = []
    for i in range(config.n_layer if fused is None else 0):
        x, block = block_forward(
            params,
            config,
            i,
            x,
            kernels,
            dropout=dropout,
            coins=coins,
            kv_cache=kv_cache,
            rope=rope,
            lora_scale=lora_scale,
        )
        if kv_cache is None:  # generation (a KV cache) has no backward: each block's activations go now
            blocks.append(block)
        del block  # not alive through the next block (a 256-token prompt: 13 MB of a 135M model's peak)
    x = x if fused is None else fused
    if kv_cache is not None:
        kv_cache.advance(T)
    if last_only:
        x = x[:, -1:, :]  # (B, 1, C)
        T = 1
    logits, normf, unembed_cache = unembed(params, config, x, kernels)  # (B, T, V)
    loss, loss_cache = None, None
    if targets is not None:
        xp = namespace(logits)
        loss, loss_cache = kernels.crossentropy[0](
            xp.reshape(logits, (B * T, config.vocab_size)), xp.reshape(targets, (B * T,)), reduction=reduction
        )
    return logits, loss, GPTCache(encoder, emb_drop, norm_emb, blocks, normf, unembed_cache, loss_cache)


def residual_stream(
    params: Mapping[str, Array],
    config: GPTConfig,
    idx: Array,
    kernels: Kernels | None = None,
    lora_scale: float | None = None,
) -> list[Array]:
    """The residual stream (B, T, C) after the embedding and after each block (n_layer + 1
    arrays), for looking inside: ``unembed`` of entry i is the logit lens after block i."""
    kernels = kernels or reference_kernels(config)
    x, _ = embed(params, config, idx, kernels)
    stream = [x]
    rope = rope_tables(config, namespace(x), x.shape[1], 0, x.dtype, x.device) if config.position == "rope" else None
    for i in range(config.n_layer):
        x, _ = block_forward(params, config, i, x, kernels, rope=rope, lora_scale=lora_scale)
        stream.append(x)
    return stream


def valid_positions(cache: GPTCache) -> int:
    """How many positions of a forward with targets have a target (not -1)."""
    return int(float(namespace(cache.loss.weights).sum(cache.loss.weights)))


# ----------------------------------------------------------------------------------------------
# backward


def gpt_backward(
    dloss: float, cache: GPTCache, config: GPTConfig, *, kernels: Kernels | None = None, frozen: bool = False
) -> dict[str, Array]:
    """Gradients of ``dloss`` times the forward's loss, name -> array (the parameter names).

    ``dloss`` is 1.0 for the loss itself; a caller that splits a batch and sums the chunks' losses
    passes 1 / (valid positions of the whole batch). ``frozen``: LoRA training, the model's own
    parameters are frozen: only the adapters' gradients are computed and returned (a frozen
    linear computes dx alone, and the embeddings' backward is skipped).
    """
    kernels = kernels or reference_kernels(config)
    if cache.loss is None:
        raise ValueError("gpt_backward needs the cache of a forward with targets")
    xp = namespace(cache.loss.probs)
    grads: dict[str, Array] = {}
    B, T = cache.encoder.idx.shape
    if cache.unembed.x.shape[1] != T:
        raise ValueError("gpt_backward needs a forward of every position (last_only=False)")

    dlogits = kernels.crossentropy[1](dloss, cache.loss)  # (B*T, V)
    dlogits = xp.reshape(dlogits, (B, T, config.vocab_size))  # (B, T, V)
    if frozen:
        dx = _frozen_linear_backward(kernels, dlogits, cache.unembed)  # (B, T, C)
    else:
        dx, dw_unembed, _ = kernels.linear[1](dlogits, cache.unembed)  # (B, T, C)
    if cache.normf is not None:
        dx = _norm_backward(kernels, dx, cache.normf, "normf", grads)
    for i in reversed(range(config.n_layer)):
        dx = block_backward(config, i, dx, cache.blocks[i], kernels, grads, frozen=frozen)
    if frozen:  # nothing below the blocks trains
        return {name: g for name, g in grads.items() if name.endswith((".lora_a", ".lora_b"))}
    if cache.norm_emb is not None:
        dx = _norm_backward(kernels, dx, cache.norm_emb, "norm_emb", grads)
    if cache.emb_drop is not None:
        dx = layers.dropout_backward(dx, cache.emb_drop)
    dwte, dwpe = layers.encoder_backward(dx, cache.encoder)
    if dwpe is not None:
        grads["wpe"] = dwpe
    if config.tie_embeddings:
        dwte += dw_unembed  # wte is used twice: as the embedding and as the unembedding
    else:
        grads["lm_head"] = dw_unembed
    grads["wte"] = dwte
    return grads


def block_backward(
    config: GPTConfig,
    i: int,
    dx: Array,
    cache: BlockCache,
    kernels: Kernels,
    grads: dict[str, Array],
    *,
    frozen: bool = False,
) -> Array:
    """Block ``i`` in reverse: dx (B, T, C) of its output -> dx of its input; fills ``grads``
    (with ``frozen``, the LoRA adapters' gradients only; see :func:`gpt_backward`)."""
    name = f"layer{i}."
    xp = namespace(dx)
    lin = _LinearBackward(kernels, grads, name, cache.lora or {}, frozen)
    dx_skip, dh = layers.residual_backward(dx, None)
    if cache.mlp_drop is not None:
        dh = layers.dropout_backward(dh, cache.mlp_drop)
    if config.mlp == "swiglu":
        # x = x + dropout(down(silu(gate(h)) * up(h))), h = norm2(x); gate and up are one fused linear
        dh = lin(dh, cache.fc2, ("mlp_down",), (config.n_embd,))
        dgate, dup = kernels.swiglu[1](dh, cache.act)  # (B, T, H) each
        dh = lin(xp.concat([dgate, dup], axis=-1), cache.fc1, GATE_UP, (config.mlp_hidden,) * 2)
    else:
        # x = x + dropout(fc2(act(fc1(norm2(x)))))
        dh = lin(dh, cache.fc2, ("mlp_fc2",), (config.n_embd,))
        dh = kernels.activation[1](dh, cache.act)
        dh = lin(dh, cache.fc1, ("mlp_fc1",), (config.mlp_hidden,))
    dx = _norm_backward(kernels, dh, cache.norm2, name + "norm2", grads)
    dx += dx_skip  # the residual's two gradients meet
    # x = x + dropout(wo(attention(rope(q), rope(k), v))), q, k, v = qkv(norm1(x))
    dx_skip, dy = layers.residual_backward(dx, None)
    if cache.attn_drop is not None:
        dy = layers.dropout_backward(dy, cache.attn_drop)
    dy = lin(dy, cache.attn_out, ("attn_wo",), (config.n_embd,))
    dq, dk, dv = kernels.attention[1](dy, cache.attn)  # (B, T, D), (B, T, Dkv) x2
    if cache.rope_q is not None:
        dq = kernels.rope[1](dq, cache.rope_q)
        dk = kernels.rope[1](dk, cache.rope_k)
    D, Dkv = config.attn_dim, config.kv_dim
    dh = lin(xp.concat([dq, dk, dv], axis=-1), cache.qkv, QKV, (D, Dkv, Dkv))
    dx = _norm_backward(kernels, dh, cache.norm1, name + "norm1", grads)
    dx += dx_skip
    return dx


def _split_linear_backward(
    kernels: Kernels,
    dout: Array,
    cache: Any,
    prefix: str,
    parts: tuple[str, ...],
    widths: tuple[int, ...],
    grads: dict[str, Array],
) -> Array:
    """The backward of a fused linear whose output stacks ``parts`` of ``widths`` rows: the
    gradients of each part's weight (and bias) are row slices of the fused one."""
    dx, dw, db = kernels.linear[1](dout, cache)
    start = 0
    for part, width in zip(parts, widths):
        grads[prefix + part] = dw[start : start + width, :]
        if db is not None:
            grads[prefix + part + "_b"] = db[start : start + width]
        start += width
    return dx


class _LinearBackward(NamedTuple):
    """One block's linear backwards: a plain or fused linear (:func:`_split_linear_backward`), or
    with ``frozen`` its dx alone; plus each LoRA adapter's backward on its slice of dout."""

    kernels: Kernels
    grads: dict[str, Array]
    prefix: str
    lora: Mapping[str, Any]
    frozen: bool

    def __call__(self, dout: Array, cache: Any, parts: tuple[str, ...], widths: tuple[int, ...]) -> Array:
        if self.frozen:
            dx = _frozen_linear_backward(self.kernels, dout, cache)
        else:
            dx = _split_linear_backward(self.kernels, dout, cache, self.prefix, parts, widths, self.grads)
        start = 0
        for part, width in zip(parts, widths):
            if part in self.lora:  # out[..., slice] += s (x A^T) B^T
                name = self.prefix + part
                dx_lora, self.grads[name + ".lora_a"], self.grads[name + ".lora_b"] = layers.lora_backward(
                    dout[..., start : start + width], self.lora[part]
                )
                dx += dx_lora
            start += width
        return dx


def _frozen_linear_backward(kernels: Kernels, dout: Array, cache: Any) -> Array:
    """dx of a linear whose weight does not train: dout @ w from the reference's cache, else the
    kernel's whole backward."""
    if isinstance(cache, layers.LinearCache):
        return layers.linear_input_backward(dout, cache)
    return kernels.linear[1](dout, cache)[0]


def _norm_backward(kernels: Kernels, dout: Array, cache: Any, name: str, grads: dict[str, Array]) -> Array:
    dx, dw, db = kernels.norm[1](dout, cache)
    if dw is not None:
        grads[name] = dw
    if db is not None:
        grads[name + "_b"] = db
    return dx
