"""Which of open_clip's pretrained architectures a registered tower computes, and why not the rest.

    python tools/tower_coverage.py

Builds each architecture's image tower on the meta device (no memory, no weights; open_clip's own
``_build_vision_tower``) and asks ``pearl.towers.tower_for``; prints a markdown table by tower and
prefix tokens, then each unsupported architecture with the reason the error names
(docs/architecture.md §2.1 quotes the result).
"""
from __future__ import annotations

import collections
import logging
import warnings

import open_clip
import torch
from open_clip.model import _build_vision_tower

from pearl.errors import ConfigError
from pearl.towers import tower_for


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    tags = collections.Counter(name for name, _ in open_clip.list_pretrained())
    supported: dict[tuple, list[str]] = collections.defaultdict(list)
    refused: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(tags):
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
        try:
            tower = tower_for(visual)
            supported[(tower.name, tower.prefix_tokens)].append(name)
        except ConfigError as error:
            refused[str(error).split(" is not supported")[0]].append(name)
    print(f"open_clip {open_clip.__version__}: {len(tags)} pretrained architectures, {sum(tags.values())} tags\n")
    print("| tower | prefix tokens | architectures | tags |\n|---|---|---|---|")
    for (tower, prefix), names in sorted(supported.items()):
        print(f"| {tower} | {prefix} | {len(names)} | {sum(tags[n] for n in names)} |")
    print("\n| not supported | architectures | tags | e.g. |\n|---|---|---|---|")
    for reason, names in sorted(refused.items(), key=lambda item: -len(item[1])):
        print(f"| {reason} | {len(names)} | {sum(tags[n] for n in names)} | {', '.join(names[:3])} |")


if __name__ == "__main__":
    main()
