"""A second vision model beside CLIP: self-supervised ViTs (DINO, DINOv2 with registers, DINOv3)
whose patch affinities ProxyCLIP, CASS and LPOSS borrow (docs/architecture.md §2.2).

The released codes load them with ``torch.hub`` from GitHub at run time; we load the same tensors
through timm (its Hub repositories ``timm/<architecture>.<tag>``, converted from the released
checkpoints by timm's ``checkpoint_filter_fn``), from the Hugging Face cache or a local file (a timm
or a released checkpoint: timm converts the released layout on loading), never by unpickling
arbitrary objects. A vision model is a tower (``pearl.towers``); ``dense_features`` gives what the
released codes read: the patch tokens of the last block through the final norm, on the windows
renormalised from CLIP's statistics to the model's own.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import torch

from .errors import ConfigError, MissingFileError, WeightsError
from .preprocess import Normalisation
from .stages import once_per
from .towers import Tower, tower_for


class VFMSpec(NamedTuple):
    architecture: str  # timm architecture
    tag: str           # timm pretrained tag: Hub repository timm/<architecture>.<tag>
    released: str      # what the released OVSS codes load instead


VFMS = {
    "dino_b8": VFMSpec("vit_base_patch8_224", "dino", "torch.hub facebookresearch/dino dino_vitb8"),
    "dino_b16": VFMSpec("vit_base_patch16_224", "dino", "torch.hub facebookresearch/dino dino_vitb16"),
    "dinov2_b14_reg": VFMSpec("vit_base_patch14_reg4_dinov2", "lvd142m",
                              "torch.hub facebookresearch/dinov2 dinov2_vitb14_reg"),
    "dinov3_b16": VFMSpec("vit_base_patch16_dinov3", "lvd1689m",
                          "torch.hub facebookresearch/dinov3 dinov3_vitb16 with a local weights file"),
}
# A random DINO-architecture model for offline runs and the tests: patch 8, width 64 in 2 heads,
# 4 blocks, ImageNet statistics. Its features are a smoke input, never a result.
TINY = "tiny"
_TINY_ARCHITECTURE = ("vit_base_patch8_224.dino", {"embed_dim": 64, "num_heads": 2, "depth": 4, "img_size": 64})


def available_vfms() -> list[str]:
    return [*VFMS, TINY]


def load_vfm(name: str, pretrained: str | None = "hub", device: str | torch.device = "cpu",
             cache_dir: str | None = None, seed: int = 0) -> Tower:
    """The vision model ``name`` (``available_vfms``) as a tower, in eval mode on ``device``.

    ``pretrained``: "hub" (timm's weights from the Hugging Face cache, downloaded where the Hub can be
    reached), a local checkpoint file (timm's or the released layout), or None (random weights).
    ``tiny`` is random whatever ``pretrained`` says (seeded by ``seed``)."""
    import timm
    if name == TINY:
        architecture, kwargs = _TINY_ARCHITECTURE
        torch.manual_seed(seed)
        return tower_for(timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs).eval().to(device))
    if name not in VFMS:
        from .params import did_you_mean
        raise ConfigError(f"vision model {name!r} is not one of {', '.join(available_vfms())}; "
                          f"{did_you_mean(name, available_vfms())}".rstrip("; "))
    spec = VFMS[name]
    full_name = f"{spec.architecture}.{spec.tag}"
    if pretrained is None:
        model = timm.create_model(full_name, pretrained=False, num_classes=0)
    elif pretrained == "hub":
        _require_cached_or_reachable(full_name, cache_dir)
        model = timm.create_model(full_name, pretrained=True, num_classes=0, cache_dir=cache_dir)
    else:
        if not os.path.isfile(pretrained):
            raise MissingFileError(f"vision-model checkpoint {pretrained!r} does not exist; give an existing file, "
                                   f"'hub' or null (random weights)")
        try:
            model = timm.create_model(full_name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": pretrained})
        except (RuntimeError, KeyError) as error:
            raise WeightsError(f"vision-model checkpoint {pretrained} does not fit {name} ({full_name}): "
                               f"{str(error).splitlines()[0][:200]}") from None
    return tower_for(model.eval().to(device))


@functools.cache
def shared_vfm(name: str, pretrained: str | None, device: str | torch.device) -> Tower:
    """``load_vfm``, once per process: for the tools that build several segmentors of one device and
    precision (``pearl.bench``, ``pearl.segment --compare``)."""
    return load_vfm(name, pretrained, device)


def _cached(full_name: str, cache_dir: str | None) -> bool:
    from .loading import hub_files_cached
    return hub_files_cached(f"timm/{full_name}", ("model.safetensors", "pytorch_model.bin"), cache_dir)


def vfm_weights_state(name: str, pretrained: str | None, cache_dir: str | None = None) -> str:
    """Where a VFM's weights would come from, without loading them (a dry run): "random", "file",
    "cached" or "not cached" (downloaded when the job runs; offline it fails)."""
    if name == TINY or pretrained is None:
        return "random"
    if pretrained != "hub":
        return "file" if os.path.isfile(pretrained) else "missing file"
    spec = VFMS[name]
    return "cached" if _cached(f"{spec.architecture}.{spec.tag}", cache_dir) else "not cached"


def _require_cached_or_reachable(full_name: str, cache_dir: str | None) -> None:
    """One line naming the Hub repository and the cache folder when the weights are neither cached
    nor downloadable (as for CLIP weights, ``pearl.loading``)."""
    from .loading import hf_cache_dir, hub_reachable
    repo, folder = f"timm/{full_name}", cache_dir or hf_cache_dir()
    if _cached(full_name, cache_dir):
        return
    if not hub_reachable():
        raise WeightsError(f"vision-model weights {repo} are not in the cache folder {folder} and the Hub cannot be "
                           f"reached. On a connected machine run `python -c \"import timm; timm.create_model("
                           f"'{full_name}', pretrained=True)\"` and copy the folder across (HF_HUB_CACHE points to "
                           f"it), or give the released checkpoint file (vfm.pretrained=/path/to/file)")


def renormalise(windows: torch.Tensor, source: Normalisation, target: Normalisation) -> torch.Tensor:
    """Windows [B, 3, H, W] normalised with ``source`` statistics, normalised with ``target``'s
    instead: the released codes un-normalise CLIP's input and apply the vision model's (ImageNet)
    statistics (ProxyCLIP ``proxyclip_segmentor.py`` ``forward_feature``). Pixels padded with zeros
    in CLIP's space become CLIP's mean colour, as there."""
    return target.normalised(source.pixels(windows))


def dense_features(vfm: Tower, windows: torch.Tensor, clip_normalisation: Normalisation) -> torch.Tensor:
    """[B, h'', w'', C]: the vision model's last-block patch tokens through its final norm (DINO's
    ``get_intermediate_layers(x)[0]``, DINOv2's with registers dropped) for CLIP-normalised windows
    [B, 3, H, W], its positions resampled by the "+0.1" scale factor as the hub models resample them."""
    return vfm.normed_tokens(vfm_input(vfm, windows, clip_normalisation))


def vfm_input(vfm: Tower, windows: torch.Tensor, clip_normalisation: Normalisation) -> torch.Tensor:
    """CLIP-normalised windows as the vision model takes them: its own statistics, its dtype."""
    return renormalise(windows, clip_normalisation, vfm.normalisation).to(vfm.dtype)


def projection_features(vfm: Tower, windows: torch.Tensor, clip_normalisation: Normalisation, kind: str
                        ) -> torch.Tensor:
    """[B, h'', w'', C]: the vision model's last-block query, key or value projection (``kind`` "q", "k"
    or "v") of the patch tokens, its heads side by side, for CLIP-normalised windows [B, 3, H, W]: what
    LPOSS hooks on the last block's ``attn.qkv`` (``models/lposs/lposs.py`` ``extract_feats``; a rotary
    tower's q and k come rotated)."""
    return projections(vfm, vfm_input(vfm, windows, clip_normalisation), kind)


