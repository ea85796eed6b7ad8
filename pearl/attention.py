"""Last-block attention maps: ``python -m pearl.attention IMAGE --patch ROW,COL --methods vanilla,naclip,pearl``.

For the chosen query patch (``--patch`` in grid cells, or ``--point X,Y`` in pixels of the image)
it draws, per method, where that patch's last-block attention goes, over the image (the PEARL
paper's Fig. 1); ``--all-heads`` draws one panel per head. The weights are the ones the method's own
last block multiplies the values with in the Segmentor (``Method.last_block`` hands them back
through ``pearl.methods.base.keep_attention``), not a second implementation.

The image is rescaled to ``--short-side`` (keep ratio, as the Segmentor's rescale) and seen whole,
as one window: the attention of a sliding-window run is per window. Each map is the query row
over the patch keys, each panel scaled to its own maximum; its share on the CLS key is printed in
the panel title. SCLIP's released attention is the sum of two softmax maps (rows sum to 2): its
maps are shown divided by 2.
Writes ``<stem>_attention_r<ROW>c<COL>.png`` (text chunk ``panels``: the panel titles) and, with
``--save-maps``, the maps as ``.npy`` (float32 [methods, heads or 1, h', w']).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml

from .data.datasets import read_image
from .errors import UserError
from .methods import available_methods, get_method
from .methods.base import ATTENTION
from .methods.resclip import ResCLIPConfig
from .params import PARAMS, build_config, config_params
from .preprocess import normalise, rescale, to_rgb_uint8
from .render import caption_strip, heat_overlay, panel_grid, save_figure, smoke_note, titled_panel
from .segment import add_model_options, load_model, parse_variants
from .settings import resolve_settings
from .towers import tower_for

DEFAULT_SHORT_SIDE = 336


def last_block_params() -> list[str]:
    """The parameters that change a last block: the fields of the methods' own configs (``pa`` is
    a switch of its own). ResCLIP's are left out: its attention depends on a first-pass segmentation,
    which needs a vocabulary this tool does not take."""
    names = {param for cls in map(get_method, available_methods())
             for param in config_params(cls.Config, cls.config_prefix).values()}
    return [name for name in PARAMS if name in names - set(config_params(ResCLIPConfig).values())]


class AttentionMaps(NamedTuple):
    """One method's last-block attention on one image.

    ``weights`` [heads, T, T] float32 on the CPU, rows = queries normalised to sum to 1 over the
    keys, the tower's ``prefix_tokens`` first (none for SFP's and SC-CLIP's main branch, which attend over the
    patches only), the first of them the CLS token when ``has_cls``; ``grid`` (h', w'); ``image``
    the rescaled RGB image the model saw, cropped to the grid's pixels."""

    weights: torch.Tensor
    grid: tuple[int, int]
    image: np.ndarray
    has_cls: bool
    prefix_tokens: int

    def query_map(self, row: int, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps [heads, h', w'] of patch (row, col)'s attention over the patch keys, the CLS
        key's share per head (0 where there is no CLS token))."""
        h, w = self.grid
        if not (0 <= row < h and 0 <= col < w):
            raise UserError(f"patch {row},{col} is outside the {h}×{w} grid (rows 0..{h - 1}, columns 0..{w - 1})")
        offset = self.prefix_tokens
        weights = self.weights[:, offset + row * w + col]
        cls_share = weights[:, 0] if self.has_cls else torch.zeros(weights.shape[0])
        return weights[:, offset:].reshape(-1, h, w), cls_share


def attention_maps(model, image, method: str, pa: bool | None = None, short_side: int = DEFAULT_SHORT_SIDE,
                   **params) -> AttentionMaps:
    """The last-block attention of ``method`` (its own config from ``params``, pa/arch switches
    included) for an RGB image (array or PIL), rescaled to ``short_side``; the model on its device."""
    resolved = resolve_settings(method, pa, None, params)
    method_cls = get_method(method)
    last_block = method_cls(build_config(method_cls.Config, resolved, method_cls.config_prefix))
    if last_block.vfm_in_last_block:
        raise UserError(f"method={method} reads a second vision model in its last block, which this tool does not "
                        f"load: its attention maps are not drawn here")
    tower = tower_for(model.visual)
    last_block.check_tower(tower)
    picture = rescale(to_rgb_uint8(image), short_side)
    step = tower.patch_size
    picture = picture[: picture.shape[0] // step * step, : picture.shape[1] // step * step]
    if picture.size == 0:
        raise UserError(f"the image is smaller than one {step}-pixel patch at --short-side {short_side}")
    info: dict = {ATTENTION: None}
    with torch.no_grad():
        shared = tower.trunk(normalise(picture, tower.normalisation)[None].to(tower.device),
                             last_block.needs_hidden_states, last_block.position_interpolation)
        tower.head(shared, last_block, info)
    weights = info[ATTENTION][0].float().cpu()
    weights = weights / weights.sum(dim=-1, keepdim=True)  # SCLIP: two softmax maps summed
    tokens = shared.grid[0] * shared.grid[1]
    prefix = weights.shape[-1] - tokens
    return AttentionMaps(weights, shared.grid, picture, prefix > 0 and tower.has_cls, prefix)


def patch_of_point(x: float, y: float, original: tuple[int, int], rescaled: tuple[int, int], step: int
                   ) -> tuple[int, int]:
    """(row, col) of the patch under pixel (x, y) of the original (H, W) image once rescaled to (H', W')."""
    height, width = original
    if not (0 <= x < width and 0 <= y < height):
        raise UserError(f"point {x:g},{y:g} is outside the {width}×{height} image "
                        f"(x 0..{width - 1}, y 0..{height - 1})")
    return int(y * rescaled[0] / height) // step, int(x * rescaled[1] / width) // step


def _pair(text: str, option: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected two numbers separated by a comma, e.g. {option} 5,7") from None
    return first, second


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pearl.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="an image file")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--patch", help="ROW,COL of the query patch in the grid (0-based)")
    where.add_argument("--point", help="X,Y of the query point in pixels of the image")
    parser.add_argument("--methods", default="vanilla,naclip,pearl",
                        help="methods, with options as in pearl.segment --compare (e.g. pearl:pa=false)")
    parser.add_argument("--all-heads", action="store_true", help="one panel per head (a row per method)")
    parser.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE,
                        help=f"short side the image is rescaled to (default {DEFAULT_SHORT_SIDE})")
    add_model_options(parser)
    parser.add_argument("--out", default="attention", help="output folder (default ./attention)")
    parser.add_argument("--save-maps", action="store_true", help="also write the maps as .npy (float32)")
    group = parser.add_argument_group("last-block parameters (default: the method's own)")
    for name in last_block_params():
        group.add_argument(f"--{name}", type=yaml.safe_load, default=None, metavar="VALUE",
                           help=f"{PARAMS[name].meaning} (default {PARAMS[name].default!r})")
    return parser


def _panels(title: str, maps: AttentionMaps, row: int, col: int, all_heads: bool) -> tuple[list, np.ndarray]:
    per_head, cls_share = maps.query_map(row, col)
    shown = per_head if all_heads else per_head.mean(dim=0, keepdim=True)
    shares = cls_share if all_heads else cls_share.mean(dim=0, keepdim=True)
    step = maps.image.shape[0] // maps.grid[0]
    mark = (col * step, row * step, (col + 1) * step - 1, (row + 1) * step - 1)
    panels = []
    for index, (heat, share) in enumerate(zip(shown.numpy(), shares.tolist())):
        name = f"{title} h{index}" if all_heads else title
        panels.append((heat_overlay(maps.image, heat, mark), f"{name} (CLS {share:.2f})"))
    return panels, shown.numpy()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = Path(args.image)
        if not path.is_file():
            raise UserError(f"image {path} does not exist")
        image = read_image(path)
        params = {name: getattr(args, name) for name in last_block_params() if getattr(args, name) is not None}
        variants = parse_variants(args.methods, params, "--methods")
        model, _ = load_model(args)
        rows, arrays, titles, query = [], [], [], None
        for title, method, settings in variants:
            settings = dict(settings)
            maps = attention_maps(model, image, method, settings.pop("pa", None), args.short_side, **settings)
            if query is None:
                if args.patch:
                    query = tuple(int(v) for v in _pair(args.patch, "--patch"))
                else:
                    query = patch_of_point(*_pair(args.point, "--point"), image.shape[:2],
                                           maps.image.shape[:2], maps.image.shape[0] // maps.grid[0])
            panels, shown = _panels(title, maps, *query, args.all_heads)
            rows.append([titled_panel(picture, name) for picture, name in panels])
            titles += [name for _, name in panels]
            arrays.append(shown)
        rows = rows if args.all_heads else [sum(rows, [])]
        width = max(sum(panel.width for panel in row) for row in rows)
        note = smoke_note(args.model)
        figure = panel_grid(rows, caption_strip(note, width) if note else None)
        if note:
            figure.info["note"] = note
        figure.info["panels"] = "\n".join(titles)
        out_dir = Path(args.out)
        stem = f"{path.stem}_attention_r{query[0]}c{query[1]}"
        save_figure(figure, out_dir / f"{stem}.png")
        if args.save_maps:
            np.save(out_dir / f"{stem}.npy", np.stack(arrays).astype(np.float32))
        print(f"attention of patch {query[0]},{query[1]} ({len(variants)} methods) → {out_dir / stem}.png", flush=True)
        return 0
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
