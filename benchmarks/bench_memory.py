"""Peak memory of one very large image: segment and score it as the runner does, per method.

    python benchmarks/bench_memory.py                       # 6000×4000, VOC21 vocabulary, tiny model, CPU
    python benchmarks/bench_memory.py --untiled             # the same with the original-size tiling off
    python benchmarks/bench_memory.py --size 3000x2000 --methods pearl

Each configuration runs in its own process, so each peak RSS (``ru_maxrss``) is that run's alone.
Random weights: the figures are about memory and time, the labels mean nothing.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from child_process import measure_in_child


def _measure(method: str, width: int, height: int, untiled: bool) -> dict:
    import cv2
    import torch
    from skimage import data

    import pearl
    from pearl import fused
    from pearl.loading import tiny_clip
    from pearl.metrics import ConfusionMatrix
    from pearl.protocols import class_names

    if untiled:
        fused.FULL_SIZE_BUDGET = 2 ** 62
    model, tokenizer = tiny_clip()
    classes = class_names("voc21", method)
    seg = pearl.Segmentor(model, classes, method=method, tokenizer=tokenizer,
                          text_cache_dir="", **pearl.protocol(method, "voc21"))
    image = cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_LINEAR)
    label = torch.from_numpy((image[:, :, 0] // 13).astype("int64"))  # any map with values 0..19
    cm = ConfusionMatrix(len(classes))
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = seg.predict(image, on_device=True)
    cm.update(out.labels, label)
    seconds = time.perf_counter() - start
    return {"method": method, "queries": seg.vocabulary.num_queries, "classes": len(classes),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "before_image_gib": baseline_kib / 2 ** 20, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT of the image (default 6000x4000)")
    parser.add_argument("--methods", default="pearl,vanilla,sclip,naclip,clearclip,sfp")
    parser.add_argument("--untiled", action="store_true", help="hold every Q×H×W tensor whole (the old behaviour)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(_measure(args.child, width, height, args.untiled)))
        return
    print(f"image {width}×{height}, VOC21 vocabulary, tiny random-weight model, CPU, "
          f"{'untiled' if args.untiled else 'tiled above the budget'}")
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--size", args.size, "--child", method] + (["--untiled"] * args.untiled)
        r, failure = measure_in_child(command)
        if r is None:
            print(f"{method:10s} {failure}")
            continue
        print(f"{r['method']:10s} queries={r['queries']:3d}  peak RSS {r['peak_rss_gib']:5.2f} GiB "
              f"(before predict {r['before_image_gib']:.2f} GiB)  {r['seconds']:6.1f} s per image")


if __name__ == "__main__":
    main()
