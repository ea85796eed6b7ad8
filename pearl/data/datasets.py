"""The benchmarks in their MMSegmentation (or detectron2) layouts, and ``folder`` for users' own data.

Each dataset yields the original-resolution RGB image, the label map with the protocol's
conventions (255 = ignored, 65535 in 16-bit label files; ``reduce_zero_label`` where it applies)
and an id. Images are decoded with OpenCV (colour, BGR → RGB) and labels with Pillow as raw
indices (palette index for VOC), as MMSeg's ``LoadImageFromFile`` / ``LoadAnnotations`` do;
docs/protocol.md §1, §10.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..benchmarks import BENCHMARKS
from ..errors import UserError
from ..protocols import canonical_dataset, class_names
from .digests import content_digests

LAYOUT_HELP = "docs/datasets.md (MMSegmentation layouts)"
# Pixels as stored, for images as for labels: an EXIF orientation tag is not applied (labels carry
# none, and were drawn on the stored grid), so image and label never disagree (docs/datasets.md).
IMAGE_READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
CHECK_HINT = "; `python -m pearl.data check {name} --root DIR` says what is missing"  # said by the runner only
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # Pillow's decompression-bomb threshold: about 13,000 × 13,000


class DatasetError(UserError, RuntimeError):
    """A dataset, image or label that cannot be used; the message names the file and the fix."""


@dataclass
class Sample:
    image: np.ndarray      # H×W×3 uint8 RGB, original resolution
    label: np.ndarray | None  # H×W int64, the dataset's ignore_index (255) = ignored; None for unlabelled images
    id: str


_END_MARKERS = ((b"\xff\xd8", b"\xff\xd9", "JPEG end-of-image marker"), (b"\x89PNG", b"IEND", "PNG IEND chunk"))


def _truncation(path: Path) -> str | None:
    """What is missing at the end of a JPEG or PNG file cut short (None for a complete file).

    OpenCV decodes a truncated JPEG into a half-grey image with only a stderr warning, so the end
    markers are checked explicitly (within the last 4 KiB: trailing metadata is allowed)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 4096))
        tail = handle.read()
    for magic, marker, name in _END_MARKERS:
        if head.startswith(magic) and marker not in tail:
            return name
    return None


@contextlib.contextmanager
def _pillow_unlimited():
    """Pillow's own pixel limit off: ``_require_pixels`` applies ours (``max_pixels``) instead."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _require_pixels(path: Path, size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise DatasetError(f"{what} {path} is {width}×{height} = {width * height:,} pixels, above max_pixels="
                           f"{max_pixels:,}; if the file is genuine raise max_pixels (a run key), else replace it, "
                           f"or run with on_error=skip")


_DECODER_MESSAGE = re.compile(r"JPEG|libpng|TIFF|webp|imread_", re.IGNORECASE)


@functools.lru_cache(maxsize=None)
def _stderr_capture():
    """The file that receives the decoder's stderr, one per process and reused for every image."""
    return tempfile.TemporaryFile()


