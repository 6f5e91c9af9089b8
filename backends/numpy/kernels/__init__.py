"""The numpy backend's kernels, compiled with numba: one family per module, each numba source
beside its Python wrapper, each a forward/backward pair equal to its reference in
``arraygpt.nn.layers`` (the optimizer update: to ``plugins.optimizers.Adam.update``'s last bit).

======================  ============================================  =====================
module                  kernels                                       replaces
======================  ============================================  =====================
``norm.py``             numba_layernorm, numba_rmsnorm                the norm pairs
``linear.py``           numba_linear_rows (decoding's few rows; more  the linear pair
                        rows: MKL's product where ``_mkl.py`` chose
                        it)
``attention.py``        numba_causal_attention (also GQA, KV cache)   the attention pair
``gelu.py``             numba_gelu_tanh                               gelu_tanh pair
``crossentropy.py``     numba_crossentropy                            the crossentropy pair
``rope.py``             numba_rope                                    the rope pair
``swiglu.py``           numba_swiglu                                  the swiglu pair
``adam.py``             numba_adam (an UpdateSpec)                    Adam's/AdamW's update
``quant.py``            numba_quantized_linear, ..._int8 (GGUF        quantized_linear
                        blocks; int8 activations)
``decode.py``           numba_decode_step (every block of one token   decode (the blocks'
                        in one call)                                  layers one by one)
======================  ============================================  =====================

Why they pay: NumPy runs each elementwise operation as its own pass over memory on one core; a
kernel here makes one pass (GELU, SwiGLU, RoPE, the norms' rows) or computes only the causal half
of attention and fuses its masked softmax. Each kernel is serial and releases the GIL: the model
already splits a batch across threads (``arraygpt.nn.runner``), so the chunks' kernels run side
by side. A kernel takes what it knows (NumPy arrays of float32/float64 in the layouts its loops
read) and hands everything else to the reference; its backward recognizes its own forward's
cache by type (a subclass of the reference's NamedTuple) and calls the reference's backward for a
reference cache.

Importing these modules imports no numba: a spec's ``load`` imports it when a model first selects
the kernel, and each source is compiled on its first call (``_jit.py``). docs/kernels.md gives the
measurements behind the choices; tests/test_kernels.py checks each family against the reference.

Not here: the math's definition (``arraygpt.nn.layers``), choosing kernels (``arraygpt.nn.kernels``).
"""

from __future__ import annotations

from arraygpt.backends.numpy.kernels import (
    adam,
    attention,
    crossentropy,
    decode,
    gelu,
    linear,
    norm,
    quant,
    rope,
    swiglu,
)

KERNELS = {
    **gelu.SPECS,
    **swiglu.SPECS,
    **rope.SPECS,
    **norm.SPECS,
    **crossentropy.SPECS,
    **linear.SPECS,
    **attention.SPECS,
    **adam.SPECS,
    **quant.SPECS,
    **decode.SPECS,
}
