"""Region buffers kept from one job to the next of the same plan (zarr_parallel/buffers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from zarr_parallel import buffers


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    buffers.claim("test")
    buffers.clear()
    yield
    buffers.clear()


def test_a_buffer_given_back_is_lent_again_for_the_same_or_a_smaller_shape() -> None:
    a = buffers.take((4, 5), np.dtype("f8"))
    assert a.shape == (4, 5) and a.dtype == np.float64 and a.flags.c_contiguous
    buffers.give(a)
    assert buffers.kept_bytes() == 160
    b = buffers.take((2, 5), np.dtype("f4"))  # smaller: a view of the same buffer
    assert np.shares_memory(a, b)
    assert buffers.kept_bytes() == 0  # lent out, never lent twice
    c = buffers.take((2, 5), np.dtype("f4"))
    assert not np.shares_memory(b, c)


def test_at_most_two_are_kept_the_largest() -> None:
    made = [buffers.take((n,), np.dtype("u1")) for n in (10, 30, 20)]
    for m in made:
        buffers.give(m)
    assert buffers.kept_bytes() == 30 + 20
    buffers.give(made[1])  # given twice: kept once
    assert buffers.kept_bytes() == 50


def test_a_larger_shape_lets_go_of_the_kept_ones_before_making_its_own() -> None:
    buffers.give(buffers.take((100,), np.dtype("u1")))
    big = buffers.take((1000,), np.dtype("u1"))
    assert buffers.kept_bytes() == 0 and big.nbytes == 1000


def test_a_new_owner_or_a_smaller_budget_empties_the_pool() -> None:
    buffers.give(buffers.take((100,), np.dtype("u1")))
    assert buffers.claim("test", 100) == 100  # the same plan, within the job's estimate
    assert buffers.kept_bytes() == 100
    assert buffers.claim("test", 99) == 0  # a smaller job of the plan: let go
    assert buffers.kept_bytes() == 0
    buffers.give(buffers.take((100,), np.dtype("u1")))
    assert buffers.claim("another plan") == 0
    assert buffers.kept_bytes() == 0


def test_reserved_buffers_are_lent_to_the_first_job_of_their_plan() -> None:
    kept = buffers.reserve("plan-a", 3 * 4096)
    assert kept == buffers.kept_bytes() == 2 * 3 * 4096
    # The first job of that plan finds them, counted as its memory; its slab is a view.
    assert buffers.claim("plan-a", budget=10 * 4096) == kept
    slab = buffers.take((3, 1024), np.dtype("f4"))
    assert slab.nbytes == 3 * 4096 and buffers.kept_bytes() == 3 * 4096
    buffers.give(slab)
    # Reserved again for the same plan and size: the same buffers stay (nothing made anew).
    before = [id(b) for b in buffers._kept]
    assert buffers.reserve("plan-a", 3 * 4096) == kept
    assert [id(b) for b in buffers._kept] == before


def test_a_reserve_for_another_plan_or_larger_slabs_replaces_the_pool() -> None:
    buffers.reserve("plan-a", 4096)
    assert buffers.reserve("plan-a", 2 * 4096) == 2 * 2 * 4096  # larger: made anew
    assert buffers.reserve("plan-b", 4096) == 2 * 4096
    assert buffers.claim("plan-a") == 0  # the other plan's job finds nothing of plan-b's
