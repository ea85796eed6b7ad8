"""Hydra launchers ``hydra/launcher=shared_trunk_submitit_slurm`` and ``..._local``: Hydra's
submitit launchers with one SLURM task (or local process) per group of jobs that can share
blocks 1..L−1, instead of one per job; inside a task the group is evaluated on one trunk and
every job writes its own record, as with ``shared_trunk`` on one machine (docs/speed.md §6).

Registered only when the ``cluster`` extra (hydra-submitit-launcher) is installed. The group is
found from each job's config alone (``pearl.plan.shared_trunk_key``: no data or weights are read
on the submitting host). Jobs that cannot share a trunk stay one task each. (No ``from __future__
import annotations``: see shared_trunk_launcher.py.)
"""

import logging
from typing import Any, Dict, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from omegaconf import open_dict, read_write

from .shared_trunk_launcher import run_sharing_trunks

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # without the cluster extra there is nothing to register
    LocalLauncher = SlurmLauncher = None


class _GroupingMixin:
    """Submits one task per trunk group: the parent's ``launch`` is given one representative
    override list per group, and ``__call__`` (run in the task) runs the whole group and returns
    its JobReturns, which ``launch`` puts back in the sweep's order."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from pearl.plan import shared_trunk_key
        groups: Dict[Any, List] = {}
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with read_write(sweep_config), open_dict(sweep_config):
                del sweep_config["hydra"]
            key = shared_trunk_key(sweep_config)
            groups.setdefault(("alone", number) if key is None else key, []).append((list(overrides), number))
        self._groups = {tuple(members[0][0]): members for members in groups.values()}
        log.info("%d jobs in %d tasks (jobs that can share a trunk run in one task)", len(job_overrides), len(groups))
        for members in groups.values():
            log.info("\ttask: " + "; ".join(f"#{n} {' '.join(filter_overrides(o))}" for o, n in members))
        per_task = super().launch([members[0][0] for members in groups.values()], initial_job_idx)
        by_number = {number: run for members, runs in zip(groups.values(), per_task)
                     for (_, number), run in zip(members, runs)}
        return [by_number[number] for number in range(initial_job_idx, initial_job_idx + len(job_overrides))]

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton]) -> List[JobReturn]:
        import submitit
        Singleton.set_state(singleton_state)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # the group's lines in the task log
        sweep_configs = []
        for overrides, number in self._groups[tuple(sweep_overrides)]:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.id = f"{submitit.JobEnvironment().job_id}_{number}"
                sweep_config.hydra.job.num = number
            sweep_configs.append(sweep_config)
        return run_sharing_trunks(self.hydra_context, self.task_function, sweep_configs)


if SlurmLauncher is not None:
    class SharedTrunkSlurmLauncher(_GroupingMixin, SlurmLauncher):
        pass

    class SharedTrunkLocalLauncher(_GroupingMixin, LocalLauncher):
        pass

    _HERE = "hydra_plugins.pearl_launcher.shared_trunk_submitit"
    ConfigStore.instance().store(group="hydra/launcher", name="shared_trunk_submitit_slurm",
                                 node=SlurmQueueConf(_target_=f"{_HERE}.SharedTrunkSlurmLauncher"))
    ConfigStore.instance().store(group="hydra/launcher", name="shared_trunk_submitit_local",
                                 node=LocalQueueConf(_target_=f"{_HERE}.SharedTrunkLocalLauncher"))
