"""Pictures of a prediction: the colour overlay with a legend of the classes present, the indexed
label PNG (palette = the overlay's colours) and float16 probabilities. ``python -m pearl.segment``
and the runner's ``save_predictions`` write them; comparison figures (panels in rows, one legend)
and heat-map overlays (``python -m pearl.attention``).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

ALPHA = 0.5  # weight of the label colours in the overlay


def palette(num_classes: int) -> np.ndarray:
    """[C, 3] uint8 colours, distinct per class index (the PASCAL VOC bit-interleaving rule)."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def present_classes(labels: np.ndarray, classes: list[str]) -> list[tuple[int, str]]:
    """(index, class line) of every class that labels at least one pixel, in class order."""
    return [(int(index), classes[int(index)]) for index in np.unique(labels)]


def overlay(image: np.ndarray, labels: np.ndarray, classes: list[str]) -> Image.Image:
    """The image blended with the label colours and a legend of the classes present (top left)."""
    colours = palette(len(classes))
    blended = ((1 - ALPHA) * image + ALPHA * colours[labels]).astype(np.uint8)
    picture = Image.fromarray(blended)
    draw = ImageDraw.Draw(picture)
    entries = present_classes(labels, classes)
    row = 12
    width = min(picture.width, 16 + 7 * max(len(name.split(", ")[0]) for _, name in entries))
    draw.rectangle((0, 0, width, row * len(entries) + 4), fill=(0, 0, 0))
    for line, (index, name) in enumerate(entries):
        top = 2 + line * row
        draw.rectangle((2, top, 11, top + 9), fill=tuple(int(c) for c in colours[index]), outline=(255, 255, 255))
        draw.text((14, top - 1), name.split(", ")[0], fill=(255, 255, 255))
    return picture


SMOKE_NOTE = "model tiny: random weights - a smoke picture, not a result"


def smoke_note(model_name: str) -> str | None:
    """The note every picture of the random ``tiny`` model carries (None for any other model)."""
    return SMOKE_NOTE if model_name == "tiny" else None


def _png_info(entries: list[tuple[int, str]], note: str | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("legend", "\n".join(f"{index}: {name}" for index, name in entries))
    if note:
        info.add_text("note", note)
    return info


def with_caption(picture: Image.Image, note: str | None) -> Image.Image:
    """``picture`` with ``note`` written in a strip beneath (unchanged without a note)."""
    if not note:
        return picture
    strip = caption_strip(note, picture.width)
    captioned = Image.new("RGB", (picture.width, picture.height + strip.height), (255, 255, 255))
    captioned.paste(picture, (0, 0))
    captioned.paste(strip, (0, picture.height))
    return captioned


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray, classes: list[str],
                  probs: np.ndarray | None = None, note: str | None = None) -> list[Path]:
    """The overlay, the indexed label PNG and (given ``probs``) the float16 probabilities of one
    image; ``note`` (the random model's mark) is written beneath the overlay and into both PNGs'
    ``note`` text chunk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = present_classes(labels, classes)
    paths = [out_dir / f"{stem}_overlay.png", out_dir / f"{stem}_labels.png"]
    with_caption(overlay(image, labels, classes), note).save(paths[0], pnginfo=_png_info(entries, note))
    if len(classes) <= 256:
        indexed = Image.fromarray(labels.astype(np.uint8), mode="P")
        indexed.putpalette(palette(len(classes)).ravel().tolist())
    else:  # more classes than a palette holds: a 16-bit grey PNG of the indices
        indexed = Image.fromarray(labels.astype(np.uint16))
    indexed.save(paths[1], pnginfo=_png_info(entries, note))
    if probs is not None:
        paths.append(out_dir / f"{stem}_probs.npy")
        np.save(paths[2], probs.astype(np.float16))
    return paths


PANEL_HEIGHT = 240  # pixels of each panel in a comparison figure
_TITLE, _GAP, _ROW = 16, 4, 12


def _legend_strip(entries: list[tuple[int, str]], classes: list[str], width: int) -> Image.Image:
    """Rows of colour swatches and names for the class indices in ``entries``."""
    colours = palette(len(classes))
    per_row = max(1, width // 160)
    strip = Image.new("RGB", (width, 4 + _ROW * -(-len(entries) // per_row)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for position, (index, name) in enumerate(entries):
        left, top = 4 + 160 * (position % per_row), 2 + _ROW * (position // per_row)
        draw.rectangle((left, top, left + 9, top + 9), fill=tuple(int(c) for c in colours[index]), outline=(0, 0, 0))
        draw.text((left + 13, top - 1), name.split(", ")[0][:22], fill=(0, 0, 0))
    return strip


def titled_panel(picture: Image.Image, title: str) -> Image.Image:
    """``picture`` scaled to PANEL_HEIGHT with ``title`` above it."""
    width = max(1, round(picture.width * PANEL_HEIGHT / picture.height))
    panel = Image.new("RGB", (width, PANEL_HEIGHT + _TITLE), (255, 255, 255))
    panel.paste(picture.convert("RGB").resize((width, PANEL_HEIGHT), Image.BILINEAR), (0, _TITLE))
    ImageDraw.Draw(panel).text((2, 2), title[: max(4, width // 7)], fill=(0, 0, 0))
    return panel


class ComparisonRow(NamedTuple):
    """One image's panels, their titles and the class indices they show."""

    panels: list
    titles: list[str]
    shown: set[int]


