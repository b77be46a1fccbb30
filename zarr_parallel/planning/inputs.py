"""What the planner is given: the variables to write (:class:`ArrayInput`) and the budgets one job
must respect (:class:`Limits`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.memory import (
    FAST_WRITE_COPIES,
    FAST_WRITE_COPIES_UNCOMPRESSED,
    fast_job_memory,
    job_memory,
)
from zarr_parallel.units import format_bytes


@dataclass(frozen=True, eq=False)
class ArrayInput:
    """One target variable to be written by the jobs.

    Parameters
    ----------
    name
        Target variable name.
    axes
        One :class:`AxisMap` per target dimension, in the variable's dimension order.
    write_chunks
        Per dimension, the write unit: the Zarr shard length if sharded, else the chunk length.
    itemsize
        Bytes per element in memory after decoding and transforms (the target dtype).
    read_itemsize
        Bytes per decompressed source element (before decoding, e.g. 2 for packed int16).
    fixed_touched
        Source elements touched per target element along source dimensions that the target
        dropped (e.g. a scalar selection): the product of their touched chunk lengths.
    fast
        Written by the fast path (raw chunk reads streamed in slabs, :func:`fast_job_memory`)
        rather than through xarray (:func:`job_memory`).
    compressed
        Its chunks go through a compressor (``compression`` other than ``none``): the fast
        path's encoders then hold compressed buffers too.
    """

    name: str
    axes: tuple[AxisMap, ...]
    write_chunks: tuple[int, ...]
    itemsize: int
    read_itemsize: int
    fixed_touched: int = 1
    fast: bool = False
    compressed: bool = True

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.write_chunks):
            raise ValueError(f"{self.name}: one write chunk length per axis is needed")
        if any(c <= 0 for c in self.write_chunks):
            raise ValueError(f"{self.name}: write chunks must be positive")

    @property
    def dims(self) -> tuple[str, ...]:
        """Target dimension names."""
        return tuple(a.dim for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Target shape."""
        return tuple(a.size for a in self.axes)

    @property
    def needed_elems(self) -> int:
        """Source elements the target needs (read amplification's denominator)."""
        return math.prod(ax.needed for ax in self.axes)

    @property
    def source_chunk_elems(self) -> int:
        """Elements of the largest source chunk this variable touches."""
        return self.fixed_touched * math.prod(
            int(a.chunk_len.max()) if a.chunk_len.size else 1 for a in self.axes
        )

    def memory(self, touched: Any, lengths: Sequence[Any]) -> Any:
        """Estimated peak bytes of jobs with these per-dimension region lengths.

        ``touched`` is the source elements touched (product over dimensions), ``lengths`` the
        region lengths per dimension (ints or arrays that broadcast together).
        """
        region = math.prod(lengths) if lengths else 1
        if not self.fast or not lengths:
            return job_memory(
                touched * self.fixed_touched, region, self.itemsize, self.read_itemsize
            )
        return fast_job_memory(
            lengths,
            self.write_chunks,
            self.itemsize,
            self.read_itemsize,
            self.source_chunk_elems,
            FAST_WRITE_COPIES if self.compressed else FAST_WRITE_COPIES_UNCOMPRESSED,
        )

    def signature(self) -> str:
        """Variables with equal signatures share their jobs."""
        parts = [a.digest() for a in self.axes] + [repr(self.write_chunks)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Limits:
    """Budgets one job must respect.

    Parameters
    ----------
    memory_budget
        Bytes one job may use: the worker's memory limit minus the interpreter reserve.
    min_jobs
        Split into at least this many jobs where alignment allows (``num_jobs``).
    time_budget
        Seconds one job may take (a share of ``worker_timeout``); ``None`` for no limit.
    reserve
        The interpreter reserve subtracted from ``memory_limit`` to get ``memory_budget``
        (only used to word errors in the user's terms).
    overhead
        The worker process's allowance, also subtracted from ``memory_limit`` outside series
        mode (only used to word errors).
    min_jobs_derived
        True when ``min_jobs`` comes from the worker count, not from the user's ``num_jobs``:
        a plan that cannot reach it then says nothing (there is no ``num_jobs`` to name).
    workers
        Workers running jobs at once: a group's job count is made a multiple of it where whole
        units allow, so that no worker idles while another runs the last job (tail balance).
    """

    memory_budget: int
    min_jobs: int = 1
    time_budget: float | None = None
    reserve: int = 0
    overhead: int = 0
    min_jobs_derived: bool = False
    workers: int = 1

    @property
    def memory_limit(self) -> int:
        """The ``memory_limit`` these budgets come from.

        >>> Limits(14 * 10**6, reserve=256 * 10**6, overhead=250 * 10**6).memory_limit
        520000000
        """
        return self.memory_budget + self.reserve + self.overhead

    def held_back(self) -> str:
        """What ``memory_limit`` keeps from a job, in words (for error messages)."""
        parts = [f"the {format_bytes(self.reserve)} reserve"] if self.reserve else []
        if self.overhead:
            parts.append(f"the {format_bytes(self.overhead)} dask worker process")
        return f"memory_limit minus {' and '.join(parts)}" if parts else "memory_limit"

    def __post_init__(self) -> None:
        if self.memory_budget <= 0:
            raise ValueError("memory_budget must be positive")
        if self.min_jobs < 1:
            raise ValueError("min_jobs must be at least 1")
