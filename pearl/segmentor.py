"""Segmentor: image → rescale → windows → batched dense forward → fusion → refinement → decision.

The pipeline of docs/protocol.md §1–8 shared by every method; methods only supply the last block.
Windows of all images given to ``predict_batch`` are batched by shape into one forward each.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import params as param_specs
from .errors import ConfigError, ImageSizeError
from .fused import OriginalSizeLogits, WindowedImage, fits_whole, per_slab, upsample
from .loading import prepare_model
from .methods import get_method
from .preprocess import PreparedImage, Window, WindowConfig, prepare_image, sliding_windows
from .refine import Refiner, RefinerContext, build_refiners
from .settings import resolve_settings
from .stages import stage
from .text import Vocabulary, load_vocabulary, template_set, text_prototypes
from .towers import Trunk, tower_for


class Prediction:
    """One image's result. labels [H, W] long; probs [C, H, W] (before the area filter and prob_thd);
    logits [Q, H, W] (after refinement, before logit_scale); info: diagnostics.

    For an image whose Q×H×W exceeds ``FULL_SIZE_BUDGET`` the labels are decided in column slabs
    and ``probs`` / ``logits`` are computed when first read (docs/memory.md)."""

    def __init__(self, labels: torch.Tensor, probs, logits, info: dict | None = None) -> None:
        self.labels = labels
        self._probs, self._logits = probs, logits  # a tensor, or a function computing it
        self.info = info if info is not None else {}

    @property
    def probs(self) -> torch.Tensor:
        if callable(self._probs):
            self._probs = self._probs()
        return self._probs

    @property
    def logits(self) -> torch.Tensor:
        if callable(self._logits):
            self._logits = self._logits()
        return self._logits


def class_probabilities(logits: torch.Tensor, query_to_class: torch.Tensor, num_classes: int,
                        logit_scale: float) -> torch.Tensor:
    """[C, H, W]: softmax(logit_scale·L) over all queries (in L's dtype), then the max over each
    class's queries (no renormalisation); docs/protocol.md §8."""
    query_probs = torch.softmax(logits * logit_scale, dim=0)
    if logits.shape[0] == num_classes:
        return query_probs
    probs = torch.zeros((num_classes, *logits.shape[1:]), dtype=query_probs.dtype, device=logits.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)  # "in beta"
        return probs.index_reduce_(0, query_to_class, query_probs, "amax")  # probabilities ≥ 0: zeros are neutral


def area_keep(argmax_counts: torch.Tensor, area_thd: float) -> torch.Tensor:
    """[C − 1] 0/1: the foreground classes whose argmax area exceeds ``area_thd`` of all foreground
    argmax pixels (SCLIP/SFP's area filter)."""
    counts = argmax_counts[1:]
    return (counts > area_thd * counts.sum()).float()


def labels_from(probs: torch.Tensor, keep: torch.Tensor | None, prob_thd: float) -> torch.Tensor:
    """[H, W]: argmax over the kept classes (first index on ties); below ``prob_thd`` → 0."""
    filtered = probs
    if keep is not None:
        filtered = probs.clone()
        filtered[1:] *= keep.to(probs.dtype)[:, None, None]
    labels = filtered.argmax(dim=0)
    labels.masked_fill_(filtered.amax(dim=0) < prob_thd, 0)
    return labels


def top_query_labels(logits: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float,
                     prob_thd: float = 0.0) -> torch.Tensor:
    """[H, W] labels of ``decide`` without an area filter, from query logits [Q, H, W], without
    forming the [C, H, W] probabilities: the softmax is monotonic and the top class holds the top
    query, so the label is the top query's class and the top probability is
    exp(s·l_max − logsumexp(s·l)). Equal to ``decide``'s labels except where two values that
    differ in the logits round to one probability (docs/speed.md §2)."""
    top_logit, top_query = logits.max(dim=0)
    labels = query_to_class[top_query]
    if prob_thd > 0:
        scaled = logits * logit_scale
        top_prob = torch.exp(top_logit * logit_scale - torch.logsumexp(scaled, dim=0))
        labels.masked_fill_(top_prob < prob_thd, 0)  # not labels[mask] = 0: that syncs the device
    return labels


def decide(logits: torch.Tensor, query_to_class: torch.Tensor, num_classes: int, logit_scale: float,
           area_thd: float = 0.0, prob_thd: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [H, W], class probabilities [C, H, W]) from query logits [Q, H, W]; docs/protocol.md §8.

    ``class_probabilities``; optional area filter; argmax (first index on ties); pixels whose top
    probability is strictly below prob_thd → 0. The returned probabilities are pre-filter.
    """
    probs = class_probabilities(logits, query_to_class, num_classes, logit_scale)
    keep = None
    if area_thd > 0:
        keep = area_keep(torch.bincount(probs.argmax(dim=0).flatten(), minlength=num_classes), area_thd)
    return labels_from(probs, keep, prob_thd), probs


CPU_BATCH_ATTENTION = 8 * 197 ** 2  # query × key values per head of eight 224² ViT-B/16 windows


def default_window_batch_size(device: torch.device, tokens: int) -> int:
    """Windows of ``tokens`` tokens per forward when ``window_batch_size`` is not given: 64 on a GPU.
    On a CPU at most 8, and no more than hold eight 224² ViT-B/16 windows' attention
    (``CPU_BATCH_ATTENTION``): larger batches' temporaries fall out of the caches (Cityscapes'
    backbone 24 % slower at 64) and raise the peak memory above the per-window loop's (eight
    whole VOC images in one forward: +0.29 GiB for 4 % speed), so a whole VOC image or a 448²
    ClearCLIP window runs alone there (docs/speed.md §2)."""
    if device.type != "cpu":
        return 64
    return max(1, min(8, CPU_BATCH_ATTENTION // tokens ** 2))


@dataclass(frozen=True)
class DecisionConfig:
    """The decision rule's settings (docs/protocol.md §8); the parameters of the same names."""

    logit_scale: float = param_specs.default("logit_scale")
    prob_thd: float = param_specs.default("prob_thd")
    area_thd: float = param_specs.default("area_thd")


