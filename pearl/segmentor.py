"""Segmentor: image → rescale → windows → batched dense forward → fusion → refinement → decision.

The pipeline of docs/protocol.md §1–8 shared by every method; methods only supply the last block.
Windows of all images given to ``predict_batch`` are batched by shape into one forward each.
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import params as param_specs
from .errors import ConfigError, ImageSizeError
from .loading import prepare_model
from .methods import get_method
from .preprocess import PreparedImage, Window, WindowConfig, prepare_image, sliding_windows
from .refine.pamr import PAMRConfig, pamr
from .refine.tlp import (
    TLPConfig,
    pool_resized,
    pool_to_grid,
    pooling_strides,
    propagate,
    text_affinity,
    tlp,
    working_dtype,
)
from .settings import resolve_settings
from .stages import stage
from .text import Vocabulary, load_vocabulary, template_set, text_prototypes
from .towers import Trunk, tower_for

FULL_SIZE_BUDGET = 2 ** 28  # query × pixel values held at once at the original size (1 GiB in fp32)
SLAB_VALUES = 2 ** 24        # query × pixel values per column slab above that budget
BATCHED_TLP_VALUES = 2 ** 26  # on CUDA: query × pixel values of images whose post-fusion TLP is one batched solve


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


@dataclass
class _Image:
    input: torch.Tensor          # [3, H', W'] normalised, on device
    ori_shape: tuple[int, int]
    windows: list[Window]


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [C, h, w] to ``size`` (align_corners=False), as mmseg's ``resize``."""
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