def projections(vfm: Tower, inputs: torch.Tensor, kind: str) -> torch.Tensor:
    """``projection_features`` of inputs [B, 3, H, W] already in the vision model's statistics and dtype."""
    shared = vfm.trunk(inputs)
    block = vfm.block(-1, shared.grid)
    chosen = dict(zip("qkv", block.qkv(block.norm(shared.x))))[kind][:, :, vfm.prefix_tokens:]
    batch, heads, _, width = chosen.shape
    return chosen.transpose(1, 2).reshape(batch, *shared.grid, heads * width)


class VisionFeatures(NamedTuple):
    """What a method that needs a second vision model receives in its last block (``Method.needs_vfm``):
    the model, CLIP's input statistics, what the method reads (``kind``: "dense", the final-norm patch
    tokens, or the last block's "q", "k" or "v" projection) and how the model's input is made from
    CLIP's windows (``prepare``: ``vfm_input``, or a method's own rule); ``Tower.head`` binds it to the
    trunk's windows."""

    model: Tower
    clip_normalisation: Normalisation
    kind: str = "dense"
    prepare: Callable[[Tower, torch.Tensor, Normalisation], torch.Tensor] = vfm_input

    def on(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, h'', w'', C]: the vision model's features of ``windows`` (the stage ``vfm``, timed apart
        from CLIP's backbone), computed once for every segmentor of a shared trunk that binds the same
        vision model, kind and input rule to the same windows; kept only while the windows are."""
        return once_per(windows, ("window", *self), lambda: self._read(windows), "vfm")

    def _read(self, windows: torch.Tensor) -> torch.Tensor:
        inputs = self.prepare(self.model, windows, self.clip_normalisation)
        return self.model.normed_tokens(inputs) if self.kind == "dense" else projections(self.model, inputs, self.kind)


class WindowProjections(NamedTuple):
    """One image's windows as a second vision model sees them, for a method that reads the model
    after CLIP's last block (LPOSS): ``image`` the image's input, ``crops`` makes its windows [W, 3, H, W]
    as the trunk saw them."""

    model: Tower
    clip_normalisation: Normalisation
    image: torch.Tensor
    crops: Callable[[], torch.Tensor]

    def features(self, kind: str) -> torch.Tensor:
        """[W, h'', w'', C]: ``projection_features`` of the windows (the stage ``vfm``), computed once per
        image for every segmentor of a shared trunk that asks for the same model and kind; kept only while
        the image's input is."""
        return once_per(self.image, ("projection", self.model, self.clip_normalisation, kind),
                        lambda: projection_features(self.model, self.crops(), self.clip_normalisation, kind), "vfm")


def vfm_for(method: str, requested: str | None, clip_model: str) -> str | None:
    """The vision model a run of ``method`` loads: none for a method that reads none (a request is
    then ignored, so that one sweep can mix methods), ``requested`` when given, ``tiny`` beside the
    tiny CLIP (a smoke run stays offline), else the method's own (its protocol file's fact)."""
    from .protocols import method_facts
    own = method_facts(method).vfm
    if own is None:
        return None
    return requested or (TINY if clip_model == "tiny" else own)
