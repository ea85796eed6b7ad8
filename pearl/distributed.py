"""One job's dataset over several processes: ``workers=N`` (spawned here) or ``torchrun``;
contiguous shards, one all-reduce of the int64 confusion matrix and one gather of the rest
(docs/speed.md §5).
"""
from __future__ import annotations

import os

import torch

from .evaluate import Shard, evaluate
from .metrics import ConfusionMatrix
from .plan import Job


def shard_indices(size: int, rank: int, world: int) -> range:
    """Contiguous, non-padding shard of ``range(size)`` (no image twice, none dropped; docs/engineering.md §6)."""
    return range(size * rank // world, size * (rank + 1) // world)


def sharded_evaluation(job: Job, rank: int, world: int, device: torch.device) -> Shard | None:
    """This process's shard of the dataset, then one all-reduce of the int64 confusion matrix and
    one gather of the rest; rank 0 gets the merged shard, the others None. The progress bar (rank
    0) counts its own images times ``world``: an estimate of the global count, with no collective
    per image."""
    import torch.distributed as dist
    shard = evaluate([job], shard_indices(len(job.dataset), rank, world), device, show_progress=rank == 0,
                     progress_scale=world)[0]
    shard.cm.all_reduce()
    parts = [None] * world
    dist.all_gather_object(parts, (shard.skipped, shard.nan_windows, shard.evaluated, shard.diagnostic_sums,
                                   shard.setup_s, shard.eval_s, shard.nan_images))
    if rank != 0:
        return None
    sums: dict = {}
    for part in parts:
        for key, value in part[3].items():
            sums[key] = sums.get(key, 0.0) + value
    merged = Shard(ConfusionMatrix.from_matrix(shard.cm.matrix.cpu()), [item for part in parts for item in part[0]],
                   sum(part[1] for part in parts), sum(part[2] for part in parts), sums,
                   max(part[4] for part in parts), max(part[5] for part in parts),
                   shard.predictions_dir,  # save_predictions: each process writes the first N of its shard
                   sum(part[6] for part in parts))
    if merged.evaluated + len(merged.skipped) != len(job.dataset):
        raise RuntimeError(f"{world} processes evaluated {merged.evaluated} + skipped {len(merged.skipped)} images, "
                           f"the dataset has {len(job.dataset)}")
    return merged


def _rank_device(job: Job, local_rank: int) -> torch.device:
    device = torch.device("cuda", local_rank) if job.device.type == "cuda" else job.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _worker(rank: int, world: int, job: Job, init_file: str, result_file: str) -> None:
    """One process of a ``workers=N`` job (planned once, by the parent)."""
    import torch.distributed as dist
    device = _rank_device(job, rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        merged = sharded_evaluation(job, rank, world, device)
        if merged is not None:
            torch.save(merged, result_file)
    finally:
        dist.destroy_process_group()


def evaluate_distributed(job: Job) -> Shard:
    """Spawn ``workers`` processes (one GPU each, or CPU with gloo) and merge their shards."""
    import tempfile

    import torch.multiprocessing as mp
    world = job.options.workers
    if job.device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"workers={world} but only {torch.cuda.device_count()} GPUs are visible; "
                         f"set workers to at most that")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = f"{tmp}/result.pt"
        mp.spawn(_worker, args=(world, job, f"{tmp}/init", result_file),
                 nprocs=world, join=True)
        return torch.load(result_file, weights_only=False)  # our own file, written by our worker just now


def torchrun_group(job: Job) -> tuple[int, int, torch.device]:
    """(rank, world, device) of this torchrun process; the process group is made once per process."""
    import torch.distributed as dist
    device = _rank_device(job, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device

