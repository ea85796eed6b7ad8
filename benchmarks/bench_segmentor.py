"""Throughput of the Segmentor per method: images/s, ms per stage, peak memory.

    python benchmarks/bench_segmentor.py --model tiny            # CPU smoke figures (random weights)
    python benchmarks/bench_segmentor.py --model ViT-B-16 --pretrained openai --device cuda --precision fp16

Prints one line per method × TLP. The stage times (forward = batched window passes, fuse,
refine, decide) come from timing the Segmentor's own stages with device synchronisation.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import pearl
from pearl import segmentor as seg_module
from pearl.backbone import tiny_clip


class StageTimer:
    """Wraps Segmentor stage methods and accumulates wall time (synchronised on CUDA)."""

    STAGES = ("_forward_windows", "_fuse", "_refine")

    def __init__(self, device: torch.device):
        self.device, self.totals = device, defaultdict(float)
        self._originals = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        for name in self.STAGES + ("decide",):
            owner = seg_module if name == "decide" else seg_module.Segmentor
            original = getattr(owner, name)
            self._originals[name] = (owner, original)

            def timed(*args, _original=original, _name=name, **kwargs):
                self._sync()
                start = time.perf_counter()
                out = _original(*args, **kwargs)
                self._sync()
                self.totals[_name.strip("_")] += time.perf_counter() - start
                return out
            setattr(owner, name, timed)
        return self

    def __exit__(self, *exc):
        for name, (owner, original) in self._originals.items():
            setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--dataset", default="context60", help="protocol (resize, windows) to use")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--methods", default=",".join(pearl.available_methods()))
    args = parser.parse_args()

    from skimage import data
    photos = [data.chelsea(), data.coffee(), data.astronaut()]
    images = [photos[i % 3] for i in range(args.images)]
    if args.model == "tiny":
        model, tokenizer = tiny_clip()
    else:
        model, tokenizer = pearl.load_clip(args.model, args.pretrained, args.device, args.precision)
    device = torch.device(args.device)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"model={args.model} precision={args.precision} dataset protocol={args.dataset} images={len(images)}")
    for method in args.methods.split(","):
        for tlp in (False, True):
            params = pearl.protocol(method, args.dataset)
            seg = pearl.Segmentor(model, pearl.class_names(args.dataset, method), method=method, tlp=tlp,
                                  tokenizer=tokenizer, device=device, **params)
            seg.predict(images[0], on_device=True)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with StageTimer(device) as timer:
                start = time.perf_counter()
                for image in images:
                    seg.predict(image, on_device=True)
                elapsed = time.perf_counter() - start
            stages = " ".join(f"{k}={1000 * v / len(images):.1f}ms" for k, v in timer.totals.items())
            peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB" if device.type == "cuda" else "n/a")
            print(f"{method:10s} tlp={str(tlp):5s} {len(images) / elapsed:7.2f} img/s  {stages}  peak={peak}")


if __name__ == "__main__":
    main()
