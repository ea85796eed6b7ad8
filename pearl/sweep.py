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
import os
import time
from contextlib import closing
from typing import Callable, Iterator, Sequence, TypeVar

from omegaconf import DictConfig

from .errors import UserError
from .evaluate import Evaluated, evaluate, hand_over, release_handed_over
from .locks import try_lock
from .plan import Job, config_key, plan, shared_trunk_key
from .records import find_record, prepare_results_dir, record_path
from .runner import answered_by
from .text import load_vocabulary

log = logging.getLogger("pearl")
Outcome = TypeVar("Outcome")


def run_sweep(cfgs: Sequence[DictConfig], run_one: Callable[[int], Outcome]) -> list[Outcome]:
    """``run_one(index)`` for every job of the sweep, one result per job in sweep order.

    Group by group (:func:`trunk_groups`, in the order of each group's first job):
    each part of the group evaluated on one trunk (:func:`evaluate_together`) is
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


def trunk_groups(cfgs: Sequence[DictConfig]) -> list[list[int]]:
    """The sweep's job indices in groups of equal :func:`shared_trunk_key` (a job without one
    alone), each group in sweep order, the groups in the order of their first job."""
    groups: list[list[int]] = []
    by_key: dict[str, list[int]] = {}
    for index, cfg in enumerate(cfgs):
        key = shared_trunk_key(cfg)
        if key is None:
            groups.append([index])
        elif key in by_key:
            by_key[key].append(index)
        else:
            groups.append(by_key.setdefault(key, [index]))
    return groups


# host or device bytes one job holds per query × pixel of an image (fp32 logits and what the decision
# makes from them; measured: benchmarks/bench_group_memory.py)
PREDICTION_BYTES_PER_VALUE = 6


def prediction_bytes(job: Job) -> int:
    """What one job of a shared-trunk group holds for one image: its queries × the pixels of the
    dataset's typical image (a folder's largest) × ``PREDICTION_BYTES_PER_VALUE``."""
    height, width = job.dataset.typical_size()
    return PREDICTION_BYTES_PER_VALUE * load_vocabulary(job.identity["classes"]).num_queries * height * width


def memory_chunks(jobs: Sequence[Job], budget_gib: float) -> list[list[int]]:
    """Consecutive positions of ``jobs`` evaluated together: as many as fit ``budget_gib`` by
    :func:`prediction_bytes` (at least one each)."""
    chunks: list[list[int]] = []
    held = 0
    for position, job in enumerate(jobs):
        cost = prediction_bytes(job)
        if chunks and held + cost <= budget_gib * 2 ** 30:
            chunks[-1].append(position)
            held += cost
        else:
            chunks.append([position])
            held = cost
    return chunks


def evaluate_together(cfgs: Sequence[DictConfig]) -> Iterator[list[int]]:
    """Evaluate jobs of one trunk group (equal :func:`shared_trunk_key`) on one trunk, a
    memory-bounded chunk at a time (``group_memory_gib``), and yield the positions in ``cfgs`` of
    each chunk as soon as it is evaluated: each of those jobs' turn (:func:`run_job`) then writes
    its record (or fails with the chunk's error). Jobs already recorded, held by another process,
    repeated or failing to plan are not yielded: their turn reports them as usual. The locks of a
    chunk are held until its jobs' turns; :func:`release_handed_over` frees those never taken."""
    if len(cfgs) < 2:
        return
    planned: list[tuple[int, Job]] = []
    for position, cfg in enumerate(cfgs):
        try:
            job = plan(cfg)
            if answered_by(cfg, job, find_record(record_path(cfg.results_dir, job.run_hash))):
                continue
        except Exception:  # noqa: BLE001 — the job's own turn plans it again and reports the error
            continue
        if all(job.run_hash != other.run_hash for _, other in planned):
            planned.append((position, job))
    if len(planned) < 2:
        return
    for chunk in memory_chunks([job for _, job in planned], cfgs[0].group_memory_gib):
        members = [(cfgs[planned[i][0]], planned[i][1], planned[i][0]) for i in chunk]
        locked = _lock_all(members) if len(members) > 1 else []
        if len(locked) < 2:
            for _, _, _, lock in locked:
                lock.release()
            continue
        _evaluate_chunk(locked)
        yield [position for _, _, position, _ in locked]


def _evaluate_chunk(locked: list) -> None:
    """Evaluate the (cfg, job, position, lock) of ``locked`` on one trunk and hand each job its
    shard, or the error, for its turn."""
    jobs = [job for _, job, _, _ in locked]
    start = time.perf_counter()
    try:
        shards = evaluate(jobs, range(len(jobs[0].dataset)), jobs[0].device)
    except Exception as error:  # noqa: BLE001 — one group's failure fails its jobs, not the sweep
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if os.environ.get("PEARL_TRACEBACK"):
            log.exception("evaluating %d jobs on one trunk failed", len(jobs))
        for cfg, job, _, lock in locked:
            hand_over(config_key(cfg), Evaluated(job, None, 0.0, lock, message))
        return
    except BaseException:  # Ctrl-C: nothing of this chunk is recorded, and no lock stays held
        for _, _, _, lock in locked:
            lock.release()
        raise
    wall_s = time.perf_counter() - start
    for (cfg, job, _, lock), shard in zip(locked, shards):
        hand_over(config_key(cfg), Evaluated(job, shard, wall_s, lock))


def _lock_all(members: list) -> list:
    """(cfg, job, position, lock) for the members whose lock this process gets."""
    locked = []
    for cfg, job, position in members:
        prepare_results_dir(cfg.results_dir)
        path = record_path(cfg.results_dir, job.run_hash)
        lock = try_lock(path.with_suffix(".lock"))
        if lock is None:
            continue
        if answered_by(cfg, job, find_record(path)):  # finished by another process since we looked
            lock.release()
            continue
        locked.append((cfg, job, position, lock))
    return locked