def comparison_row(image: np.ndarray, predictions: list[tuple[str, np.ndarray]], classes: list[str],
                   ground_truth: np.ndarray | None = None) -> ComparisonRow:
    """The input, the ground truth when given (black where ignored: any value outside the class
    range, 255 or 65535), then one overlay per (title, labels) prediction, each panel titled."""
    colours = palette(len(classes))
    pictures, titles, shown = [Image.fromarray(image)], ["input"], set()
    if ground_truth is not None:
        evaluated = (ground_truth >= 0) & (ground_truth < len(classes))
        pictures.append(Image.fromarray(np.where(evaluated[..., None], colours[np.where(evaluated, ground_truth, 0)],
                                                 np.uint8(0))))
        titles.append("ground truth")
        shown |= {int(v) for v in np.unique(ground_truth[evaluated])}
    for title, labels in predictions:
        pictures.append(Image.fromarray(((1 - ALPHA) * image + ALPHA * colours[labels]).astype(np.uint8)))
        titles.append(title)
        shown |= {int(v) for v in np.unique(labels)}
    return ComparisonRow([titled_panel(p, t) for p, t in zip(pictures, titles)], titles, shown)


def panel_grid(rows: list[list[Image.Image]], footer: Image.Image | None = None) -> Image.Image:
    """Rows of titled panels (``titled_panel``) on white, left-aligned, and ``footer`` beneath."""
    widths = [sum(p.width for p in row) + _GAP * (len(row) - 1) for row in rows]
    width = max(widths + [footer.width if footer else 0])
    height = PANEL_HEIGHT + _TITLE + _GAP
    figure = Image.new("RGB", (width, len(rows) * height + (footer.height if footer else 0)), (255, 255, 255))
    for number, row in enumerate(rows):
        left = 0
        for panel in row:
            figure.paste(panel, (left, number * height))
            left += panel.width + _GAP
    if footer is not None:
        figure.paste(footer, (0, figure.height - footer.height))
    return figure


def comparison_figure(rows: list[ComparisonRow], classes: list[str], note: str | None = None) -> Image.Image:
    """Rows of panels stacked, one legend of every class shown beneath, then ``note``. Its text
    chunks ``panels`` (the first row's titles), ``legend`` and ``note`` name what it shows
    (``save_figure`` writes them)."""
    widths = [sum(p.width for p in row.panels) + _GAP * (len(row.panels) - 1) for row in rows]
    entries = [(index, classes[index]) for index in sorted(set().union(*(row.shown for row in rows)))]
    figure = panel_grid([row.panels for row in rows], with_caption(_legend_strip(entries, classes, max(widths)),
                                                                   note))
    if note:
        figure.info["note"] = note
    figure.info["legend"] = "\n".join(f"{index}: {name}" for index, name in entries)
    figure.info["panels"] = "\n".join(rows[0].titles)
    return figure


def caption_strip(text: str, width: int) -> Image.Image:
    """One line of black text on white, ``width`` pixels wide (a figure's footnote)."""
    strip = Image.new("RGB", (width, _ROW + 4), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 2), text, fill=(0, 0, 0))
    return strip


def heat_overlay(image: np.ndarray, heat: np.ndarray, mark: tuple[int, int, int, int] | None = None,
                 colormap: str = "jet") -> Image.Image:
    """The image under a heat map: ``heat`` [h', w'] (≥ 0) scaled to its maximum, coloured by
    ``colormap``, bilinearly upsampled to the image and blended with weight ALPHA; ``mark``
    (left, top, right, bottom) outlined in white."""
    from matplotlib import colormaps
    peak = float(heat.max())
    unit = heat / peak if peak > 0 else np.zeros_like(heat)
    colours = (colormaps[colormap](unit)[..., :3] * 255).astype(np.uint8)
    layer = Image.fromarray(colours).resize((image.shape[1], image.shape[0]), Image.BILINEAR)
    picture = Image.fromarray(((1 - ALPHA) * image + ALPHA * np.asarray(layer)).astype(np.uint8))
    if mark is not None:
        ImageDraw.Draw(picture).rectangle(mark, outline=(255, 255, 255), width=2)
    return picture


def save_figure(figure: Image.Image, path: Path) -> Path:
    """Save with its ``legend`` and ``panels`` text chunks."""
    info = PngImagePlugin.PngInfo()
    for key in ("legend", "panels", "note"):
        if key in figure.info:
            info.add_text(key, figure.info[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, pnginfo=info)
    return path
