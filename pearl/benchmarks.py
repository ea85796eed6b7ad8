"""The benchmarks' facts, in one table: layout, split, official size, class file, label
convention, table column. Everything else (datasets, protocols, the synthetic generator, the
tables, Hydra's ``dataset=`` options) reads them from here; adding a benchmark is one entry plus
its class file (with ``protocol_like`` naming the benchmark whose published settings the methods
use on it, unless their protocol files get a row of their own). Layouts are MMSegmentation's,
or detectron2's where MMSegmentation has none (docs/datasets.md).

The paper's eight (``DATASETS``) fill the tables; the others (``EXTRA_DATASETS``: COCO-Stuff-10k,
PASCAL Context 459, ADE20K-847) evaluate like them but have no paper numbers, so no table column.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str              # the tables' column (as the paper's)
    official_size: int      # validation images of the official split
    class_stem: str         # resources/classes/<stem>.txt (and <stem>.<variant>.txt)
    image_dir: str          # under data_root
    label_dir: str
    image_suffix: str
    label_suffix: str
    split_file: str | None = None   # one id per line; None = every image under image_dir, sorted
    reduce_zero_label: bool = False  # label 0 ignored (255), k → k−1
    raw_label_values: int = 0       # distinct raw label values before reduce_zero_label (synthetic data)
    aliases: tuple[str, ...] = ()
    typical_size: tuple[int, int] = (375, 500)  # (H, W) of a typical validation image (pearl.bench times it)
    protocol_like: str | None = None  # whose published per-method settings to use where a method has none
    ignore_index: int = 255         # the label value that is not evaluated (65535 in 16-bit label files)
    in_paper: bool = True           # a column of the paper's tables


_VOC = dict(image_dir="VOCdevkit/VOC2012/JPEGImages", label_dir="VOCdevkit/VOC2012/SegmentationClass",
            image_suffix=".jpg", label_suffix=".png", split_file="VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
            official_size=1449, raw_label_values=21)
_CONTEXT = dict(image_dir="VOCdevkit/VOC2010/JPEGImages", label_dir="VOCdevkit/VOC2010/SegmentationClassContext",
                image_suffix=".jpg", label_suffix=".png",
                split_file="VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt", official_size=5105,
                raw_label_values=60)
_COCO = dict(image_dir="coco_stuff164k/images/val2017", label_dir="coco_stuff164k/annotations/val2017",
             image_suffix=".jpg", official_size=5000, raw_label_values=171, typical_size=(480, 640))

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("voc21", "VOC21", class_stem="voc21", **_VOC),
    Benchmark("context60", "PC60", class_stem="pc60", aliases=("pc60",), **_CONTEXT),
    Benchmark("coco_object", "Object", class_stem="coco_object", label_suffix="_instanceTrainIds.png", **_COCO),
    Benchmark("voc20", "VOC20", class_stem="voc20", reduce_zero_label=True, **_VOC),
    Benchmark("context59", "PC59", class_stem="pc59", reduce_zero_label=True, aliases=("pc59",), **_CONTEXT),
    Benchmark("coco_stuff", "Stuff", class_stem="coco_stuff", label_suffix="_labelTrainIds.png", **_COCO),
    Benchmark("cityscapes", "City", 500, "cityscapes", "cityscapes/leftImg8bit/val", "cityscapes/gtFine/val",
              "_leftImg8bit.png", "_gtFine_labelTrainIds.png", raw_label_values=19, aliases=("city", "city_scapes"),
              typical_size=(1024, 2048)),
    Benchmark("ade20k", "ADE", 2000, "ade20k", "ADEChallengeData2016/images/validation",
              "ADEChallengeData2016/annotations/validation", ".jpg", ".png", reduce_zero_label=True,
              raw_label_values=151, typical_size=(512, 683)),
    # evaluation sets beyond the paper (no paper numbers); docs/datasets.md, "Other evaluation sets"
    Benchmark("coco_stuff10k", "Stuff-10k", 1000, "coco_stuff", "coco_stuff10k/images/test2014",
              "coco_stuff10k/annotations/test2014", ".jpg", "_labelTrainIds.png", reduce_zero_label=True,
              raw_label_values=172, typical_size=(480, 640), protocol_like="coco_stuff", in_paper=False),
    Benchmark("context459", "PC459", 5105, "pc459", _CONTEXT["image_dir"],
              "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", ".jpg", ".tif", split_file=_CONTEXT["split_file"],
              raw_label_values=459, aliases=("pc459",), protocol_like="context59", ignore_index=65535, in_paper=False),
    Benchmark("ade847", "ADE-847", 2000, "ade847", "ADE20K_2021_17_01/images_detectron2/validation",
              "ADE20K_2021_17_01/annotations_detectron2/validation", ".jpg", ".tif", raw_label_values=847,
              aliases=("ade_full",), typical_size=(512, 683), protocol_like="ade20k", ignore_index=65535,
              in_paper=False),
)}
DATASETS: tuple[str, ...] = tuple(name for name, b in BENCHMARKS.items() if b.in_paper)  # the paper's column order
EXTRA_DATASETS: tuple[str, ...] = tuple(name for name, b in BENCHMARKS.items() if not b.in_paper)
ALL_DATASETS: tuple[str, ...] = DATASETS + EXTRA_DATASETS
DATASET_ALIASES: dict[str, str] = {alias: b.name for b in BENCHMARKS.values() for alias in b.aliases}