class Segmentor:
    """Training-free OVSS with a frozen open_clip model; see docs/api.md and the README.

    ``model`` is moved to ``device`` and, if ``precision`` differs from its own, converted, both
    in place. ``precision`` None keeps the model's own.
    """

    def __init__(self, model, classes: Sequence[str] | str | os.PathLike, method: str = "pearl",
                 pa: bool | None = None, tlp: bool | None = None, tokenizer=None, device: str | torch.device = "cpu",
                 precision: str | None = None, window_batch_size: int | None = None, diagnostics: bool = False,
                 **params) -> None:
        self.params = resolve_settings(method, pa, tlp, params)
        method_cls = get_method(method)
        # the one conversion from flat names to each stage's typed config
        build = param_specs.build_config
        self.method = method_cls(build(method_cls.Config, self.params, method_cls.config_prefix))
        self.windows = build(WindowConfig, self.params)
        self.decision = build(DecisionConfig, self.params)
        self.pa, self.tlp, self.pamr = self.params["pa"], self.params["tlp"], self.params["pamr"]
        self.device = torch.device(device)
        if window_batch_size is not None and window_batch_size < 1:
            raise ValueError(f"window_batch_size must be ≥ 1, got {window_batch_size}")
        self.window_batch_size = window_batch_size  # None: default_window_batch_size, per window shape
        self.diagnostics = diagnostics
        self.model = self._prepare_model(model, precision)
        self.tower = tower_for(self.model.visual)
        self.normalisation = self.tower.normalisation  # the tower's own mean/std
        patch = self.tower.patch_size
        if 0 < self.windows.slide_crop < patch:
            raise ConfigError(f"slide_crop={self.windows.slide_crop} is smaller than one {patch}-pixel patch of the "
                              f"model: a window must hold at least one patch; use slide_crop ≥ {patch}, or 0 for the "
                              f"whole image")
        if tokenizer is None:
            import open_clip
            tokenizer = open_clip.get_tokenizer("ViT-B-16")  # the CLIP BPE tokenizer, context 77
        self.vocabulary: Vocabulary = load_vocabulary(classes)
        self.prototypes = text_prototypes(self.model, tokenizer, self.vocabulary.queries, self.device,
                                          self.params["text_cache_dir"], template_set(self.params["templates"]))
        self.query_to_class = torch.tensor(self.vocabulary.query_to_class, device=self.device)
        self.refiners: list[Refiner] = build_refiners(
            self.params, RefinerContext(self.prototypes, self.dtype, self.device, diagnostics))
        # query × pixel values of equal-size images refined in one call (0: each alone); see refine_together
        self.together_values = max((refiner.together_values() for refiner in self.refiners), default=0)

    def _prepare_model(self, model, precision: str | None):
        return prepare_model(model, self.device, precision)

    @property
    def dtype(self) -> torch.dtype:
        return self.prototypes.dtype

    def preprocess(self, image) -> PreparedImage:
        """The CPU half of :meth:`predict`: RGB conversion, rescale, normalisation (data-loader
        workers run it; ``predict`` and ``predict_batch`` accept its result in place of an image)."""
        return prepare_image(image, self.windows, self.normalisation)

    def predict(self, image, on_device: bool = False) -> Prediction:
        """Segment one H×W×3 uint8 RGB image (numpy, PIL, grey or RGBA converted)."""
        return self.predict_batch([image], on_device=on_device)[0]

    def predict_batch(self, images: Sequence, on_device: bool = False) -> list[Prediction]:
        """Segment several images; their windows share batched forward passes.

        ``on_device=True`` leaves the outputs on the segmentor's device (no copy to the CPU).
        """
        return [outputs[0] for outputs in predict_jointly([self], images, on_device)]

    def trunk_key(self) -> tuple:
        """What blocks 1..L−1 of a window depend on: model, device, rescale and windows, the
        input's dtype and padding. Segmentors with equal keys can share one trunk."""
        return (id(self.model), self.device, self.windows, self.method.fuse_in_model_dtype and self.dtype,
                self.method.pad_crops_to_patch)

    def fuses_as(self, other: Segmentor) -> bool:
        """Whether ``other`` computes this segmentor's fused logits: one trunk, the same last block
        (method and its settings, PA included), text prototypes, model dtype and diagnostics, and
        TLP's settings where TLP runs inside the fusion (per window). Such segmentors differ only in
        what follows the fusion (post-fusion TLP, PAMR, the decision), so one fusion serves them."""
        return (self._fusion_settings() == other._fusion_settings()
                and self.prototypes.shape == other.prototypes.shape and torch.equal(self.prototypes, other.prototypes))

    def refiner(self, name: str) -> Refiner | None:
        """The refiner ``name`` ("tlp", "pamr") when it is on, else None."""
        return next((refiner for refiner in self.refiners if refiner.name == name), None)

    @property
    def window_refiners(self) -> list[Refiner]:
        """The refiners that refine each window before the fusion, in order."""
        return [refiner for refiner in self.refiners if refiner.per_window]

    @property
    def post_fusion_refiners(self) -> list[Refiner]:
        """The refiners of the fused logits at the original size, in order."""
        return [refiner for refiner in self.refiners if not refiner.per_window]

    def _fusion_settings(self) -> tuple:
        # a per-window refiner's state follows from its config and the prototypes
        return (self.trunk_key(), type(self.method), self.method.config, self.dtype, self.diagnostics,
                tuple((refiner.name, refiner.config) for refiner in self.window_refiners))

    def _decide(self, logits: OriginalSizeLogits, info: dict) -> Prediction:
        """The decision at the original size: whole, or in column slabs above ``FULL_SIZE_BUDGET``."""
        rule = (self.query_to_class, self.vocabulary.num_classes, self.decision.logit_scale)
        info["nan_images"] = torch.isnan(logits.source).any()  # a device flag: NaN reached the decision
        if fits_whole(logits.values):
            full = logits.full()
            if self.decision.area_thd > 0:
                labels, probs = decide(full, *rule, self.decision.area_thd, self.decision.prob_thd)
                return Prediction(labels, probs.float(), full.float(), info)
            labels = top_query_labels(full, self.query_to_class, self.decision.logit_scale, self.decision.prob_thd)
            return Prediction(labels, lambda: class_probabilities(full, *rule).float(), full.float(), info)
        width = per_slab(logits.source.shape[0] * logits.size[0])
        keep = None
        if self.decision.area_thd > 0:  # the filter needs the whole image's argmax areas first
            counts = torch.zeros(rule[1], dtype=torch.long, device=self.device)
            for _, slab in logits.column_slabs(width):
                counts += torch.bincount(class_probabilities(slab, *rule).argmax(dim=0).flatten(), minlength=rule[1])
            keep = area_keep(counts, self.decision.area_thd)
        labels = torch.empty(logits.size, dtype=torch.long, device=self.device)
        for start, slab in logits.column_slabs(width):
            labels[:, start:start + slab.shape[2]] = (
                labels_from(class_probabilities(slab, *rule), keep, self.decision.prob_thd) if keep is not None
                else top_query_labels(slab, self.query_to_class, self.decision.logit_scale, self.decision.prob_thd))
        return Prediction(labels, lambda: class_probabilities(logits.full(), *rule).float(),
                          lambda: logits.full().float(), info)

    def _to_cpu(self, out: Prediction) -> Prediction:
        def moved(value):
            return (lambda: value().cpu()) if callable(value) else value.cpu()
        info = {key: value.item() if isinstance(value, torch.Tensor) else value for key, value in out.info.items()}
        warn_nan_windows(info["nan_windows"], info["windows"], self.method.name)
        return Prediction(out.labels.cpu(), moved(out._probs), moved(out._logits), info)

    def _prepare_image(self, image) -> WindowedImage:
        prepared = image if isinstance(image, PreparedImage) else self.preprocess(image)
        tensor = prepared.input.to(self.device, non_blocking=True)
        if self.method.fuse_in_model_dtype:
            tensor = tensor.to(self.dtype)  # ClearCLIP casts its input before the window loop
        patch = self.tower.patch_size
        if min(tensor.shape[1:]) < patch:
            height, width = prepared.original_size
            raise ImageSizeError(f"image of size {width}×{height} is {tensor.shape[2]}×{tensor.shape[1]} "
                             f"after the rescale: smaller than one {patch}-pixel patch; use a larger image or "
                             f"resize_short")
        windows = sliding_windows(tensor.shape[1], tensor.shape[2], self.windows.slide_crop,
                                  self.windows.slide_stride)
        return WindowedImage(tensor, tuple(prepared.original_size), windows)

    def windows_per_forward(self, crop_shape: Sequence[int]) -> int:
        """Windows of ``crop_shape`` [3, h, w] batched in one forward: ``window_batch_size``, or when
        that is None, :func:`default_window_batch_size` for this device and their token count."""
        if self.window_batch_size is not None:
            return self.window_batch_size
        patch = self.tower.patch_size
        patches = (crop_shape[-2] // patch) * (crop_shape[-1] // patch)
        return default_window_batch_size(self.device, patches + self.tower.prefix_tokens)

    def _padding(self, window: Window) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding of a sliding-window crop: to a multiple of the
        patch size for ClearCLIP (``clearclip_segmentor.py`` ``compute_padsize``, called only in
        ``forward_slide``), none otherwise. A whole image is never padded (the patch conv drops
        the remainder, as upstream)."""
        if not self.method.pad_crops_to_patch or self.windows.slide_crop <= 0:
            return 0, 0, 0, 0
        patch = self.tower.patch_size
        pad_h, pad_w = (-(window.y2 - window.y1)) % patch, (-(window.x2 - window.x1)) % patch
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    def _crop(self, item: WindowedImage, window: Window) -> torch.Tensor:
        crop = item.input[:, window.y1:window.y2, window.x1:window.x2]
        padding = self._padding(window)
        return F.pad(crop, padding) if any(padding) else crop

    def _window_logits(self, shared: Trunk, stats: dict | None) -> torch.Tensor:
        """[N, Q, h', w'] cosine logits of this method's last block on a shared trunk."""
        info = {} if stats is not None else None
        feats = self.tower.head(shared, self.method, info)
        for key, value in (info or {}).items():
            stats[key].append(value)
        # contiguous: bilinear upsampling of the permuted (channels-last) view is several times slower
        return (feats.to(self.dtype) @ self.prototypes.T).permute(0, 3, 1, 2).contiguous()

    def _finish_images(self, items: list[WindowedImage], fused: list[OriginalSizeLogits], infos: list[dict],
                       on_device: bool) -> list[Prediction]:
        """Refinement and decision of equal-size images from their fused logits (not modified)."""
        with stage("tlp"):
            together = self._refine_together(items, fused)
            fused = together if together is not None else [
                self._refine(item, logits, info) for item, logits, info in zip(items, fused, infos)]
        with stage("decision"):
            outs = [self._decide(logits, info) for logits, info in zip(fused, infos)]
        return outs if on_device else [self._to_cpu(out) for out in outs]

    def _refine_together(self, items: list[WindowedImage], fused: list[OriginalSizeLogits]
                         ) -> list[OriginalSizeLogits] | None:
        """Several images refined in one call where one refiner alone refines the fused logits and no
        per-image diagnostics were asked for; None otherwise (then each image is refined alone)."""
        refiners = self.post_fusion_refiners
        if len(fused) > 1 and len(refiners) == 1 and not self.diagnostics:
            return refiners[0].refine_together(items, fused)
        return None

    def _fuse(self, item: WindowedImage, patch_logits: list, info: dict) -> OriginalSizeLogits:
        """Query logits [Q, H, W] at the original size from each window's [Q, h', w'] logits, each
        window refined first by the per-window refiners; docs/protocol.md §6.2–6.5."""
        window_refiners = self.window_refiners
        # a 0-dim tensor: read (a device sync) only when the prediction is copied to the CPU or the job ends
        info["nan_windows"] = torch.stack([torch.isnan(w).any() for w in patch_logits]).sum()
        height, width = item.input.shape[1:]
        if self.windows.slide_crop <= 0:
            logits = patch_logits[0]
            if self.method.whole_upsample_via_input or window_refiners:
                logits = upsample(logits, (height, width))
                for refiner in window_refiners:
                    logits = refiner.refine_window(logits, item.input)
            return OriginalSizeLogits(logits, item.ori_shape, logits.dtype)
        canvas_dtype = self.dtype if self.method.fuse_in_model_dtype else torch.float32
        canvas = torch.zeros((self.vocabulary.num_queries, height, width), dtype=canvas_dtype, device=self.device)
        count = torch.zeros((1, height, width), dtype=canvas_dtype, device=self.device)
        first = item.windows[0]  # every window of one image has the same size and padding
        left, right, top, bottom = self._padding(first)
        crop_h, crop_w = first.y2 - first.y1, first.x2 - first.x1
        padded = (crop_h + top + bottom, crop_w + left + right)
        # windows upsampled together, in slabs: all of ADE20K's six at once would hold 180 MB of
        # upsampled logits beside the canvas
        chunk = per_slab(self.vocabulary.num_queries * padded[0] * padded[1])
        for start in range(0, len(item.windows), chunk):
            upsampled = F.interpolate(torch.stack(patch_logits[start:start + chunk]), size=padded, mode="bilinear",
                                      align_corners=False)[:, :, top:top + crop_h, left:left + crop_w]
            for window, logits in zip(item.windows[start:start + chunk], upsampled):
                for refiner in window_refiners:
                    logits = refiner.refine_window(logits, item.input[:, window.y1:window.y2, window.x1:window.x2])
                canvas[:, window.y1:window.y2, window.x1:window.x2] += logits
                count[:, window.y1:window.y2, window.x1:window.x2] += 1
        return OriginalSizeLogits(canvas.div_(count), item.ori_shape, canvas_dtype)

    def _refine(self, item: WindowedImage, logits: OriginalSizeLogits, info: dict) -> OriginalSizeLogits:
        """The post-fusion refiners in order, sharing one guide (the input at the original size, fp32)."""
        guide = functools.cache(item.guide)
        for refiner in self.post_fusion_refiners:
            logits = refiner.refine(item, logits, guide, info)
        return logits


def warn_nan_windows(nan_windows: int, windows: int, method: str) -> None:
    """The warning for windows whose logits hold NaN, naming the method that made them."""
    if nan_windows:
        why = (" (SFP's released purification zeroes isolated outliers; sfp_nan_guard=True avoids it)"
               if method == "sfp" else "")
        warnings.warn(f"{nan_windows} of {windows} windows produced NaN logits in method {method}'s last block{why}",
                      RuntimeWarning, stacklevel=3)


def predict_jointly(segmentors: Sequence[Segmentor], images: Sequence, on_device: bool = False
                    ) -> Iterator[list[Prediction]]:
    """Per image (in order), one prediction per segmentor, computed on one shared trunk.

    The segmentors must have equal :meth:`Segmentor.trunk_key` (same model, device, rescale,
    windows, input dtype and padding): each image is prepared and cut into windows once, windows
    of equal shape (of all the images) are batched, blocks 1..L−1 run once per batch, and each
    segmentor's last block, fusion, refinement and decision run on that trunk (the last block and
    the fusion once for the segmentors that :meth:`Segmentor.fuses_as` one another); the post-fusion TLP
    of images of equal size is one batched solve on a GPU (``together_values``). The result of each
    segmentor is what it computes alone. Predictions are made a group of equal-size images at a
    time as the iterator advances, so only that group's are alive (docs/speed.md §2).
    """
    # not itself under torch.no_grad(): its generator wrapper would hold each yielded result until the
    # next is made, two images' predictions alive at once
    lead = segmentors[0]
    if any(seg.trunk_key() != lead.trunk_key() for seg in segmentors[1:]):
        raise ValueError("segmentors share a trunk only with the same model, device, rescale, windows, input dtype "
                         "and padding")
    prepared = [lead._prepare_image(image) for image in images]
    fusers = _fusers(segmentors)
    patch_logits, forward_info = _shared_window_logits([segmentors[i] for i in fusers], prepared)
    queries = max(seg.vocabulary.num_queries for seg in segmentors)
    budget = max(seg.together_values for seg in segmentors)
    ready: dict[int, list[Prediction]] = {}
    for image_index, group in enumerate(_equal_size_groups(prepared, queries, budget)):
        if image_index not in ready:  # the first image of its group: predict the group
            ready.update(_predict_group(segmentors, fusers, prepared, patch_logits, forward_info, group, on_device))
        # popped, and no other name holds them: once the consumer releases them they are freed
        yield ready.pop(image_index)


@torch.no_grad()
def _shared_window_logits(segmentors: Sequence[Segmentor], prepared: list[WindowedImage]) -> tuple[list, list[dict]]:
    """Each segmentor's [Q, h', w'] logits of every window of every image (per segmentor, image,
    window), blocks 1..L−1 run once per batch of equal-shape windows; and each one's forward
    diagnostics (means over the windows)."""
    lead = segmentors[0]
    patch_logits = [[[None] * len(item.windows) for item in prepared] for _ in segmentors]
    stats = [defaultdict(list) if seg.diagnostics else None for seg in segmentors]
    keep_hidden = any(seg.method.needs_hidden_states for seg in segmentors)
    for chunk in _window_batches(lead, prepared):
        with stage("backbone"):
            shared = lead.tower.trunk(torch.stack([crop for _, _, crop in chunk]), keep_hidden)
        for seg, logits_of, seg_stats in zip(segmentors, patch_logits, stats):
            with stage("backbone"):
                chunk_logits = seg._window_logits(shared, seg_stats)
            for (image_index, window_index, _), window_logits in zip(chunk, chunk_logits):
                logits_of[image_index][window_index] = window_logits
    forward_info = [{key: torch.stack(values).mean() for key, values in (seg_stats or {}).items()}
                    for seg_stats in stats]
    return patch_logits, forward_info


def _fusers(segmentors: Sequence[Segmentor]) -> dict[int, list[int]]:
    """Index of the segmentor that computes a fusion → the indices of all that use it (itself
    first): those for which :meth:`Segmentor.fuses_as` holds."""
    fusers: dict[int, list[int]] = {}
    for index, seg in enumerate(segmentors):
        owner = next((first for first in fusers if seg.fuses_as(segmentors[first])), index)
        fusers.setdefault(owner, []).append(index)
    return fusers


@torch.no_grad()
def _predict_group(segmentors, fusers: dict[int, list[int]], prepared: list[WindowedImage], patch_logits: list,
                   forward_info: list, group: list[int], on_device: bool) -> dict[int, list[Prediction]]:
    """image index → one prediction per segmentor, for the images of ``group``: each fusion made
    once, then refined and decided by every segmentor that uses it (one fusion alive at a time)."""
    items = [prepared[i] for i in group]
    per_segmentor: list[list[Prediction] | None] = [None] * len(segmentors)
    for (owner, users), logits_of, info in zip(fusers.items(), patch_logits, forward_info):
        infos = [dict(info, windows=len(item.windows)) for item in items]
        with stage("fusion"):
            fused = [segmentors[owner]._fuse(item, _take(logits_of, i), one)
                     for item, i, one in zip(items, group, infos)]
        for user in users:
            per_segmentor[user] = segmentors[user]._finish_images(items, fused, [dict(one) for one in infos],
                                                                  on_device)
        del fused
    return {index: [predictions[position] for predictions in per_segmentor] for position, index in enumerate(group)}


def _equal_size_groups(prepared: list[WindowedImage], queries: int, budget: int) -> list[list[int]]:
    """For each image, the indices of the images predicted with it: those of its original and
    input size, in order, up to ``budget`` query × pixel values together (0: each image alone)."""
    open_group: dict[tuple, list[int]] = {}
    of_image = []
    for index, item in enumerate(prepared):
        key = (tuple(item.ori_shape), tuple(item.input.shape))
        group = open_group.get(key)
        if group is None or (len(group) + 1) * queries * item.ori_shape[0] * item.ori_shape[1] > budget:
            group = open_group[key] = []
        group.append(index)
        of_image.append(group)
    return of_image


def _take(items: list, index: int):
    """items[index], leaving None in its place (this image's window logits are used once)."""
    value, items[index] = items[index], None
    return value


def _window_batches(seg: Segmentor, prepared: list[WindowedImage]) -> Iterator[list[tuple[int, int, torch.Tensor]]]:
    """Chunks of at most :meth:`Segmentor.windows_per_forward` (image index, window index, crop) of
    equal crop shape."""
    groups = defaultdict(list)
    for image_index, item in enumerate(prepared):
        for window_index, window in enumerate(item.windows):
            crop = seg._crop(item, window)
            groups[tuple(crop.shape)].append((image_index, window_index, crop))
    for shape, group in groups.items():
        size = seg.windows_per_forward(shape)
        for start in range(0, len(group), size):
            yield group[start:start + size]
