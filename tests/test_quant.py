"""The quantized reference (arraygpt.nn.quant) against the ``gguf`` library, llama.cpp's own
Python package: its quantizers make the blocks, its dequantizer is the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arraygpt.nn.quant import BLOCKS, QuantizedWeight, dequantize, quantized_linear_forward

gguf = pytest.importorskip("gguf", reason="the reference dequantizer is the gguf package: pip install gguf")
from gguf import GGMLQuantizationType, quants

TYPES = {kind: GGMLQuantizationType[kind.upper()] for kind in BLOCKS}


def _random_blocks(kind: str, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes as blocks, their float16 scales made finite (every bit pattern of the integer
    parts is a valid block; a scale of inf or nan is not a weight anyone stores)."""
    per_block, nbytes = BLOCKS[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, n_blocks, nbytes), dtype=np.uint8)
    scale_offsets = {
        "q8_0": [0],
        "q4_0": [0],
        "q5_0": [0],
        "q4_1": [0, 2],
        "q5_1": [0, 2],
        "q4_k": [0, 2],
        "q5_k": [0, 2],
        "q6_k": [208],
    }
    for offset in scale_offsets[kind]:
        scales = rng.uniform(-0.1, 0.1, size=(rows, n_blocks)).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, n_blocks, 2)
    return blocks


@pytest.mark.parametrize("kind", list(BLOCKS))
@given(rows=st.integers(1, 4), n_blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_dequantize_equals_the_gguf_library_on_random_blocks(kind, rows, n_blocks, seed):
    blocks = _random_blocks(kind, rows, n_blocks, seed)
    per_block = BLOCKS[kind][0]
    ours = dequantize(QuantizedWeight(kind, blocks, (rows, n_blocks * per_block)))
    reference = quants.dequantize(blocks.reshape(rows, -1), TYPES[kind])
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference.astype(np.float32))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_by_gguf_then_dequantized_is_close_to_the_weights(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    blocks = quants.quantize(w, TYPES[kind]).reshape(6, 2, BLOCKS[kind][1])
    back = dequantize(QuantizedWeight(kind, blocks, w.shape))
    step = np.abs(w).max() / {"q8_0": 127, "q4_0": 7, "q4_1": 7, "q5_0": 15, "q5_1": 15}[kind]
    assert np.abs(back - w).max() <= step


def test_float16_scales_decode_every_bit_pattern_like_numpy():
    import array_api_compat.numpy as xp

    from arraygpt.nn.quant import _f16

    every = np.arange(2**16, dtype=np.uint16)
    raw = every.view(np.uint8).reshape(-1, 2)
    ours = _f16(xp, raw[:, 0], raw[:, 1])
    expected = every.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours, expected)  # nan == nan in assert_array_equal


def test_the_reference_runs_on_array_api_strict():
    strict = pytest.importorskip("array_api_strict")
    blocks = _random_blocks("q4_k", 2, 1, 3)
    ours = dequantize(QuantizedWeight("q4_k", strict.asarray(blocks), (2, 256)))
    np.testing.assert_array_equal(np.asarray(ours), quants.dequantize(blocks.reshape(2, -1), TYPES["q4_k"]))


def test_quantized_linear_is_x_times_the_dequantized_weight():
    blocks = _random_blocks("q8_0", 5, 2, 1)
    w = QuantizedWeight("q8_0", blocks, (5, 64))
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    b = np.arange(5, dtype=np.float32)
    dense = quants.dequantize(blocks.reshape(5, -1), TYPES["q8_0"])
    np.testing.assert_allclose(quantized_linear_forward(x, w, b), x @ dense.T + b, rtol=1e-6, atol=1e-6)


def test_a_weight_whose_blocks_do_not_fit_its_shape_is_refused():
    with pytest.raises(ValueError, match=r"q4_0 weight of shape \(2, 48\).*multiple of 32"):
        QuantizedWeight("q4_0", np.zeros((2, 1, 18), np.uint8), (2, 48))
    with pytest.raises(ValueError, match="unknown quantization 'q3_k'"):
        QuantizedWeight("q3_k", np.zeros((2, 1, 18), np.uint8), (2, 32))


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_quantize_is_the_gguf_quantizer(kind):
    from arraygpt.nn.quant import quantize

    w = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    try:
        expected = quants.quantize(w, TYPES[kind])
    except NotImplementedError:  # gguf has no Python quantizer for some K-quants
        pytest.skip(f"gguf has no Python quantizer for {kind}")
    q = quantize(w, kind)
    assert q.shape == (3, 256)
    np.testing.assert_array_equal(q.blocks.reshape(3, -1), expected)
