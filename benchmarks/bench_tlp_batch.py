"""Post-fusion TLP of equal-size images: one batched solve against one image at a time.

    python benchmarks/bench_tlp_batch.py                    # CPU, 8 VOC-size images, ViT-B/16 random weights
    python benchmarks/bench_tlp_batch.py --device cuda --precision fp16

Times fusion + TLP + decision (the window logits are computed once, before the clock) for
``--images`` random 500×375 images with PEARL's VOC21 protocol and vocabulary (56 queries), the
best of ``--repeats`` passes each way, and the largest difference of the refined logits. Random
weights: a speed figure, never a result. The Segmentor refines one image at a time on a CPU and in
batches on a GPU (``Segmentor.tlp_batch_values``; docs/speed.md §2); this is the measurement behind that.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pearl
    from pearl.joint import JointPrediction
    from pearl.refine.tlp import BATCHED_TLP_VALUES

    model, tokenizer = pearl.load_clip("ViT-B-16", None, args.device, args.precision)
    seg = pearl.Segmentor(model, pearl.class_names("voc21", "pearl"), method="pearl", tokenizer=tokenizer,
                          device=args.device, **pearl.protocol("pearl", "voc21"))
    rng = np.random.default_rng(0)
    items = [seg.prepare_image(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(args.images)]
    with torch.no_grad():
        window_logits = [[seg.window_logits(seg.tower.trunk(item.input[None]), None)[0]] for item in items]

        def timed(budget: int) -> tuple[float, list]:
            seg.together_values = budget
            groups = [list(range(len(items)))] if budget else [[index] for index in range(len(items))]
            best, outs = float("inf"), []
            for _ in range(args.repeats):
                start = time.perf_counter()
                outs = []
                for group in groups:  # fusion, refinement and decision of each group from its window logits
                    logits = [[list(one) for one in window_logits]]
                    done = JointPrediction([seg]).predict_group(items, logits, [{}], group, True)
                    outs += [done[index][0] for index in group]
                if seg.device.type == "cuda":
                    torch.cuda.synchronize(seg.device)
                best = min(best, time.perf_counter() - start)
            return 1000 * best / len(items), outs

        alone_ms, alone = timed(0)
        batched_ms, batched = timed(BATCHED_TLP_VALUES)
    difference = max((a.logits - b.logits).abs().max().item() for a, b in zip(alone, batched))
    print(f"{args.device} ({args.precision}), {len(items)} images 500×375, {seg.vocabulary.num_queries} queries: "
          f"fusion + TLP + decision {alone_ms:.1f} ms per image one at a time, {batched_ms:.1f} ms batched "
          f"({alone_ms / batched_ms:.2f}×); largest logit difference {difference:.2e}")


if __name__ == "__main__":
    main()