def _decode_noting_warnings(path: Path) -> tuple[np.ndarray | None, str]:
    """(OpenCV's colour decoding, the first line the decoder wrote to stderr, "" if none).

    libjpeg reports damaged data ("Corrupt JPEG data: …") on the process's stderr and returns an
    image anyway; file descriptor 2 is redirected for the call so that such a warning is seen."""
    captured = _stderr_capture()
    captured.seek(0)
    captured.truncate()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
        image = cv2.imread(str(path), IMAGE_READ_FLAGS)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    captured.seek(0)
    text = captured.read().decode("utf-8", "replace")
    complaints = [line.strip() for line in text.splitlines() if _DECODER_MESSAGE.search(line)]
    others = "".join(line + "\n" for line in text.splitlines() if line.strip() and not _DECODER_MESSAGE.search(line))
    if others:  # written meanwhile by someone else (another thread): pass it on
        sys.stderr.write(others)
    return image, complaints[0] if complaints else ""


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H×W×3 uint8 RGB via OpenCV colour decoding, pixels as stored (an EXIF orientation tag is not
    applied, as for labels); grey files become 3 equal channels.

    A truncated JPEG or PNG is a DatasetError, never a partially decoded image; so is one of more
    than ``max_pixels`` pixels (read from the header, before decoding)."""
    if path.is_file():
        if missing := _truncation(path):
            raise DatasetError(f"image {path} is truncated (no {missing}): re-extract or re-download it, or run "
                               f"with on_error=skip")
        try:
            with _pillow_unlimited(), Image.open(path) as handle:
                size = handle.size
        except (OSError, ValueError):
            size = (0, 0)  # a format Pillow cannot parse: OpenCV decides below
        _require_pixels(path, size, max_pixels, "image")
    image, complaint = _decode_noting_warnings(path)
    if image is None:
        raise DatasetError(f"cannot decode image {path}: the file is missing, empty or corrupt; re-extract it "
                           f"or run with on_error=skip")
    if complaint:
        raise DatasetError(f"image {path} decodes only with a decoder warning ({complaint}): the file is damaged; "
                           f"re-extract or re-download it, or run with on_error=skip")
    return np.ascontiguousarray(image[:, :, ::-1])


def read_label(path: Path, num_classes: int, reduce_zero_label: bool,
               max_pixels: int = DEFAULT_MAX_PIXELS, ignore_index: int = 255) -> np.ndarray:
    """H×W int64 label indices (8- or 16-bit PNG or TIFF); 0 → ``ignore_index`` and k → k−1 under
    ``reduce_zero_label``; values checked against 0..num_classes−1 and ``ignore_index``."""
    if not path.is_file():
        raise DatasetError(f"label file {path} is missing; every image needs its label in the layout of {LAYOUT_HELP}")
    if missing := _truncation(path):
        raise DatasetError(f"label {path} is truncated (no {missing}): re-extract or re-convert it, or run with "
                           f"on_error=skip")
    try:
        with _pillow_unlimited(), Image.open(path) as handle:
            _require_pixels(path, handle.size, max_pixels, "label")
            label = np.array(handle).astype(np.int64)
    except (OSError, ValueError) as error:  # a truncated PNG ("image file is truncated") lands here
        raise DatasetError(f"cannot read label {path}: {error}") from None
    if label.ndim != 2:
        raise DatasetError(f"label {path} has shape {label.shape}; expected a single-channel index PNG "
                           f"(palette or grey), not colour")
    if reduce_zero_label:  # MMSeg's order: 0 → ignored, then −1, then the ignored value restored
        label[label == 0] = ignore_index
        label = label - 1
        label[label == ignore_index - 1] = ignore_index
    bad = np.unique(label[(label != ignore_index) & ((label < 0) | (label >= num_classes))])
    if bad.size:
        raise DatasetError(f"label {path} holds values {bad[:10].tolist()} outside 0..{num_classes - 1} and "
                           f"{ignore_index}; was it made by `python -m pearl.data prepare` (or the converter "
                           f"docs/datasets.md names) for this dataset?")
    return label


class SegmentationDataset:
    """A list of (image, label) paths with the dataset's label convention.

    ``__init__`` checks the layout before any model is loaded; ``__getitem__`` reads one sample.
    """

    def __init__(self, name: str, root: str | os.PathLike, max_images: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.name = canonical_dataset(name)
        self.max_pixels = max_pixels
        self.root = Path(root).expanduser().resolve()
        self.layout = BENCHMARKS[self.name]
        self.class_names = class_names(self.name)
        self.num_classes = len(self.class_names)
        self.reduce_zero_label = self.layout.reduce_zero_label
        self.ignore_index = self.layout.ignore_index
        self.items = self._list()
        self.total_images = len(self.items)
        if max_images is not None:
            self.items = self.items[:max_images]
        self._require_files()
        self.expected_images = self.layout.official_size

    def _require_files(self) -> None:
        """Every image and label to be evaluated exists (checked before any model is built)."""
        missing = [path for _, image, label in self.items for path in (image, label)
                   if path is not None and not path.is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} file(s) that dataset {self.name!r} lists are missing (e.g. "
                               f"{', '.join(str(p) for p in missing[:3])}); every listed image needs its file and "
                               f"its label, laid out as in {LAYOUT_HELP}: restore them, or remove their ids")

    def _missing(self, what: list[Path]) -> DatasetError:
        return DatasetError(
            f"dataset {self.name!r} not found under data_root={self.root}: missing "
            + ", ".join(str(p) for p in what)
            + f". Set data_root (or $PEARL_DATA) to the folder that holds it, laid out as in {LAYOUT_HELP}"
            + CHECK_HINT.format(name=self.name))

    def _list(self) -> list[tuple[str, Path, Path]]:
        layout = self.layout
        image_dir, label_dir = self.root / layout.image_dir, self.root / layout.label_dir
        missing = [p for p in (image_dir, label_dir) if not p.is_dir()]
        if layout.split_file and not (self.root / layout.split_file).is_file():
            missing.append(self.root / layout.split_file)
        if missing:
            raise self._missing(missing)
        if layout.split_file:
            split = self.root / layout.split_file
            ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
            if not ids:
                raise DatasetError(f"split file {split} lists no image ids; restore it from the dataset's archive")
            duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
            if duplicates:
                raise DatasetError(f"split file {split} lists {len(duplicates)} id(s) more than once (e.g. "
                                   f"{', '.join(duplicates[:5])}); each image must be evaluated once: remove the "
                                   f"repeats")
            items = [(i, image_dir / f"{i}{layout.image_suffix}", label_dir / f"{i}{layout.label_suffix}") for i in ids]
        else:
            images = sorted(p for p in image_dir.rglob(f"*{layout.image_suffix}") if p.is_file())
            items = []
            for path in images:
                rel = path.relative_to(image_dir).as_posix()[: -len(layout.image_suffix)]
                items.append((rel, path, label_dir / f"{rel}{layout.label_suffix}"))
        if not items:
            raise DatasetError(f"dataset {self.name!r} under {self.root} lists no images "
                               f"({image_dir}/*{layout.image_suffix}); see {LAYOUT_HELP}")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> dict:
        """What identifies the evaluated data: the label convention and, for every evaluated item,
        its id and its files' names and content digests (a changed, added or removed file changes
        it, a corrected label of the same size too); digests are cached (``pearl.data.digests``)."""
        files = [path for _, image, label in self.items for path in (image, label) if path is not None]
        digests = content_digests(self.root, files)
        digest = hashlib.sha256()
        for sample_id, image_path, label_path in self.items:
            for path in (image_path, label_path):
                content = digests[path] if path is not None else ""
                digest.update(f"{sample_id}\0{path.name if path else ''}\0{content}\n".encode())
        return {"name": self.name, "reduce_zero_label": self.reduce_zero_label, "split_size": self.total_images,
                "evaluated": len(self.items), "files_sha256": digest.hexdigest()}

    def typical_size(self) -> tuple[int, int]:
        """(H, W) of a typical image of the benchmark (what memory estimates plan for)."""
        return self.layout.typical_size

    def __getitem__(self, index: int) -> Sample:
        sample_id, image_path, label_path = self.items[index]
        image = read_image(image_path, self.max_pixels)
        label = read_label(label_path, self.num_classes, self.reduce_zero_label, self.max_pixels, self.ignore_index)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label {label_path} is {label.shape[1]}×{label.shape[0]} but image {image_path} is "
                               f"{image.shape[1]}×{image.shape[0]}; labels must be at the image's resolution")
        return Sample(image, label, sample_id)


class FolderDataset(SegmentationDataset):
    """Any folder of images, optional masks (``<stem><mask_suffix>`` in ``masks``) and a class file."""

    IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

    def __init__(self, images: str | os.PathLike, classes: str | os.PathLike, masks: str | os.PathLike | None = None,
                 mask_suffix: str = ".png", reduce_zero_label: bool = False, max_images: int | None = None,
                 name: str = "folder", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        from ..protocols import parse_class_lines
        self.name = name
        self.max_pixels = max_pixels
        self.root = Path(images).expanduser().resolve()
        self.masks = Path(masks).expanduser().resolve() if masks else None
        classes_path = Path(classes).expanduser()
        for path, what in ((self.root, "image folder"), (classes_path, "class file")):
            if not path.exists():
                raise DatasetError(f"folder dataset: {what} {path} does not exist; set dataset.images / "
                                   f"dataset.classes (see {LAYOUT_HELP})")
        if self.masks is not None and not self.masks.is_dir():
            raise DatasetError(f"folder dataset: mask folder {self.masks} does not exist; set dataset.masks or null")
        self.class_names = parse_class_lines(classes_path.read_text(encoding="utf-8"))
        self.num_classes = len(self.class_names)
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = 255
        self.mask_suffix = mask_suffix
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in self.IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise DatasetError(f"folder dataset: no images ({', '.join(self.IMAGE_SUFFIXES)}) under {self.root}")
        self.items = [(p.relative_to(self.root).with_suffix("").as_posix(), p,
                       (self.masks / p.relative_to(self.root).with_suffix("")).with_name(p.stem + mask_suffix)
                       if self.masks else None) for p in paths]
        counts = Counter(sample_id for sample_id, _, _ in self.items)
        shared = [path for sample_id, path, _ in self.items if counts[sample_id] > 1]
        if shared:
            raise DatasetError(f"folder dataset: {', '.join(str(p) for p in shared[:4])} differ only in their suffix: "
                               f"one id (and one mask, <id>{mask_suffix}) for several images; rename or remove one")
        self.total_images = len(self.items)
        if max_images is not None:
            self.items = self.items[:max_images]
        self._require_files()
        self.expected_images = None

    def __getitem__(self, index: int) -> Sample:
        sample_id, image_path, label_path = self.items[index]
        if label_path is None:
            return Sample(read_image(image_path, self.max_pixels), None, sample_id)
        return super().__getitem__(index)

    def typical_size(self) -> tuple[int, int]:
        """(H, W) of the folder's largest image by file size (read from its header)."""
        largest = max((path for _, path, _ in self.items), key=lambda path: path.stat().st_size)
        try:
            with _pillow_unlimited(), Image.open(largest) as handle:
                return handle.height, handle.width
        except (OSError, ValueError):  # unreadable: its own turn reports it; plan for a typical photo
            return BENCHMARKS["voc21"].typical_size

    def fingerprint(self) -> dict:
        return super().fingerprint() | {"class_lines": list(self.class_names), "masks": str(self.masks),
                                        "mask_suffix": self.mask_suffix}


def default_data_root() -> Path:
    """Where the benchmarks are when no root is given: ``$PEARL_DATA``, else ``./data``."""
    return Path(os.environ.get("PEARL_DATA", "./data"))


def build_dataset(name: str, root: str | os.PathLike | None = None, max_images: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, **folder_options) -> SegmentationDataset:
    """A benchmark by name under ``root`` (default ``$PEARL_DATA`` or ``./data``), or ``folder``."""
    if name == "folder":
        return FolderDataset(max_images=max_images, max_pixels=max_pixels, **folder_options)
    root = root if root is not None else default_data_root()
    return SegmentationDataset(name, root, max_images, max_pixels)
