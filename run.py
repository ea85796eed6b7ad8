"""Evaluate methods × PA × TLP × datasets as a Hydra (multi)run; one result record per job.

    python run.py -m method=pearl,naclip tlp=true,false dataset=voc21,ade20k
    python -m pearl.tables            # results/runs/*.json → results/{main,ablation,plug_and_play}.csv
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pearl import cli
from pearl.config import help_text, register_config_groups, unknown_override
from pearl.records import path_component

register_config_groups()
OmegaConf.register_new_resolver("pearl_help", help_text, replace=True)
OmegaConf.register_new_resolver("pearl_path", path_component, replace=True)  # job folders stay in the sweep


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    group = hydra_cfg.sweep.dir if hydra_cfg.mode.name == "MULTIRUN" else None
    return cli.execute(cfg, group=group, description=" ".join(hydra_cfg.overrides.task),
                       output_dir=hydra_cfg.runtime.output_dir)


if __name__ == "__main__":
    problem = unknown_override(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.exit(cli.main(main))
