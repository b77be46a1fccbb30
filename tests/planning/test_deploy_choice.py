"""The rules of ``deploy_mode="auto"`` (docs/design.md §2b): a table of cases, first match wins."""

from __future__ import annotations

import pytest

from zarr_parallel.planning.deploy_choice import (
    RULES,
    SMALL_PLAN_BYTES,
    ModeFacts,
    choose_deploy_mode,
)

GB = 10**9


@pytest.mark.parametrize(
    ("facts", "mode", "words"),
    [
        # A named scheduler wins over everything, even a one-job plan.
        (
            ModeFacts(True, cores=2, local_workers=1, jobs=1, write_bytes=10),
            "dask_distributed",
            "scheduler_address",
        ),
        (
            ModeFacts(False, cores=64, local_workers=64, jobs=1, write_bytes=50 * GB),
            "series",
            "one job",
        ),
        # The quickstart: three jobs, 6 MB.
        (
            ModeFacts(False, cores=2, local_workers=4, jobs=3, write_bytes=6 * 10**6),
            "series",
            "less than",
        ),
        (
            ModeFacts(False, cores=2, local_workers=8, jobs=40, write_bytes=4 * GB),
            "series",
            "2 core(s)",
        ),
        (
            ModeFacts(False, cores=16, local_workers=1, jobs=40, write_bytes=4 * GB),
            "series",
            "memory",
        ),
        (
            ModeFacts(False, cores=16, local_workers=8, jobs=40, write_bytes=4 * GB),
            "dask_distributed",
            "8 worker processes",
        ),
        (
            ModeFacts(False, cores=4, local_workers=16, jobs=3, write_bytes=SMALL_PLAN_BYTES),
            "dask_distributed",
            "3 worker processes",
        ),
    ],
)
def test_auto_chooses_by_the_first_rule_that_applies(
    facts: ModeFacts, mode: str, words: str
) -> None:
    choice = choose_deploy_mode(facts)
    assert choice.mode == mode
    assert words in choice.reason


def test_auto_never_chooses_slurm_and_the_last_rule_always_applies() -> None:
    assert {mode for _, _, mode, _ in RULES} == {"series", "dask_distributed"}
    assert RULES[-1][1](ModeFacts(False, 0, 0, 0, 0))


def test_every_rule_is_reachable() -> None:
    """Each rule decides some case (none is shadowed by the ones above it)."""
    cases = {
        "scheduler": ModeFacts(True, 2, 1, 1, 1),
        "one job": ModeFacts(False, 16, 16, 1, 10 * GB),
        "small plan": ModeFacts(False, 16, 16, 8, 10),
        "few cores": ModeFacts(False, 2, 16, 8, 10 * GB),
        "memory": ModeFacts(False, 16, 1, 8, 10 * GB),
        "cluster": ModeFacts(False, 16, 16, 8, 10 * GB),
    }
    for name, _applies, mode, reason in RULES:
        facts = cases[name]
        first = next(r for r in RULES if r[1](facts))
        assert first[0] == name, (name, first[0])
        assert choose_deploy_mode(facts).reason == reason(facts)
        assert choose_deploy_mode(facts).mode == mode
