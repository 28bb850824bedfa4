"""Seed isolation: run code under a run's seed, then put the process's RNG state back.

A run's seed (DESIGN.md, "Determinism") is applied to Python's :mod:`random` and to NumPy's
global (legacy) state, and handed to the agent as ``seed`` and as a fresh
``numpy.random.Generator(PCG64(seed))``. Afterwards both global states are restored, so a run
cannot change what the next run, or the embedding program, draws.

Threads share global RNG state. Two runs executing at the same time in one process (a thread
pool, Celery's ``threads``/``gevent``/``eventlet`` pools) seed and draw from the same
``random`` and ``np.random`` objects, so only agents that draw from the handed ``rng`` or
``seed`` stay deterministic there. Process pools (studyq's local process pool, Celery's
``prefork`` and ``solo`` pools) run one run per process at a time, which keeps agents that use
the global RNGs deterministic too.

Restoring NumPy's global state the obvious way (``get_state`` / ``set_state``) costs ~150 us,
more than the rest of a no-op run. So the MT19937 state is saved as its 2,500 raw bytes
through NumPy's documented ctypes interface, after checking once that the raw layout matches
``bit_generator.state``; whenever the fast path cannot prove it is exact, the full
``get_state`` / ``set_state`` path is used instead.
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.random.mtrand import get_bit_generator, set_bit_generator

__all__ = ["global_seed", "make_rng", "seeded"]

# mt19937_state is {uint32_t key[624]; int pos;}: 2,500 bytes, no padding.
_MT_WORDS = 624
_MT_STATE_BYTES = _MT_WORDS * 4 + 4


def make_rng(seed: int) -> np.random.Generator:
    """A fresh generator for one run; independent of every global RNG."""
    return np.random.Generator(np.random.PCG64(seed))


@contextmanager
def global_seed(seed: int) -> Iterator[None]:
    """Seed ``random`` and ``np.random`` with ``seed``; restore both on exit, even on errors."""
    python_state = random.getstate()
    numpy_saved = _save_numpy_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        yield
    finally:
        random.setstate(python_state)
        _restore_numpy_state(numpy_saved)


@contextmanager
def seeded(seed: int) -> Iterator[np.random.Generator]:
    """:func:`global_seed`, yielding a fresh ``Generator(PCG64(seed))`` for the run."""
    with global_seed(seed):
        yield make_rng(seed)


def _probe_raw_layout() -> bool:
    """Whether MT19937's raw state bytes are ``key[624]`` then ``pos``, as the fast path needs."""
    try:
        probe = np.random.MT19937(20240601)
        raw = ctypes.string_at(probe.ctypes.state_address, _MT_STATE_BYTES)
        words = np.frombuffer(raw, dtype=np.uint32)
        state = probe.state["state"]
        return bool(
            np.array_equal(words[:_MT_WORDS], np.asarray(state["key"], dtype=np.uint32))
            and int(words[_MT_WORDS]) == int(state["pos"])
        )
    except Exception:  # any surprise in NumPy's internals: use the slow, exact path
        return False


_RAW_LAYOUT_OK = _probe_raw_layout()

# The raw MT19937 state this module last restored while the legacy gaussian cache was empty.
# If the global state still has exactly these bytes on entry, nobody drew from np.random since
# (every draw that could fill the cache advances the state), so the cache is still empty and
# the raw bytes are the whole state. The one way around it, ``np.random.set_state`` back to an
# old snapshot taken at these very bytes with a gaussian cached, loses that cached value.
# Threads racing here only ever fall back to the slow path.
_last_clean_raw: bytes | None = None


def _save_numpy_state() -> tuple[np.random.BitGenerator, bytes | None, Any]:
    """Cheap raw snapshot when provably complete, else NumPy's full legacy state."""
    bit_generator = get_bit_generator()
    if _RAW_LAYOUT_OK and type(bit_generator) is np.random.MT19937:
        with bit_generator.lock:  # NumPy draws hold this lock: never copy a half-drawn state
            raw = ctypes.string_at(bit_generator.ctypes.state_address, _MT_STATE_BYTES)
        if raw == _last_clean_raw:
            return bit_generator, raw, None
    return bit_generator, None, np.random.get_state()


def _restore_numpy_state(saved: tuple[np.random.BitGenerator, bytes | None, Any]) -> None:
    """Put back what :func:`_save_numpy_state` captured (and the generator, if a run swapped it)."""
    global _last_clean_raw
    bit_generator, raw, full_state = saved
    if get_bit_generator() is not bit_generator:
        set_bit_generator(bit_generator)
    if raw is not None:
        np.random.seed(0)  # empties the legacy gaussian cache; the bytes below set the rest
        with bit_generator.lock:
            ctypes.memmove(bit_generator.ctypes.state_address, raw, _MT_STATE_BYTES)
        return
    np.random.set_state(full_state)
    gauss_cache_empty = isinstance(full_state, tuple) and int(full_state[3]) == 0
    if _RAW_LAYOUT_OK and gauss_cache_empty and type(bit_generator) is np.random.MT19937:
        with bit_generator.lock:
            _last_clean_raw = ctypes.string_at(bit_generator.ctypes.state_address, _MT_STATE_BYTES)
    else:
        _last_clean_raw = None
