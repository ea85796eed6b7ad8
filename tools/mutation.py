"""Mutation pass: plausible one-line slips, each run against the test suite; a slip that no test
notices "survives" and needs a test.

    python tools/mutation.py                 # every slip; prints killed / survived and the score
    python tools/mutation.py --only rescale  # slips whose name contains "rescale"

Each slip is applied to a fresh copy of the repository (the working tree is never touched). The
tests most likely to notice it run first with ``-x``; a slip they miss runs the whole suite.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Slip(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    first: str  # the test file(s) to run first


SLIPS = [
    Slip("bgr-left", "pearl/data/datasets.py", "return np.ascontiguousarray(image[:, :, ::-1])",
         "return np.ascontiguousarray(image)", "tests/test_data.py"),
    Slip("rescale-round", "pearl/preprocess.py", "int(height * factor + 0.5), int(width * factor + 0.5)",
         "round(height * factor), round(width * factor)", "tests/test_preprocess.py"),
    Slip("rescale-nearest", "pearl/preprocess.py", "cv2.INTER_LINEAR", "cv2.INTER_NEAREST",
         "tests/test_preprocess.py"),
    Slip("mean-order", "pearl/preprocess.py", "CLIP_MEAN = (122.771, 116.746, 104.094)",
         "CLIP_MEAN = (104.094, 116.746, 122.771)", "tests/test_preprocess.py"),
    Slip("window-snap", "pearl/preprocess.py", "spans.append((max(end - crop, 0), end))",
         "spans.append((i * stride, end))", "tests/test_preprocess.py"),
    Slip("pos-size", "pearl/towers/base.py",
         "scale_factor=((grid_h + 0.1) / native_h, (grid_w + 0.1) / native_w)", "size=(grid_h, grid_w)",
         "tests/test_towers.py"),
    Slip("pos-bilinear", "pearl/towers/base.py", 'mode="bicubic", align_corners=False)',
         'mode="bilinear", align_corners=False)', "tests/test_towers.py"),
    Slip("gem-pos-no-antialias", "pearl/towers/base.py", 'antialias=positions == "size_antialias")',
         'antialias=False)', "tests/test_methods.py"),
    Slip("gem-temperature-unscaled", "pearl/methods/gem.py",
         "y.norm(dim=-1).mean(dim=-1)[:, None, None, None] * block.scale",
         "y.norm(dim=-1).mean(dim=-1)[:, None, None, None]", "tests/test_methods.py"),
    Slip("ns-regulariser", "pearl/procrustes.py", "y = gram / norm + 1e-6 * eye", "y = gram / norm",
         "tests/test_refine.py tests/test_methods.py"),
    Slip("pa-cls-weight", "pearl/procrustes.py", "weights[..., 0] = 0.0", "pass", "tests/test_methods.py"),
    Slip("pa-kk-uncentred", "pearl/procrustes.py", "logits.add_(k_centred @ k_centred.transpose(-1, -2).contiguous(),",
         "logits.add_(k @ k.transpose(-1, -2).contiguous(),", "tests/test_methods.py"),
    # (rotating the centred instead of the uncentred keys is an equivalent slip: it shifts each query's
    # logits by a constant, which the softmax removes; so the slip here uncentres the queries of M)
    Slip("pa-queries-uncentred", "pearl/procrustes.py", "cross = k_centred.transpose(-1, -2) @ q_centred",
         "cross = k_centred.transpose(-1, -2) @ q", "tests/test_methods.py"),
    Slip("sclip-average", "pearl/methods/sclip.py",
         "torch.softmax(before_softmax((k @ k.transpose(-1, -2)) * scale), dim=-1)",
         "torch.softmax(before_softmax((k @ k.transpose(-1, -2)) * scale), dim=-1) * 0.5", "tests/test_methods.py"),
    Slip("scclip-floored-map", "pearl/methods/scclip.py", "calibration.similarity_attention(sim_pre)",
         "calibration.similarity_attention(calibration.floored(sim_pre))", "tests/test_scclip.py"),
    Slip("scclip-zero-isolated", "pearl/methods/scclip.py", "guard=True)", "guard=False)", "tests/test_scclip.py"),
    Slip("resclip-prior-fp32", "pearl/methods/resclip.py", "return priors.half().to(dtype)[:, None]",
         "return priors.to(dtype)[:, None]", "tests/test_resclip.py"),
    Slip("resclip-rcs-blocks", "pearl/methods/resclip.py", "range(RCS_BLOCKS[0] - 1, RCS_BLOCKS[1])",
         "range(RCS_BLOCKS[0], RCS_BLOCKS[1] + 1)", "tests/test_resclip.py"),
    Slip("resclip-sfr-after-omega", "pearl/methods/naclip.py",
         "before_softmax((k @ k.transpose(-1, -2)) * block.scale) + bias",
         "before_softmax((k @ k.transpose(-1, -2)) * block.scale + bias)",
         "tests/test_resclip.py"),
    Slip("timm-sub-ln-skipped", "pearl/towers/timm_vit.py",
         "attn.proj(attn.norm(heads_out.transpose(1, 2)", "attn.proj((heads_out.transpose(1, 2)",
         "tests/test_registry.py"),
    Slip("timm-pool-no-mlp", "pearl/towers/timm_vit.py", "return out if pool.mlp is None else",
         "return out if pool.mlp is not None else", "tests/test_timm_towers.py"),
    Slip("timm-rope-native-table", "pearl/towers/timm_vit.py", "rope._build_embed_cat(list(grid), rope.bands)",
         "rope._build_embed_cat(list(native), rope.bands)", "tests/test_timm_towers.py"),
    Slip("timm-positions-after-prefix", "pearl/towers/timm_vit.py",
         "table_prefix = 0 if trunk.no_embed_class else self.prefix_tokens", "table_prefix = 0",
         "tests/test_timm_towers.py"),
    Slip("lposs-graph-one-sided", "pearl/propagation.py", "symmetric = (affinity + affinity.t()).coalesce()",
         "symmetric = affinity.coalesce()", "tests/test_propagation.py"),
    Slip("lposs-diagonal-kept", "pearl/propagation.py", "off_diagonal = rows != cols", "off_diagonal = rows >= 0",
         "tests/test_propagation.py"),
    Slip("lposs-cg-no-early-stop", "pearl/propagation.py",
         "active = active & (residual.norm(dim=0) > threshold)", "active = active", "tests/test_propagation.py"),
    Slip("lposs-cg-stopped-direction-kept", "pearl/propagation.py",
         "direction = torch.where(active, direction, torch.zeros_like(direction))", "direction = direction",
         "tests/test_propagation.py"),
    Slip("lposs-resampled-not-renormalised", "pearl/methods/lposs.py",
         "return F.normalize(resampled.permute(0, 2, 3, 1), dim=-1)", "return resampled.permute(0, 2, 3, 1)",
         "tests/test_reference_pipeline.py"),
    Slip("lposs-centres-at-corners", "pearl/methods/lposs.py",
         "corners = torch.tensor([(window.y1, window.x1) for window in windows], device=device)",
         "corners = torch.tensor([(window.y1, window.x1) for window in windows], device=device) - patch // 2",
         "tests/test_propagation.py"),
    Slip("lposs-plus-unnormalised", "pearl/refine/lposs_plus.py", "scale = degree.masked_fill(degree == 0, 1).rsqrt()",
         "scale = torch.ones_like(degree)", "tests/test_propagation.py"),
    Slip("lposs-values-as-keys", "pearl/methods/lposs.py", "features = vision.features(self.config.feature)",
         "features = vision.features('k')", "tests/test_reference_pipeline.py"),
    Slip("lposs-no-ffn", "pearl/methods/lposs.py", 'return value_block(tower, x, grid, "vanilla", info)',
         'return value_block(tower, x, grid, "reduced", info)', "tests/test_reference_pipeline.py"),
    Slip("cass-undo-std-corrected", "pearl/methods/cass.py", "RELEASED_UNDO_STD = (0.229, 0.224, 0.255)",
         "RELEASED_UNDO_STD = (0.229, 0.224, 0.225)", "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-not-squared", "pearl/methods/cass.py", "    if pixels.shape[-2] != pixels.shape[-1]:", "    if False:",
         "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-keys-not-stretched", "pearl/methods/cass.py",
         "vision = stretched_to(keys_on_grid(feedback.to(k.dtype), k.shape[1], grid), k, (1, 2, 3))",
         "vision = keys_on_grid(feedback.to(k.dtype), k.shape[1], grid)", "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-pairs-uncrossed", "pearl/methods/cass.py", '    if pairing == "released":',
         '    if pairing != "released":', "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-weight-is-cost", "pearl/methods/cass.py", "weight = 1 - costs[matched]", "weight = costs[matched]",
         "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-singular-values-kept", "pearl/methods/cass.py", "        if config.rescale_singular_values:",
         "        if False:", "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-diagonal-kept", "pearl/methods/cass.py", "        approx.fill_diagonal_(0)", "        approx = approx",
         "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-no-gaussian", "pearl/methods/cass.py",
         "attn = torch.softmax(attn + neighbourhood_bias_like(grid, self.config.gauss_std, 0, attn), dim=-1)",
         "attn = torch.softmax(attn, dim=-1)", "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-prompt-not-moved", "pearl/methods/cass.py",
         "adjusted = F.normalize((1 - weight) * text + weight * mean, dim=-1)", "adjusted = text",
         "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-window-cls-when-sliding", "pearl/segmentor.py",
         'if self.method.reads_image_embedding == "window" or self.windows.slide_crop <= 0:', "if True:",
         "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-global-ignored", "pearl/methods/cass.py", "weight = self.config.global_weight", "weight = 0.0",
         "tests/test_reference_pipeline.py -k cass"),
    Slip("cass-one-cluster", "pearl/methods/cass.py",
         'return torch.from_numpy(fcluster(tree, t=threshold, criterion="distance").astype(np.int64) - 1)',
         "return torch.zeros(len(x), dtype=torch.int64)", "tests/test_reference_pipeline.py -k cass"),
    Slip("glaclip-windows-apart", "pearl/joint.py",
         "        if any(seg.method.attends_across_windows for seg in self.segmentors):", "        if False:",
         "tests/test_vfm.py -k glaclip"),
    Slip("glaclip-empty-row-unfixed", "pearl/methods/glaclip.py", "        members[empty, empty + rows.start] = 1",
         "        members[empty, empty] = 1", "tests/test_methods.py -k glaclip"),
    Slip("glaclip-beta-per-image", "pearl/methods/glaclip.py",
         "beta = 1 + config.beta_alpha * math.log1p(windows) if config.dynamic_beta else config.beta",
         "beta = 1 + config.beta_alpha * math.log1p(1) if config.dynamic_beta else config.beta",
         "tests/test_reference_pipeline.py -k glaclip"),
    Slip("glaclip-negative-mean-kept", "pearl/methods/glaclip.py",
         "mean = similarity.mean(dim=-1, keepdim=True).clamp_min(0)", "mean = similarity.mean(dim=-1, keepdim=True)",
         "tests/test_methods.py -k glaclip"),
    Slip("glaclip-support-first-iteration", "pearl/methods/glaclip.py",
         "    return similarity, members.sum(dim=-1, keepdim=True)",
         "    return similarity, (F.normalize(queries, dim=-1) @ keys.T > config.anchor_threshold)"
         ".sum(-1, keepdim=True)",
         "tests/test_reference_pipeline.py -k glaclip"),
    Slip("glaclip-no-cut", "pearl/methods/glaclip.py",
         'logits = logits.masked_fill(logits < threshold, float("-inf"))', "logits = logits",
         "tests/test_reference_pipeline.py -k glaclip"),
    Slip("glaclip-keys-as-anchors", "pearl/methods/glaclip.py",
         "    similarity = anchored if config.anchors else queries @ keys.T", "    similarity = queries @ keys.T",
         "tests/test_reference_pipeline.py -k glaclip"),
    Slip("proxyclip-mean-over-batch", "pearl/methods/proxyclip.py", "similarity.mean(dim=(1, 2), keepdim=True)",
         "similarity.mean()", "tests/test_reference_pipeline.py"),
    Slip("proxyclip-no-renormalise", "pearl/vfm.py",
         "return renormalise(windows, clip_normalisation, vfm.normalisation).to(vfm.dtype)",
         "return windows.to(vfm.dtype)",
         "tests/test_reference_pipeline.py"),
    Slip("proxyclip-values-nearest", "pearl/methods/proxyclip.py", 'size=size, mode="bilinear", align_corners=False)',
         'size=size, mode="nearest")', "tests/test_reference_pipeline.py"),
    Slip("proxyclip-pad-patch", "pearl/methods/proxyclip.py", "pad_crops_to = 56", 'pad_crops_to = "patch"',
         "tests/test_reference_pipeline.py"),
    Slip("proxyclip-keep-negatives", "pearl/methods/proxyclip.py",
         'similarity.masked_fill(similarity < 0, float("-inf"))', "similarity", "tests/test_reference_pipeline.py"),
    Slip("vision-features-not-shared", "pearl/stages.py", "    if key not in computed:", "    if True:",
         "tests/test_vfm.py"),
    Slip("cg-from-zero", "pearl/refine/tlp.py", "    x = z.clone()", "    x = torch.zeros_like(z)",
         "tests/test_refine.py"),
    Slip("tlp-align-corners", "pearl/refine/tlp.py",
         'x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)',
         'x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)', "tests/test_refine.py"),
    Slip("tlp-round", "pearl/refine/tlp.py", "max(1, round(height / grid)), max(1, round(width / grid))",
         "max(1, height // grid), max(1, width // grid)", "tests/test_refine.py"),
    Slip("tlp-eps", "pearl/refine/tlp.py", "conf.clamp_min(cfg.eps) ** 2", "conf ** 2", "tests/test_refine.py"),
    Slip("tlp-grey", "pearl/refine/tlp.py", "0.299 * guide[:, 0] + 0.587 * guide[:, 1] + 0.114 * guide[:, 2]",
         "0.114 * guide[:, 0] + 0.587 * guide[:, 1] + 0.299 * guide[:, 2]", "tests/test_refine.py"),
    Slip("affinity-beta", "pearl/refine/tlp.py", "affinity = affinity + beta * torch.eye",
         "affinity = affinity + 0 * torch.eye", "tests/test_refine.py"),
    Slip("prob-thd-prefilter", "pearl/decision.py", "labels.masked_fill_(filtered.amax(dim=0) < prob_thd, 0)",
         "labels.masked_fill_(probs.amax(dim=0) < prob_thd, 0)", "tests/test_decision.py"),
    Slip("prob-thd-le", "pearl/decision.py", "labels.masked_fill_(filtered.amax(dim=0) < prob_thd, 0)",
         "labels.masked_fill_(filtered.amax(dim=0) <= prob_thd, 0)", "tests/test_decision.py"),
    Slip("area-ge", "pearl/decision.py", "(counts > area_thd * counts.sum())", "(counts >= area_thd * counts.sum())",
         "tests/test_decision.py"),
    Slip("area-background", "pearl/decision.py", "counts = argmax_counts[1:]", "counts = argmax_counts",
         "tests/test_decision.py"),
    Slip("synonym-sum", "pearl/decision.py", 'query_probs, "amax")', 'query_probs, "sum")',
         "tests/test_decision.py"),
    Slip("clearclip-pad-one-side", "pearl/segmentor.py",
         "return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2", "return 0, pad_w, 0, pad_h",
         "tests/test_reference_pipeline.py"),
    Slip("clearclip-fp32-canvas", "pearl/segmentor.py",
         "canvas_dtype = self.dtype if self.method.fuse_in_model_dtype else torch.float32",
         "canvas_dtype = torch.float32", "tests/test_segmentor.py"),
    Slip("clearclip-pad-whole", "pearl/segmentor.py",
         'if not self.method.pad_crops_to or self.windows.slide_crop <= 0:',
         "if not self.method.pad_crops_to:", "tests/test_reference_pipeline.py"),
    Slip("whole-one-step", "pearl/segmentor.py", "if self.method.whole_upsample_via_input or window_refiners:",
         "if window_refiners:", "tests/test_reference_pipeline.py"),
    Slip("fuse-sum", "pearl/segmentor.py",
         "return OriginalSizeLogits(canvas.div_(count), item.ori_shape, canvas_dtype)",
         "return OriginalSizeLogits(canvas, item.ori_shape, canvas_dtype)", "tests/test_reference_pipeline.py"),
    Slip("cache-key-tokens", "pearl/text.py", "_token_digest(tokenizer, tuple(queries), tuple(templates))):",
         '""):', "tests/test_segmentor.py"),
    Slip("cache-key-activation", "pearl/text.py", 'h.update(f"{name}\\0{module!r}\\0".encode())', "pass",
         "tests/test_segmentor.py"),
    Slip("prototype-no-renorm", "pearl/text.py", "return mean / mean.norm(dim=-1, keepdim=True)", "return mean",
         "tests/test_reference_pipeline.py"),
    Slip("metric-no-ignore", "pearl/metrics.py", "torch.where((chunk_gt >= 0) & (chunk_gt < c),",
         "torch.where((chunk_gt >= 0) & (chunk_gt <= 255),", "tests/test_metrics.py"),
    Slip("metric-mean-iou-zero", "pearl/metrics.py", '"mIoU": float(np.nanmean(iou) * 100)',
         '"mIoU": float(np.nansum(iou) / len(iou) * 100)', "tests/test_metrics.py"),
    Slip("reduce-zero-label", "pearl/data/datasets.py", "        label[label == 0] = ignore_index\n", "",
         "tests/test_data.py"),
    Slip("record-in-place", "pearl/records.py", '    tmp = path.with_name(f".{path.name}.{_writer()}.tmp")',
         "    tmp = path", "tests/test_identity_and_tables.py"),
    Slip("identity-without-max-images", "pearl/data/datasets.py",
         '"evaluated": len(self.items), "files_sha256"', '"files_sha256"', "tests/test_identity_and_tables.py"),
    Slip("cell-oldest", "pearl/tables.py", "r.finished_time))", "-r.finished_time.timestamp()))",
         "tests/test_identity_and_tables.py"),
    Slip("shard-overlap", "pearl/distributed.py", "range(size * rank // world, size * (rank + 1) // world)",
         "range(size * rank // world, min(size, size * (rank + 1) // world + 1))", "tests/test_harness.py"),
    Slip("lock-ignored", "pearl/runner.py", "    if lock is None:\n", "    if lock is None and False:\n",
         "tests/test_locks.py"),
    Slip("checkpoint-unrestricted", "pearl/checkpoints.py", "        if (module, name) in _ALLOWED:",
         "        import importlib\n        return getattr(importlib.import_module(module), name)\n"
         "        if (module, name) in _ALLOWED:", "tests/test_checkpoints.py"),
    Slip("truncation-unchecked", "pearl/data/datasets.py",
         "    if path.is_file():\n        if missing := _truncation(path):",
         "    if path.is_file():\n        if False and (missing := _truncation(path)):", "tests/test_data.py"),
]


def _run(folder: Path, tests: list[str]) -> bool:
    """Whether the tests pass in ``folder``."""
    env = {**os.environ, "PYTHONPATH": str(folder)}  # the copy's package, not an installed one
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=folder, capture_output=True, text=True, env=env)
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only the slips whose name contains this")
    args = parser.parse_args()
    slips = [s for s in SLIPS if args.only in s.name]
    survivors = []
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "repo"
        for name in subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                   text=True, check=True).stdout.splitlines():  # the sources, nothing built
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
        for slip in slips:
            target = copy / slip.path
            original = target.read_text(encoding="utf-8")
            if slip.old not in original:
                print(f"stale   {slip.name}: {slip.path} no longer contains the line", flush=True)
                survivors.append(slip.name)
                continue
            target.write_text(original.replace(slip.old, slip.new, 1), encoding="utf-8")
            start = time.perf_counter()
            survived = _run(copy, slip.first.split()) and _run(copy, ["tests", "-m", "slow or not slow"])
            target.write_text(original, encoding="utf-8")
            print(f"{'SURVIVED' if survived else 'killed  '} {slip.name} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            if survived:
                survivors.append(slip.name)
    killed = len(slips) - len(survivors)
    print(f"mutation score: {killed}/{len(slips)} killed" + (f"; survived: {', '.join(survivors)}" if survivors
                                                              else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
