"""Hydra launcher ``hydra/launcher=shared_trunk`` (run.py's default): the jobs of a sweep that can
share blocks 1..L−1 are evaluated together first, then every job runs in order as with Hydra's
basic launcher, writing its own record (docs/speed.md §3).

Hydra finds launchers only in the ``hydra_plugins`` namespace package, so this module lives
here; the work is ``pearl.sweep.run_sweep``. (No ``from __future__ import annotations``:
Hydra executes plugin modules outside ``sys.modules``, where dataclasses cannot resolve them.)
"""

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class SharedTrunkLauncherConf:
    _target_: str = "hydra_plugins.pearl_launcher.shared_trunk_launcher.SharedTrunkLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="shared_trunk", node=SharedTrunkLauncherConf)


def run_sharing_trunks(hydra_context, task_function, sweep_configs: list) -> list[JobReturn]:
    """Run every job of ``sweep_configs``, those that can share a trunk evaluated together, each
    writing its own record as soon as its group is evaluated (``pearl.sweep.run_sweep``); one
    JobReturn per job, in sweep order. Used by this launcher and, in each SLURM task, by the
    submitit ones (``shared_trunk_submitit.py``)."""
    from pearl.sweep import run_sweep
    task_configs = []
    for sweep_config in sweep_configs:
        task_config = copy.deepcopy(sweep_config)
        with read_write(task_config), open_dict(task_config):
            del task_config["hydra"]
        task_configs.append(task_config)

    def run_one(index: int) -> JobReturn:
        sweep_config = sweep_configs[index]
        done = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(sweep_config.hydra.hydra_logging, sweep_config.hydra.verbose)
        return done

    return run_sweep(task_configs, run_one)


class SharedTrunkLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        sweep_configs = []
        for number, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = number
            sweep_configs.append(sweep_config)
        return run_sharing_trunks(self.hydra_context, self.task_function, sweep_configs)
