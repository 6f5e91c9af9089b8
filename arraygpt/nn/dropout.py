"""Dropout's coins on the host: the one rule that makes a training run's masks independent of how
its batch is split (threads, micro-batches, MPI ranks).

NumPy is used directly here, as for every host generator (``arraygpt.xp.host_rng``): the coins
are drawn on the host and moved to the backend, or seed a device generator per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dropout_coins", "dropout_row_seeds"]

# ----------------------------------------------------------------------------------------------
# Dropout's coins: the one rule. The coins of a training forward depend on nothing but
#   key      the caller's ``dropout_key`` (the training loop passes the run's (seed, step)), or,
#            when none is given, one number drawn from the model's dropout generator per forward;
#   site     which dropout call of the forward it is (the embedding's, then per block attention
#            probabilities, attention output, MLP output), counted in the order the core calls them;
#   row      ``first_row`` + the row's index in the batch: its index in the global batch;
#   element  its flat index within the row (n coins per row at a site).
# On the host, the coins of one site are one PCG64 stream seeded with SeedSequence([*key, site]),
# and element j of row r is its output r n + j (its top 53 or 24 bits as a float in [0, 1)), so a
# chunk of rows jumps to its first row (PCG64.advance) and draws only its own. A GPU backend
# (``device_uniform``) draws each row on the device from the row's seed, SplitMix64 of (key, site,
# row). So however a batch is split (threads, --grad-accum micro-batches, MPI ranks), every row
# draws the same mask.

_MASK64 = 2**64 - 1


def dropout_coins(key: tuple[int, ...], site: int, first_row: int, rows: int, n: int, dtype: str) -> Any:
    """The host coins (rows, n) of rows ``first_row ..`` at dropout call ``site`` of a forward keyed
    ``key`` (the rule above), float32 or float64.

    Example:
        >>> a = dropout_coins((0, 7), site=1, first_row=0, rows=4, n=3, dtype="float64")
        >>> bool((a[2:] == dropout_coins((0, 7), site=1, first_row=2, rows=2, n=3, dtype="float64")).all())
        True
    """
    stream = np.random.PCG64(np.random.SeedSequence([int(part) & _MASK64 for part in (*key, site)]))
    stream.advance(first_row * n)
    raw = stream.random_raw(rows * n)  # (rows n,) uint64
    if dtype == "float64":
        raw >>= np.uint64(11)
        coins = raw.astype(np.float64)
        coins *= 2.0**-53
    else:
        raw >>= np.uint64(40)
        coins = raw.astype(np.float32)
        coins *= np.float32(2.0**-24)
    return coins.reshape(rows, n)


def _mix64(z: Any) -> Any:
    """SplitMix64's output function on a uint64 array, in place (Steele, Lea & Flood 2014): a
    bijection of 64-bit words whose every output bit depends on every input bit."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def dropout_row_seeds(key: tuple[int, ...], site: int, first_row: int, rows: int) -> Any:
    """The 64-bit seeds (uint64, (rows,)) from which a GPU backend draws the coins of rows
    ``first_row ..`` at dropout call ``site`` of a forward keyed ``key`` (the rule above).

    Example:
        >>> a = dropout_row_seeds((0, 7), site=1, first_row=0, rows=4)
        >>> bool((a[2:] == dropout_row_seeds((0, 7), site=1, first_row=2, rows=2)).all())
        True
    """
    h = np.zeros(1, dtype=np.uint64)
    for part in (*key, site):
        h ^= np.uint64(int(part) & _MASK64)
        h = _mix64(h + np.uint64(0x9E3779B97F4A7C15))  # SplitMix64's increment
    row = np.arange(first_row, first_row + rows, dtype=np.uint64)  # (rows,)
    return _mix64(h ^ row)
