"""Segmentor: image → rescale → windows → batched dense forward → fusion → refinement → decision.

The pipeline of docs/protocol.md §1–8 shared by every method; methods only supply the last block,
the tower (``pearl.towers``) the blocks, the refiners (``pearl.refine``) the refinement. Its stages
are public methods (``prepare_image``, ``crop``, ``window_logits``, ``fuse``, ``refine``,
``decision``, ``finish_images``) that ``pearl.joint`` drives for one or several segmentors on a
shared trunk; windows of all images given to ``predict_batch`` are batched by shape into one forward each.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from . import params as param_specs
from .decision import Decision, DecisionConfig, Prediction
from .errors import ConfigError, ImageSizeError
from .fused import OriginalSizeLogits, WindowedImage, per_slab, upsample
from .joint import predict_jointly
from .loading import prepare_model
from .methods import get_method
from .methods.resclip import SemanticFeedback
from .preprocess import PreparedImage, Window, WindowConfig, prepare_image, sliding_windows
from .refine import Refiner, RefinerContext, build_refiners
from .settings import resolve_settings
from .stages import once_per, stage
from .text import Vocabulary, load_vocabulary, template_set, text_prototypes
from .towers import Tower, TowerConfig, Trunk, tower_for
from .vfm import VisionFeatures, WindowProjections

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


class Segmentor:
    """Training-free OVSS with a frozen open_clip model; see docs/api.md and the README.

    ``model`` is moved to ``device`` and, if ``precision`` differs from its own, converted, both
    in place. ``precision`` None keeps the model's own. ``vfm`` (``pearl.load_vfm``),
    for a method that reads a second vision model, is moved to the device and CLIP tower's dtype in place.
    """

    def __init__(self, model, classes: Sequence[str] | str | os.PathLike, method: str = "pearl",
                 pa: bool | None = None, tlp: bool | None = None, tokenizer=None, device: str | torch.device = "cpu",
                 precision: str | None = None, window_batch_size: int | None = None, diagnostics: bool = False,
                 vfm: Tower | None = None, **params) -> None:
        self.params = resolve_settings(method, pa, tlp, params)
        method_cls = get_method(method)
        # the one conversion from flat names to each stage's typed config
        build = param_specs.build_config
        self.method = method_cls(build(method_cls.Config, self.params, method_cls.config_prefix))
        self.windows = build(WindowConfig, self.params)
        self.pa, self.tlp, self.pamr = self.params["pa"], self.params["tlp"], self.params["pamr"]
        self.device = torch.device(device)
        if window_batch_size is not None and window_batch_size < 1:
            raise ValueError(f"window_batch_size must be ≥ 1, got {window_batch_size}")
        self.window_batch_size = window_batch_size  # None: default_window_batch_size, per window shape
        self.diagnostics = diagnostics
        self.model = prepare_model(model, self.device, precision)
        self.tower = tower_for(self.model.visual, build(TowerConfig, self.params))
        self.method.check_tower(self.tower)
        self.vfm = self._vfm(vfm, method)
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
        self.decision = Decision(build(DecisionConfig, self.params), self.query_to_class, self.vocabulary.num_classes)
        self.refiners: list[Refiner] = build_refiners(
            self.params, RefinerContext(self.prototypes, self.dtype, self.device, diagnostics, self.normalisation))
        # query × pixel values of equal-size images refined in one call (0: each alone); see refine_together
        self.together_values = max((refiner.together_values() for refiner in self.refiners), default=0)

    @property
    def dtype(self) -> torch.dtype:
        return self.prototypes.dtype

    def _vfm(self, vfm: Tower | None, method: str) -> Tower | None:
        """The second vision model a method needs, on the segmentor's device in the tower's dtype (the
        released ProxyCLIP runs it in fp16 beside its fp16 CLIP); None for a method without one."""
        if not self.method.needs_vfm:
            return None
        if vfm is None:  # the method's own vision model is a fact of its protocol, set on its class
            raise ConfigError(f"method={method} needs a second vision model: Segmentor(..., vfm="
                              f"pearl.load_vfm({self.method.vfm!r})) (docs/architecture.md §2.2)")
        self.method.check_vfm(self.tower, vfm)
        vfm.visual.to(self.device, dtype=self.tower.dtype)
        return vfm

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
        input's dtype and padding, the position interpolation. Segmentors with equal keys can share one trunk."""
        return (id(self.model), self.device, self.windows, self.method.fuse_in_model_dtype and self.dtype,
                self.method.pad_crops_to, self.method.position_interpolation)

    def fuses_as(self, other: Segmentor) -> bool:
        """Whether ``other`` computes this segmentor's fused logits: one trunk, the same last block
        (method and its settings, PA included), text prototypes, model dtype and diagnostics, and
        the per-window refiners (TLP at ``tlp_site=per_window``). Such segmentors differ only in what
        follows the fusion (the post-fusion refiners, the decision), so one fusion serves them."""
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
        # a per-window refiner's state follows from its config and the prototypes; a last block that
        # segments the windows itself (ResCLIP) also depends on the logit scale
        return (self.trunk_key(), type(self.method), self.method.config, self.tower.config, id(self.vfm),
                self.dtype, self.diagnostics, tuple((refiner.name, refiner.config) for refiner in self.window_refiners),
                self.decision.config.logit_scale if self.method.needs_feedback else None)

    def _to_cpu(self, out: Prediction) -> Prediction:
        def moved(value):
            return (lambda: value().cpu()) if callable(value) else value.cpu()
        info = {key: value.item() if isinstance(value, torch.Tensor) else value for key, value in out.info.items()}
        warn_nan_windows(info["nan_windows"], info["windows"], self.method.name)
        return Prediction(out.labels.cpu(), moved(out._probs), moved(out._logits), info)

    def prepare_image(self, image) -> WindowedImage:
        """The image (or ``preprocess``'s result) on the device, in the input dtype, with its windows;
        an ImageSizeError naming the size when the rescaled image is smaller than one patch."""
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

    def padding(self, window: Window) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding of a sliding-window crop to the method's
        ``pad_crops_to``: the patch size for ClearCLIP (``clearclip_segmentor.py`` ``compute_padsize``,
        called only in ``forward_slide``), 56 for ProxyCLIP, none otherwise. A whole image is never
        padded (the patch conv drops the remainder, as upstream)."""
        if not self.method.pad_crops_to or self.windows.slide_crop <= 0:
            return 0, 0, 0, 0
        multiple = self.tower.patch_size if self.method.pad_crops_to == "patch" else self.method.pad_crops_to
        pad_h, pad_w = (-(window.y2 - window.y1)) % multiple, (-(window.x2 - window.x1)) % multiple
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2

    def crop(self, item: WindowedImage, window: Window) -> torch.Tensor:
        crop = item.input[:, window.y1:window.y2, window.x1:window.x2]
        padding = self.padding(window)
        return F.pad(crop, padding) if any(padding) else crop

    def window_feedback(self) -> SemanticFeedback | VisionFeatures | None:
        """What the method's last block receives beside the trunk (``Method.last_block``'s feedback):
        ResCLIP's semantic feedback, a second vision model's features, or nothing."""
        if self.method.needs_feedback:
            return SemanticFeedback(self.prototypes, self.decision.config.logit_scale)
        if not self.method.vfm_in_last_block:
            return None
        return VisionFeatures(self.vfm, self.normalisation, self.method.vfm_feature, self.method.prepare_vfm_input)

    def window_logits(self, shared: Trunk, stats: dict | None, inputs: Sequence[torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """[N, Q, h', w'] logits of this method's last block on a shared trunk (the cosines, or what the
        method makes of them: ``Method.logits``); ``inputs`` the input of each window's image, for a
        method that reads the whole image's embedding."""
        info = {} if stats is not None else None
        feats = self.method.window_features(self.tower.head(shared, self.method, info, self.window_feedback()),
                                            shared.images, self.vfm)
        for key, value in (info or {}).items():
            stats[key].append(value)
        embeddings = self.image_embeddings(shared, inputs) if self.method.reads_image_embedding else None
        logits = self.method.logits(feats.to(self.dtype), self.prototypes, embeddings)
        # contiguous: bilinear upsampling of the permuted (channels-last) view is several times slower
        return logits.permute(0, 3, 1, 2).contiguous()

    def image_embeddings(self, shared: Trunk, inputs: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """[N, D] unit CLS embeddings the method reads (``Method.reads_image_embedding``): each window's, or
        the whole image's of each window (one forward of the image, once for every job of a shared trunk)."""
        if self.method.reads_image_embedding == "window" or self.windows.slide_crop <= 0:
            embeddings = self.tower.cls_embedding(shared)
        elif inputs is None:
            raise ValueError(f"method {self.method.name} reads the whole image's embedding: give window_logits "
                             f"the input of each window's image")
        else:
            key = ("cls embedding", id(self.model), self.method.position_interpolation)
            embeddings = torch.stack([once_per(image, key, functools.partial(self._whole_image_embedding, image),
                                               "backbone") for image in inputs])
        return embeddings / embeddings.norm(dim=-1, keepdim=True)

    def _whole_image_embedding(self, image: torch.Tensor) -> torch.Tensor:
        trunk = self.tower.trunk(image[None].to(self.tower.dtype), positions=self.method.position_interpolation)
        return self.tower.cls_embedding(trunk)[0]

    def finish_images(self, items: list[WindowedImage], fused: list[OriginalSizeLogits], infos: list[dict],
                       on_device: bool) -> list[Prediction]:
        """Refinement and decision of equal-size images from their fused logits (not modified)."""
        with stage("tlp"):
            together = self._refine_together(items, fused)
            fused = together if together is not None else [
                self.refine(item, logits, info) for item, logits, info in zip(items, fused, infos)]
        with stage("decision"):
            outs = [self.decision(logits, info) for logits, info in zip(fused, infos)]
        return outs if on_device else [self._to_cpu(out) for out in outs]

    def _refine_together(self, items: list[WindowedImage], fused: list[OriginalSizeLogits]
                         ) -> list[OriginalSizeLogits] | None:
        """Several images refined in one call where one refiner alone refines the fused logits and no
        per-image diagnostics were asked for; None otherwise (then each image is refined alone)."""
        refiners = self.post_fusion_refiners
        if len(fused) > 1 and len(refiners) == 1 and not self.diagnostics:
            return refiners[0].refine_together(items, fused)
        return None

    def fuse(self, item: WindowedImage, patch_logits: list, info: dict) -> OriginalSizeLogits:
        """Query logits [Q, H, W] at the original size from each window's [Q, h', w'] logits, each
        window refined first by the per-window refiners; docs/protocol.md §6.2–6.5."""
        window_refiners = self.window_refiners
        # a 0-dim tensor: read (a device sync) only when the prediction is copied to the CPU or the job ends
        info["nan_windows"] = torch.stack([torch.isnan(w).any() for w in patch_logits]).sum()
        patch_logits = self.across_windows(item, patch_logits)
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
        left, right, top, bottom = self.padding(first)
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

    def across_windows(self, item: WindowedImage, patch_logits: list) -> list:
        """The image's window logits ([Q, h', w'] each) refined together by the method where it does so
        (``Method.propagates_across_windows``: LPOSS), given the crops the trunk saw; else as they are."""
        if not self.method.propagates_across_windows:
            return patch_logits
        vision = WindowProjections(self.vfm, self.normalisation, item.input,
                                   lambda: torch.stack([self.crop(item, window) for window in item.windows]))
        return self.method.across_windows(patch_logits, item.windows, vision)

    def refine(self, item: WindowedImage, logits: OriginalSizeLogits, info: dict) -> OriginalSizeLogits:
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