@dataclass
class _OriginalSize:
    """Query logits at the original size [Q, H, W], held as the tensor ``source`` [Q, h, w] they are
    bilinearly upsampled from (then cast to ``dtype``), so that they never have to exist whole."""

    source: torch.Tensor
    size: tuple[int, int]
    dtype: torch.dtype

    @property
    def values(self) -> int:
        return self.source.shape[0] * self.size[0] * self.size[1]

    def full(self, queries: slice = slice(None)) -> torch.Tensor:
        source = self.source[queries]
        if tuple(source.shape[1:]) != tuple(self.size):
            source = _upsample(source, self.size)
        return source.to(self.dtype)

    def column_slabs(self, width: int):
        """(first column, [Q, H, width] logits) for consecutive column slabs.

        The bilinear kernel interpolates along the width first; that pass runs once over the whole
        width, the pass along the height per slab (fp32 logits: the full resize's values)."""
        height, full_width = self.size
        resized = tuple(self.source.shape[1:]) != tuple(self.size)
        across = (F.interpolate(self.source.float(), size=full_width, mode="linear", align_corners=False)
                  if resized else self.source)
        for start in range(0, full_width, width):
            slab = across[:, :, start:start + width]
            if resized:
                slab = F.interpolate(slab.transpose(1, 2), size=height, mode="linear",
                                     align_corners=False).transpose(1, 2)
            yield start, slab.to(self.dtype)


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
        self.tlp_config = build(TLPConfig, self.params, "tlp_")
        self.pamr_config = build(PAMRConfig, self.params, "pamr_")
        self.pa, self.tlp, self.pamr = self.params["pa"], self.params["tlp"], self.params["pamr"]
        self.device = torch.device(device)
        if window_batch_size is not None and window_batch_size < 1:
            raise ValueError(f"window_batch_size must be ≥ 1, got {window_batch_size}")
        self.window_batch_size = window_batch_size  # None: default_window_batch_size, per window shape
        # one batched TLP solve for equal-size images on a GPU (fewer kernel launches); on a CPU the
        # batched tensors fall out of the caches and it was slower (docs/speed.md §2), so none there
        self.tlp_batch_values = BATCHED_TLP_VALUES if self.device.type == "cuda" else 0
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
        self.affinity = (text_affinity(self.prototypes, self.tlp_config.tau_s, self.tlp_config.beta) if self.tlp
                         else None)

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

    def _fusion_settings(self) -> tuple:
        per_window_tlp = self.tlp and self.tlp_config.site == "per_window"
        return (self.trunk_key(), type(self.method), self.method.config, self.dtype, self.diagnostics,
                per_window_tlp and self.tlp_config)  # per-window TLP's affinity follows from it and the prototypes

    def _decide(self, logits: _OriginalSize, info: dict) -> Prediction:
        """The decision at the original size: whole, or in column slabs above ``FULL_SIZE_BUDGET``."""
        rule = (self.query_to_class, self.vocabulary.num_classes, self.decision.logit_scale)
        info["nan_images"] = torch.isnan(logits.source).any()  # a device flag: NaN reached the decision
        if logits.values <= FULL_SIZE_BUDGET:
            full = logits.full()
            if self.decision.area_thd > 0:
                labels, probs = decide(full, *rule, self.decision.area_thd, self.decision.prob_thd)
                return Prediction(labels, probs.float(), full.float(), info)
            labels = top_query_labels(full, self.query_to_class, self.decision.logit_scale, self.decision.prob_thd)
            return Prediction(labels, lambda: class_probabilities(full, *rule).float(), full.float(), info)
        width = max(1, SLAB_VALUES // (logits.source.shape[0] * logits.size[0]))
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

    def _prepare_image(self, image) -> _Image:
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
        return _Image(tensor, tuple(prepared.original_size), windows)

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

    def _crop(self, item: _Image, window: Window) -> torch.Tensor:
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

    def _finish_images(self, items: list[_Image], fused: list[_OriginalSize], infos: list[dict], on_device: bool
                       ) -> list[Prediction]:
        """Refinement and decision of equal-size images from their fused logits (not modified)."""
        with stage("tlp"):
            if self._batches_tlp(fused):
                fused = self._batched_tlp(items, fused)
            else:
                fused = [self._refine(item, logits, info) for item, logits, info in zip(items, fused, infos)]
        with stage("decision"):
            outs = [self._decide(logits, info) for logits, info in zip(fused, infos)]
        return outs if on_device else [self._to_cpu(out) for out in outs]

    def _batched_tlp(self, items: list[_Image], fused: list[_OriginalSize]) -> list[_OriginalSize]:
        """Post-fusion TLP of equal-size images in one solve, each input formed as alone."""
        size, cfg = items[0].ori_shape, self.tlp_config
        if all(self._pools_before_resizing(logits) for logits in fused):
            return self._tlp_from_sources(items, fused, None)
        guide = torch.cat([_upsample(item.input.float(), size)[None] for item in items])
        refined = tlp(torch.stack([logits.full() for logits in fused]), guide, self.affinity, cfg)
        return [_OriginalSize(one.to(self.dtype), size, self.dtype) for one in refined]

    def _batches_tlp(self, fused: list[_OriginalSize]) -> bool:
        """Whether the images' post-fusion TLP runs as one batch: several images of one size, each
        refined whole (no PAMR, no slabs), no per-image diagnostics asked for."""
        return (len(fused) > 1 and self.tlp and self.tlp_config.site == "post_fusion" and not self.pamr
                and not self.diagnostics and len({tuple(logits.size) for logits in fused}) == 1
                and all(logits.values <= FULL_SIZE_BUDGET for logits in fused))

    def _window_tlp(self, logits: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return tlp(logits[None], guide[None].float(), self.affinity, self.tlp_config)[0].to(self.dtype)

    def _fuse(self, item: _Image, patch_logits: list, info: dict) -> _OriginalSize:
        """Query logits [Q, H, W] at the original size from each window's [Q, h', w'] logits;
        docs/protocol.md §6.2–6.5."""
        per_window_tlp = self.tlp and self.tlp_config.site == "per_window"
        # a 0-dim tensor: read (a device sync) only when the prediction is copied to the CPU or the job ends
        info["nan_windows"] = torch.stack([torch.isnan(w).any() for w in patch_logits]).sum()
        height, width = item.input.shape[1:]
        if self.windows.slide_crop <= 0:
            logits = patch_logits[0]
            if self.method.whole_upsample_via_input or per_window_tlp:
                logits = _upsample(logits, (height, width))
                if per_window_tlp:
                    logits = self._window_tlp(logits, item.input)
            return _OriginalSize(logits, item.ori_shape, logits.dtype)
        canvas_dtype = self.dtype if self.method.fuse_in_model_dtype else torch.float32
        canvas = torch.zeros((self.vocabulary.num_queries, height, width), dtype=canvas_dtype, device=self.device)
        count = torch.zeros((1, height, width), dtype=canvas_dtype, device=self.device)
        first = item.windows[0]  # every window of one image has the same size and padding
        left, right, top, bottom = self._padding(first)
        crop_h, crop_w = first.y2 - first.y1, first.x2 - first.x1
        padded = (crop_h + top + bottom, crop_w + left + right)
        # windows upsampled together, in chunks of up to SLAB_VALUES: all of ADE20K's six at once would
        # hold 180 MB of upsampled logits beside the canvas
        chunk = max(1, SLAB_VALUES // (self.vocabulary.num_queries * padded[0] * padded[1]))
        for start in range(0, len(item.windows), chunk):
            upsampled = F.interpolate(torch.stack(patch_logits[start:start + chunk]), size=padded, mode="bilinear",
                                      align_corners=False)[:, :, top:top + crop_h, left:left + crop_w]
            for window, logits in zip(item.windows[start:start + chunk], upsampled):
                if per_window_tlp:
                    logits = self._window_tlp(logits, item.input[:, window.y1:window.y2, window.x1:window.x2])
                canvas[:, window.y1:window.y2, window.x1:window.x2] += logits
                count[:, window.y1:window.y2, window.x1:window.x2] += 1
        return _OriginalSize(canvas.div_(count), item.ori_shape, canvas_dtype)

    def _refine(self, item: _Image, logits: _OriginalSize, info: dict) -> _OriginalSize:
        """PAMR and post-fusion TLP on the original-size logits, guided by the upsampled input (fp32).

        Above ``FULL_SIZE_BUDGET`` TLP's input is resized and pooled a few queries at a time and its
        output stays on TLP's grid (``_OriginalSize`` resizes it per slab); PAMR always works whole.
        """
        post_fusion_tlp = self.tlp and self.tlp_config.site == "post_fusion"
        if not (self.pamr or post_fusion_tlp):
            return logits
        if self.pamr:
            guide = _upsample(item.input.float(), item.ori_shape)[None]
            refined = pamr(guide, logits.full()[None], self.pamr_config.iters, self.pamr_config.dilations)[0]
            logits = _OriginalSize(refined.to(self.dtype), item.ori_shape, self.dtype)
            if post_fusion_tlp and logits.values <= FULL_SIZE_BUDGET:
                return self._whole_tlp(logits, guide, info)
        elif post_fusion_tlp and self._pools_before_resizing(logits):
            return self._tlp_from_sources([item], [logits], self._tlp_info(info))[0]
        elif post_fusion_tlp and logits.values <= FULL_SIZE_BUDGET:
            return self._whole_tlp(logits, _upsample(item.input.float(), item.ori_shape)[None], info)
        return self._chunked_tlp(item, logits, info) if post_fusion_tlp else logits

    def _pools_before_resizing(self, logits: _OriginalSize) -> bool:
        """Whether TLP's pooled input can be computed from the fused logits before their resize to the
        original size (``pool_resized``): fp32 throughout (in lower precision the released code rounds
        the resized logits, which this path never forms), integer-stride pooling that pools, and a
        resize that resizes."""
        return (self.dtype == torch.float32 and logits.source.dtype == torch.float32
                and self.tlp_config.pool == "int_stride"
                and pooling_strides(*logits.size, self.tlp_config.grid) != (1, 1)
                and tuple(logits.source.shape[1:]) != tuple(logits.size))

    def _tlp_from_sources(self, items: list[_Image], fused: list[_OriginalSize], info: dict | None
                          ) -> list[_OriginalSize]:
        """TLP of equal-size images on the grid pooled straight from their fused logits and inputs (no
        original-size input tensor is formed). Each refined grid [Q, h, w] is returned as the original-size
        logits it is resized to (fp32, then cast, as ``tlp`` does), resized when decided, as fused logits
        are without TLP: a batch holds grids, not original-size tensors."""
        size, cfg = items[0].ori_shape, self.tlp_config
        z = torch.cat([pool_resized(logits.source[None], size, cfg) for logits in fused])
        guide = torch.cat([pool_resized(item.input.float()[None], size, cfg) for item in items])
        return [_OriginalSize(one, size, self.dtype) for one in propagate(z, guide, self.affinity, cfg, info)]

    def _tlp_info(self, info: dict) -> dict | None:
        return info if self.diagnostics else None

    def _whole_tlp(self, logits: _OriginalSize, guide: torch.Tensor, info: dict) -> _OriginalSize:
        refined = tlp(logits.full()[None], guide, self.affinity, self.tlp_config, self._tlp_info(info))[0]
        refined = refined.to(self.dtype)
        return _OriginalSize(refined, logits.size, self.dtype)

    def _chunked_tlp(self, item: _Image, logits: _OriginalSize, info: dict) -> _OriginalSize:
        """TLP with its original-size input built a few channels at a time (channels resize and pool
        independently, so the pooled grid equals the whole computation's)."""
        dtype = working_dtype(logits.dtype)
        pixels = logits.size[0] * logits.size[1]
        step = max(1, SLAB_VALUES // pixels)

        def pooled(channels, count: int) -> torch.Tensor:
            return torch.cat([pool_to_grid(channels(slice(start, start + step))[None].to(dtype), self.tlp_config)[0]
                              for start in range(0, count, step)], dim=1)

        z = pooled(logits.full, logits.source.shape[0])
        guide = pooled(lambda rgb: _upsample(item.input[rgb].float(), item.ori_shape), 3)
        refined = propagate(z, guide, self.affinity.to(dtype), self.tlp_config, self._tlp_info(info))[0]
        if tuple(refined.shape[1:]) == tuple(logits.size):  # not pooled: already full size
            return _OriginalSize(refined.to(self.dtype), logits.size, self.dtype)
        return _OriginalSize(refined, logits.size, self.dtype)


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
    of images of equal size is one batched solve on a GPU (``tlp_batch_values``). The result of each
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
    budget = max(seg.tlp_batch_values for seg in segmentors)
    ready: dict[int, list[Prediction]] = {}
    for image_index, group in enumerate(_equal_size_groups(prepared, queries, budget)):
        if image_index not in ready:  # the first image of its group: predict the group
            ready.update(_predict_group(segmentors, fusers, prepared, patch_logits, forward_info, group, on_device))
        # popped, and no other name holds them: once the consumer releases them they are freed
        yield ready.pop(image_index)


@torch.no_grad()
def _shared_window_logits(segmentors: Sequence[Segmentor], prepared: list[_Image]) -> tuple[list, list[dict]]:
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
def _predict_group(segmentors, fusers: dict[int, list[int]], prepared: list[_Image], patch_logits: list,
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


def _equal_size_groups(prepared: list[_Image], queries: int, budget: int) -> list[list[int]]:
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


def _window_batches(seg: Segmentor, prepared: list[_Image]) -> Iterator[list[tuple[int, int, torch.Tensor]]]:
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
