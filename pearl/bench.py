"""Speed benchmark: the evaluation path against a per-window reference loop (docs/speed.md §1).

    python -m pearl.bench --quick                           # a few minutes on a CPU
    python -m pearl.bench --device cuda --precision fp16    # every method, PA and TLP on and off

For each method × PA × TLP and each benchmark size (the typical image of VOC, ADE20K, Cityscapes
at each method's own protocol for that dataset) it prints and writes as CSV: images/s of the
evaluation path (``predict_jointly`` on ``--batch-images`` images at a time, inputs prepared as the
data-loader workers prepare them) and of the reference loop (one batch-1 forward per window, each
window's logits upsampled and added on its own, one image at a time: the released
implementations' structure), the speed-up, milliseconds per stage, PA's and TLP's share of the
per-image time, the backbone's achieved TFLOP/s and peak memory. Random weights (the default,
``--pretrained none``) time the same computation as real ones; any figure they give is a speed
figure, never a result.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from .benchmarks import BENCHMARKS, DATASETS
from .decision import Prediction
from .errors import UserError
from .fused import OriginalSizeLogits
from .joint import predict_jointly
from .loading import PRECISIONS, load_clip, load_model, load_tokenizer, tiny_clip
from .methods import available_methods, get_method
from .preprocess import prepare_image
from .protocols import class_names
from .segmentor import Segmentor
from .settings import published_settings
from .stages import timing_stages
from .vfm import shared_vfm, vfm_for

SIZES = ("voc21", "ade20k", "cityscapes")
STAGES = ("preprocess", "backbone", "pa", "vfm", "fusion", "tlp", "decision")
QUICK_VARIANTS = (("pearl", True, True), ("pearl", False, False), ("naclip", False, False))
QUICK_SIZES = ("voc21", "ade20k")  # Cityscapes' 36 windows an image take minutes per variant on a CPU


def variants(entries: list[str]) -> list[tuple[str, bool, bool]]:
    """(``--methods`` entry, pa, tlp): PA on and off where the method has a query·key term, TLP on and off."""
    out = []
    for entry in entries:
        for pa in ((True, False) if get_method(method_entry(entry)[0]).has_query_key_term else (False,)):
            out.extend((entry, pa, tlp) for tlp in (True, False))
    return out


def bench_images(size: tuple[int, int], count: int) -> list[np.ndarray]:
    """``count`` real photographs (scikit-image's) resized to (H, W) = ``size``."""
    import cv2
    from skimage import data
    photos = (data.astronaut(), data.coffee(), data.chelsea())
    return [cv2.resize(photos[i % len(photos)], (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            for i in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reference_predict(seg: Segmentor, image) -> Prediction:
    """One image the released way: a batch-1 forward per window, each window's logits upsampled to
    the crop and added to the canvas on their own; then the same refinement and decision."""
    item = seg.prepare_image(image)
    hidden, positions = seg.method.needs_hidden_states, seg.method.position_interpolation
    # a last block that reads all the image's windows at once (GLA-CLIP) gets them in one forward
    batches = [list(item.windows)] if seg.method.attends_across_windows else [[window] for window in item.windows]
    windows = []
    for batch in batches:
        crops = torch.stack([seg.crop(item, window) for window in batch])
        windows.extend(seg.window_logits(seg.tower.trunk(crops, hidden, positions), None, [item.input] * len(batch))
                       [:, None])
    info = {"windows": len(item.windows)}
    if seg.windows.slide_crop <= 0:
        fused = seg.fuse(item, [windows[0][0]], info)
    else:
        dtype = seg.dtype if seg.method.fuse_in_model_dtype else torch.float32
        height, width = item.input.shape[1:]
        canvas = torch.zeros((seg.vocabulary.num_queries, height, width), dtype=dtype, device=seg.device)
        count = torch.zeros((1, height, width), dtype=dtype, device=seg.device)
        info["nan_windows"] = sum(int(torch.isnan(logits).any()) for logits in windows)
        windows = [logits[None] for logits in seg.across_windows(item, [logits[0] for logits in windows])]
        for window, logits in zip(item.windows, windows):
            left, right, top, bottom = seg.padding(window)
            crop_h, crop_w = window.y2 - window.y1, window.x2 - window.x1
            up = F.interpolate(logits, size=(crop_h + top + bottom, crop_w + left + right), mode="bilinear",
                               align_corners=False)[0, :, top:top + crop_h, left:left + crop_w]
            for refiner in seg.window_refiners:
                up = refiner.refine_window(up, item.input[:, window.y1:window.y2, window.x1:window.x2])
            canvas[:, window.y1:window.y2, window.x1:window.x2] += up
            count[:, window.y1:window.y2, window.x1:window.x2] += 1
        fused = OriginalSizeLogits(canvas / count, item.ori_shape, dtype)
    return seg.decision(seg.refine(item, fused, info), info)


class StageTimes:
    """Wall time per stage of the prediction (synchronised on CUDA), through the stages' public hook
    (``pearl.stages.timing_stages``)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, defaultdict(float)
        self._open: list[list[float]] = []  # per running stage: [its start, the time of the stages within it]

    def timing(self):
        """A context within which every stage of every prediction is timed into ``totals``."""
        return timing_stages(self._timed)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        _sync(self.device)
        self._open.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            _sync(self.device)
            start, within = self._open.pop()
            elapsed = time.perf_counter() - start
            self.totals[stage] += elapsed - within
            if self._open:
                self._open[-1][1] += elapsed

    def per_image_ms(self, images: int) -> dict:
        """Milliseconds per image per stage, each stage's own: one run within another (PA and
        ProxyCLIP's vision model in the backbone, LPOSS's vision model in the fusion) is taken out of
        the enclosing stage's figure."""
        return {stage: 1000 * self.totals.get(stage, 0.0) / images for stage in STAGES}


class PeakMemory:
    """Peak CUDA allocation and peak host RSS (Linux: VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> tuple[float | None, float | None]:
        """(CUDA GiB or None, host GiB or None)."""
        cuda = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None
        host = None
        with contextlib.suppress(OSError, IndexError, ValueError):
            status = Path("/proc/self/status").read_text()
            host = int(status.split("VmHWM:")[1].split()[0]) / 2 ** 20  # kB → GiB
        return cuda, host


def backbone_flops(seg: Segmentor, prepared) -> float:
    """Floating-point operations of the backbone (trunk and last block) for one prepared image."""
    from torch.utils.flop_counter import FlopCounterMode
    item = seg.prepare_image(prepared)
    crops = torch.stack([seg.crop(item, window) for window in item.windows])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        seg.tower.dense_features(crops, seg.method, feedback=seg.window_feedback())
    return float(counter.get_total_flops())


def gemm_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a size × size matrix product in ``dtype`` on ``device``, the fastest of ``repeats``
    after a warm-up: about the most the backbone's matrix products can reach here."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times[1:])


def speedup_ceiling(row: dict, peak_flops: float) -> float | None:
    """The most the evaluation path could be faster than the loop on this machine: the loop's time per
    image over the path's with the backbone (last block and PA included) at ``peak_flops`` and every
    other device stage (fusion, TLP, decision) as measured. None without a loop. Where the backbone
    ran faster than ``peak_flops`` (a shared machine's matrix product timed in a slow moment), its
    own time is the best case."""
    if not row.get("reference_images_per_s"):
        return None
    other_ms = sum(row[f"ms_{stage}"] for stage in ("fusion", "tlp", "decision"))
    measured_ms = row["ms_backbone"] + row["ms_pa"] + row["ms_vfm"]
    backbone_ms = min(1000 * row["backbone_gflop"] * 1e9 / peak_flops, measured_ms)
    best_ms = backbone_ms + other_ms
    return 1000 / row["reference_images_per_s"] / best_ms


def _fast(segs: list[Segmentor], prepared: list, batch_images: int) -> None:
    for start in range(0, len(prepared), batch_images):
        batch = prepared[start:start + batch_images]
        predictions = predict_jointly(segs, batch, on_device=True)
        for _ in batch:
            next(predictions)  # released before the next image's are made, as the runner releases them


def _timed_fast(segs: list[Segmentor], prepared: list, batch_images: int, device: torch.device) -> float:
    """Seconds of one synchronised pass of the evaluation path over ``prepared``."""
    _sync(device)
    start = time.perf_counter()
    _fast(segs, prepared, batch_images)
    _sync(device)
    return time.perf_counter() - start


def measure(seg: Segmentor, images: list[np.ndarray], batch_images: int, repeats: int, reference: bool) -> dict:
    """Figures of one segmentor on ``images``: path and loop timed alternately ``repeats`` times
    (medians), then one pass with stage timing, one FLOP count."""
    device = seg.device
    prepared = [seg.preprocess(image) for image in images]
    _fast([seg], prepared[:1], 1)  # warm-up (allocator, kernels)
    if reference:
        reference_predict(seg, images[0])
    fast_s, loop_s = [], []
    memory = PeakMemory(device)
    peaks = {}
    for _ in range(repeats):
        memory.reset()
        fast_s.append(_timed_fast([seg], prepared, batch_images, device))
        peaks["fast"] = memory.read()
        if reference:
            memory.reset()
            start = time.perf_counter()
            for image in images:
                reference_predict(seg, image)
            _sync(device)
            loop_s.append(time.perf_counter() - start)
            peaks["loop"] = memory.read()
    stages = StageTimes(device)
    start = time.perf_counter()
    for image in images:
        prepare_image(image, seg.windows, seg.normalisation)
    stages.totals["preprocess"] = time.perf_counter() - start
    with stages.timing():
        _fast([seg], prepared, batch_images)
    ms = stages.per_image_ms(len(images))
    per_image_ms = 1000 * statistics.median(fast_s) / len(images)
    flops = backbone_flops(seg, prepared[0])
    row = {
        "windows_per_image": len(seg.prepare_image(prepared[0]).windows),
        "images_per_s": len(images) / statistics.median(fast_s),
        "reference_images_per_s": len(images) / statistics.median(loop_s) if loop_s else None,
        **{f"ms_{stage}": value for stage, value in ms.items()},
        "pa_tlp_share": (ms["pa"] + ms["tlp"]) / sum(ms[s] for s in STAGES if s != "preprocess"),
        "ms_per_image": per_image_ms,
        "backbone_gflop": flops / 1e9,
        "backbone_tflops": (flops / (ms["backbone"] + ms["pa"] + ms["vfm"]) / 1e9
                            if ms["backbone"] > 0 else None),
        "peak_cuda_gib": peaks["fast"][0], "peak_rss_gib": peaks["fast"][1],
        "reference_peak_cuda_gib": peaks.get("loop", (None, None))[0],
        "reference_peak_rss_gib": peaks.get("loop", (None, None))[1],
    }
    row["speedup"] = (row["images_per_s"] / row["reference_images_per_s"]) if loop_s else None
    return row


def bench_model(name: str, pretrained: str | None, device: torch.device, precision: str):
    """(model, tokenizer) to time: ``tiny``, the named weights, or (``pretrained`` None) the
    architecture with random weights drawn from seed 0, the same in every process, so that their
    text prototypes are found in the cache after the first run."""
    torch.manual_seed(0)
    if name == "tiny":
        return tiny_clip()
    if pretrained is not None:
        return load_clip(name, pretrained, device, precision)
    return load_model(name, None, device, precision), _random_weights_tokenizer(name)


def _random_weights_tokenizer(name: str):
    """The model's own tokenizer, or where it cannot be loaded here (SigLIP's needs ``transformers``
    and the Hub) CLIP's BPE at the model's context length: with random weights the prototypes mean
    nothing, and the image side, which is what is timed, is the same."""
    try:
        return load_tokenizer(name)
    except UserError as error:
        context = (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("context_length", 77)
        print(f"pearl.bench: {error}; timing with CLIP's BPE tokenizer at context {context} instead", flush=True)
        return open_clip.SimpleTokenizer(context_length=context)


def vision_argument(method: str, model: str, random_weights: bool, device: torch.device) -> dict:
    """``vfm=`` for a method that reads a second vision model (its own; tiny beside tiny): random
    weights (seed 0) where the CLIP weights are random, else its Hub weights."""
    name = vfm_for(method, None, model)
    return {"vfm": shared_vfm(name, None if random_weights else "hub", device)} if name else {}


# ``--methods naclip+resclip``: the host with the plug-in on; ``lposs+lposs_plus``: LPOSS+
PLUG_INS = {"resclip": {"resclip": True}, "lposs_plus": {"lposs_plus": True}}


def method_entry(entry: str) -> tuple[str, dict]:
    """(method, overrides) of a ``--methods`` entry: a method, or a method and a plug-in (``naclip+resclip``)."""
    method, plus, plug_in = entry.partition("+")
    get_method(method)
    if plus and plug_in not in PLUG_INS:
        raise ValueError(f"--methods {entry!r}: {plug_in!r} is not a plug-in; valid: {', '.join(PLUG_INS)}")
    return method, dict(PLUG_INS.get(plug_in, {}))


def bench_settings(entry: str, dataset: str, random_weights: bool) -> dict:
    """The settings of a ``--methods`` entry on ``dataset`` (its protocol, its plug-in's); with random
    weights one prompt template instead of 80: the prototypes' values mean nothing then, and their
    number (the queries), which is what the image side's cost depends on, is the same."""
    method, overrides = method_entry(entry)
    return published_settings(method, dataset, overrides=overrides) | (
        {"templates": "single"} if random_weights else {})


def sweep_cost(model, tokenizer, size: str, device: torch.device, args, images: int, repeats: int,
               random_weights: bool) -> float:
    """Time of the four-job sweep ``method=pearl pa=true,false tlp=true,false`` on one shared trunk,
    as a multiple of one job (PEARL's default) alone; printed and returned."""
    pictures = bench_images(BENCHMARKS[size].typical_size, images)
    segs = [Segmentor(model, class_names(size, "pearl"), method="pearl", pa=pa, tlp=tlp, tokenizer=tokenizer,
                      device=device, precision=args.precision, window_batch_size=args.window_batch_size,
                      **bench_settings("pearl", size, random_weights)) for pa in (True, False) for tlp in (True, False)]
    prepared = [segs[0].preprocess(image) for image in pictures]
    _fast(segs, prepared[:1], 1)
    one, four = [], []
    for _ in range(repeats):
        for group, times in (([segs[0]], one), (segs, four)):
            times.append(_timed_fast(group, prepared, args.batch_images, device))
    ratio = statistics.median(four) / statistics.median(one)
    print(f"{size:10s} sweep pearl pa=true,false tlp=true,false on one trunk: {ratio:.2f}× one job "
          f"({1000 * statistics.median(four) / images:.0f} vs {1000 * statistics.median(one) / images:.0f} ms/img; "
          f"4.00× evaluated one by one)", flush=True)
    return ratio


VOCABULARIES = (21, 59, 150, 459, 847)  # the query counts of VOC21, Context59, ADE20K, Context459, ADE-847


def vocabulary_costs(model, tokenizer, size: str, methods: list[str], queries: list[int], device: torch.device,
                     args, images: int, repeats: int, random_weights: bool) -> list[dict]:
    """Per-image time and peak memory of each method (its default PA / TLP, its ``size`` protocol)
    on ``size``'s typical image at each vocabulary size: ``queries`` class names of one query each
    (the image side's cost depends on their number, not their words). Printed and returned."""
    pictures = bench_images(BENCHMARKS[size].typical_size, images)
    memory, rows = PeakMemory(device), []
    for method in methods:
        for count in queries:
            name = method_entry(method)[0]
            seg = Segmentor(model, [f"class {index}" for index in range(count)], method=name, tokenizer=tokenizer,
                            device=device, precision=args.precision, window_batch_size=args.window_batch_size,
                            **vision_argument(name, args.model, random_weights, device),
                            **bench_settings(method, size, random_weights))
            prepared = [seg.preprocess(image) for image in pictures]
            _fast([seg], prepared[:1], 1)  # warm-up
            memory.reset()
            times = [_timed_fast([seg], prepared, args.batch_images, device) for _ in range(repeats)]
            cuda, host = memory.read()
            row = {"size": size, "method": method, "pa": seg.pa, "tlp": seg.tlp, "queries": count,
                   "ms_per_image": 1000 * statistics.median(times) / len(pictures), "peak_cuda_gib": cuda,
                   "peak_rss_gib": host}
            rows.append(row)
            print(f"{size:10s} {method:9s} {count:4d} queries  {row['ms_per_image']:8.0f} ms/img  peak "
                  f"{_format(cuda)} GiB cuda, {_format(host)} GiB host", flush=True)
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        print(f"{size:10s} {method:9s} {mine[-1]['queries']} vs {mine[0]['queries']} queries: "
              f"{mine[-1]['ms_per_image'] / mine[0]['ms_per_image']:.2f}× the time", flush=True)
    return rows


def _format(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table1_minutes(rows: list[dict]) -> dict[str, float]:
    """Minutes for Table 1 (each method measured × eight datasets, default PA/TLP), extrapolated from the
    measured images/s: each dataset at the measured size whose protocol it resembles (VOC and
    PASCAL Context: the VOC size; COCO and ADE20K: the ADE20K size; Cityscapes its own)."""
    like = {"voc21": "voc21", "voc20": "voc21", "context60": "voc21", "context59": "voc21",
            "coco_object": "ade20k", "coco_stuff": "ade20k", "ade20k": "ade20k", "cityscapes": "cityscapes"}
    speed = {(row["method"], row["size"]): row["images_per_s"] for row in rows if row["default"]}
    minutes = {}
    for method in sorted({method for method, _ in speed}):
        if all((method, like[d]) in speed for d in like):
            minutes[method] = sum(BENCHMARKS[d].official_size / speed[(method, like[d])] for d in like) / 60
    return minutes


def marginal_costs(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(method, size) → 1 − images/s at the method's default PA/TLP ÷ images/s with both off: the
    share of the per-image time that PA and TLP add, the resize to the original size (which
    every method pays, in TLP or in the decision) not counted; for methods whose default has
    either on and that were measured both ways."""
    speed = {(row["method"], row["size"], row["pa"], row["tlp"]): row for row in rows}
    costs = {}
    for row in rows:
        off = speed.get((row["method"], row["size"], False, False))
        if row["default"] and (row["pa"] or row["tlp"]) and off is not None:
            costs[(row["method"], row["size"])] = 1 - row["images_per_s"] / off["images_per_s"]
    return costs


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV at ``path`` (replaced whole, through a temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v)
                          for k, v in row.items()} for row in rows)
    partial.replace(path)


def _query_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--vocabularies {text!r}: expected query counts separated by commas, e.g. "
                         f"{','.join(map(str, VOCABULARIES))}") from None
    if min(counts) < 1:
        raise ValueError(f"--vocabularies {text!r}: every query count must be at least 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pearl.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture, or 'tiny' (default ViT-B-16)")
    parser.add_argument("--pretrained", default="none",
                        help="open_clip tag or checkpoint file; 'none' = random weights (speed only; default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--methods", default=",".join(available_methods()),
                        help="comma-separated (default all); also a method with a plug-in: naclip+resclip, "
                             "lposs+lposs_plus (LPOSS+)")
    parser.add_argument("--sizes", default=None,
                        help=f"benchmarks whose typical image size and protocol to time (default {','.join(SIZES)}; "
                             f"with --quick {','.join(QUICK_SIZES)})")
    parser.add_argument("--images", type=int, default=8, help="images per measurement (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed passes; medians (default 3)")
    parser.add_argument("--batch-images", type=int, default=8, help="images predicted together (default 8)")
    parser.add_argument("--window-batch-size", type=int, default=None,
                        help="windows per forward (default: 8 on a CPU, 64 on a GPU)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    parser.add_argument("--quick", action="store_true",
                        help=f"pearl (PA+TLP, neither) and naclip, 2 images, 1 repeat, sizes {','.join(QUICK_SIZES)}: "
                             f"a few minutes on a CPU")
    parser.add_argument("--out", default=None,
                        help="CSV written (default benchmarks/results.csv; with --vocabularies "
                             "benchmarks/vocabulary.csv)")
    parser.add_argument("--vocabularies", default=None, metavar="Q,Q,...",
                        help="instead of the variants: each method's time and peak memory per image at these "
                             f"query counts (e.g. {','.join(map(str, VOCABULARIES))}), on the first --sizes "
                             "benchmark's image (default ade20k)")
    args = parser.parse_args(argv)
    args.out = args.out or ("benchmarks/vocabulary.csv" if args.vocabularies else "benchmarks/results.csv")
    try:
        device = torch.device(args.device)
        sizes = (args.sizes or ",".join(QUICK_SIZES if args.quick else SIZES)).split(",")
        for size in sizes:
            if size not in BENCHMARKS:
                raise ValueError(f"--sizes: {size!r} is not one of {', '.join(BENCHMARKS)}")
        methods = args.methods.split(",")
        for method in methods:
            method_entry(method)
        if args.images < 1 or args.repeats < 1 or args.batch_images < 1:
            raise ValueError("--images, --repeats and --batch-images must be at least 1")
        queries = _query_counts(args.vocabularies) if args.vocabularies else None
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images, repeats = (2, 1) if args.quick else (args.images, args.repeats)
    todo = [] if queries else list(QUICK_VARIANTS) if args.quick else variants(methods)
    random_weights = args.pretrained == "none" or args.model == "tiny"
    weights = "random weights" if random_weights else args.pretrained
    plan = (f"{len(methods)} method(s) × {len(queries)} vocabularies" if queries
            else f"{len(todo)} variant(s) × {len(sizes)} size(s)")
    print(f"pearl.bench: loading {args.model} ({weights}) on {device}, {plan}", flush=True)
    model, tokenizer = bench_model(args.model, None if random_weights else args.pretrained, device, args.precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = gemm_peak_flops(device, PRECISIONS[args.precision])
    print(f"pearl.bench: {args.model} ({weights}), {args.precision}, {name}, torch {torch.__version__}; "
          f"{images} images per size, {repeats} repeat(s), batch_images={args.batch_images}; "
          f"a 2048² matrix product runs at {peak / 1e12:.3g} TFLOP/s", flush=True)
    if queries:
        size = args.sizes.split(",")[0] if args.sizes else "ade20k"
        rows = vocabulary_costs(model, tokenizer, size, methods, queries, device, args, images, repeats,
                                random_weights)
        for row in rows:
            row.update(device=name, model=args.model, weights=weights, precision=args.precision)
        write_csv(Path(args.out), rows)
        print(f"wrote {args.out}")
        return 0
    rows = []
    for size in sizes:
        pictures = bench_images(BENCHMARKS[size].typical_size, images)
        for entry, pa, tlp in todo:
            method = method_entry(entry)[0]
            cls = get_method(method)
            seg = Segmentor(model, class_names(size, method), method=method, pa=pa, tlp=tlp, tokenizer=tokenizer,
                            device=device, precision=args.precision, window_batch_size=args.window_batch_size,
                            **vision_argument(method, args.model, random_weights, device),
                            **bench_settings(entry, size, random_weights))
            row = {"device": name, "model": args.model, "weights": weights, "precision": args.precision,
                   "size": size, "height": pictures[0].shape[0], "width": pictures[0].shape[1], "method": entry,
                   "pa": pa, "tlp": tlp, "default": (pa, tlp) == (cls.default_pa, cls.default_tlp)}
            row.update(measure(seg, pictures, args.batch_images, repeats, not args.no_reference))
            row.update(gemm_peak_tflops=peak / 1e12, speedup_ceiling=speedup_ceiling(row, peak))
            rows.append(row)
            write_csv(Path(args.out), rows)  # after every measurement: a run cut short keeps its rows
            speedup = (f"{row['speedup']:.2f}× the loop (at most {row['speedup_ceiling']:.2f}×)" if row["speedup"]
                       else "no loop")
            stages = " ".join(f"{stage}={row['ms_' + stage]:.1f}" for stage in STAGES)
            print(f"{size:10s} {entry:9s} pa={pa!s:5s} tlp={tlp!s:5s} {row['windows_per_image']:3d} win  "
                  f"{row['images_per_s']:7.2f} img/s  {speedup}  ms/img: {stages}  PA+TLP "
                  f"{100 * row['pa_tlp_share']:.1f} %  backbone {_format(row['backbone_tflops'])} TFLOP/s  "
                  f"peak {_format(row['peak_cuda_gib'])} GiB cuda, {_format(row['peak_rss_gib'])} GiB host "
                  f"(loop {_format(row['reference_peak_rss_gib'])})", flush=True)
    if any(method == "pearl" for method, _, _ in todo):
        for size in sizes:
            sweep_cost(model, tokenizer, size, device, args, images, repeats, random_weights)
    for (method, size), cost in marginal_costs(rows).items():
        print(f"{size:10s} {method:9s} PA+TLP add {100 * cost:.1f} % of the per-image time (against both off)")
    minutes = table1_minutes(rows)
    for method, value in minutes.items():
        print(f"Table 1 extrapolated, {method} on the 8 datasets "
              f"({sum(BENCHMARKS[d].official_size for d in DATASETS)} images): {value:.1f} min")
    if minutes:
        print(f"Table 1 extrapolated, the {len(minutes)} methods measured: {sum(minutes.values()):.1f} min")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
