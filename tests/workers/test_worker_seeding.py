"""Seed isolation: a run sees its seed in every RNG, and leaves the process's RNGs as it found
them, whatever the run did and whichever save/restore path was taken."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from workers import seeding
from workers.seeding import global_seed, make_rng, seeded


def _numpy_state() -> tuple[Any, ...]:
    state: Any = np.random.get_state()
    name, key, pos, has_gauss, gauss = state
    return name, key.tolist(), pos, has_gauss, gauss


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(np.random.standard_normal())


def test_seeded_applies_the_seed_to_every_rng() -> None:
    with seeded(42) as rng:
        first = (*_draws(), float(rng.random()))
    with seeded(42) as rng:
        second = (*_draws(), float(rng.random()))
    random.seed(42)
    np.random.seed(42)
    expected_globals = _draws()
    expected_rng = float(np.random.Generator(np.random.PCG64(42)).random())
    assert first == second == (*expected_globals, expected_rng)


def test_make_rng_is_a_fresh_pcg64_generator() -> None:
    assert make_rng(7).random(3).tolist() == np.random.default_rng(7).random(3).tolist()
    assert isinstance(make_rng(7).bit_generator, np.random.PCG64)


@pytest.mark.parametrize("outer_gauss_cached", [False, True])
def test_global_states_are_restored(outer_gauss_cached: bool) -> None:
    # Given an embedding program with its own RNG history (optionally a cached legacy gaussian)
    random.seed(1)
    np.random.seed(1)
    if outer_gauss_cached:
        np.random.standard_normal()
    python_before, numpy_before = random.getstate(), _numpy_state()
    # When runs draw from both global RNGs, several times (slow path first, then fast path)
    for seed in (3, 4, 5):
        with global_seed(seed):
            _draws()
        # Then the program's state is untouched after each run
        assert random.getstate() == python_before
        assert _numpy_state() == numpy_before


def test_state_is_restored_when_the_run_raises() -> None:
    np.random.seed(9)
    random.seed(9)
    python_before, numpy_before = random.getstate(), _numpy_state()
    with pytest.raises(ZeroDivisionError), global_seed(11):
        _draws()
        _ = 1 / 0
    assert random.getstate() == python_before
    assert _numpy_state() == numpy_before


def test_outer_draws_between_runs_are_not_rewound() -> None:
    # Given a fast-path restore, when the program draws between runs
    np.random.seed(2)
    with global_seed(1):
        np.random.random()
    np.random.random()  # the program moves on; a stale snapshot must not bring it back
    np.random.standard_normal()  # leaves a cached gaussian, invisible in the raw MT state
    before = _numpy_state()
    with global_seed(1):
        np.random.standard_normal()
    assert _numpy_state() == before


def test_nested_contexts_restore_in_order() -> None:
    np.random.seed(5)
    outer = _numpy_state()
    with global_seed(1):
        inner = _numpy_state()
        with global_seed(2):
            np.random.random()
        assert _numpy_state() == inner
        np.random.random()
    assert _numpy_state() == outer


def test_a_run_that_swaps_the_global_bit_generator_gets_it_put_back() -> None:
    from numpy.random.mtrand import get_bit_generator, set_bit_generator

    original = get_bit_generator()
    before = _numpy_state()
    with global_seed(3):
        set_bit_generator(np.random.PCG64(1))
    assert get_bit_generator() is original
    assert _numpy_state() == before


def test_repeated_runs_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full get_state costs ~150 us per run; after the first run it must not be needed."""
    assert seeding._RAW_LAYOUT_OK, "NumPy's MT19937 layout changed; only the slow path works"
    np.random.seed(0)
    with global_seed(1):
        pass
    calls: list[int] = []
    real = np.random.get_state

    def counting_get_state(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(np.random, "get_state", counting_get_state)
    for seed in range(5):
        with global_seed(seed):
            np.random.random()
    assert calls == []
