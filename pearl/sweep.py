"""A sweep's jobs, run so that nothing finished is lost: jobs that can share blocks 1..L−1 are
evaluated together a trunk group (and a memory-bounded part of it) at a time, and each of them
writes its record right after its part is evaluated, before the next part starts. An interrupted
sweep keeps every record written so far and holds no lock; its rerun evaluates only the rest.
One group that fails fails its own jobs; the others still run (docs/speed.md §3).

The Hydra launchers (``hydra_plugins/pearl_launcher``) call :func:`run_sweep` with Hydra's way of
running one job; the tests call it with :func:`pearl.cli.execute`.
"""
from __future__ import annotations

import logging
from contextlib import closing
from typing import Callable, Sequence, TypeVar

from omegaconf import DictConfig

from .runner import evaluate_together, release_handed_over, trunk_groups

log = logging.getLogger("pearl")
Outcome = TypeVar("Outcome")


def run_sweep(cfgs: Sequence[DictConfig], run_one: Callable[[int], Outcome]) -> list[Outcome]:
    """``run_one(index)`` for every job of the sweep, one result per job in sweep order.

    Group by group (:func:`pearl.runner.trunk_groups`, in the order of each group's first job):
    each part of the group evaluated on one trunk (:func:`pearl.runner.evaluate_together`) is
    followed at once by its jobs' turns, which write their records; then the group's other jobs
    (recorded, busy, alone, failing to plan) take their turns as with Hydra's basic launcher.
    """
    outcomes: dict[int, Outcome] = {}
    for group in trunk_groups(cfgs):
        try:
            with closing(evaluate_together([cfgs[index] for index in group])) as parts:
                for positions in parts:
                    log.info("evaluated %d jobs on one shared trunk", len(positions))
                    for position in positions:
                        outcomes[group[position]] = run_one(group[position])
        finally:
            release_handed_over()
        for index in group:
            if index not in outcomes:
                outcomes[index] = run_one(index)
    return [outcomes[index] for index in range(len(cfgs))]
