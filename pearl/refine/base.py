"""The refiner interface: a refinement of the fused query logits, guided by the image.

A refiner is switched on by its own boolean parameter (its ``name``: ``tlp=true``, ``pamr=true``)
and built with its typed config (``Config``, fields ``config_prefix + field``) and the text side's
facts (``RefinerContext``). It refines either each window's logits before the fusion
(``per_window``) or the fused logits at the original size; it carries its own memory strategy
(whole, in slabs) and may refine several equal-size images in one call (``refine_together``).
docs/architecture.md §3.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..fused import OriginalSizeLogits, WindowedImage
from ..preprocess import Normalisation

Guide = Callable[[], torch.Tensor]  # the image at the original size [1, 3, H, W] fp32, made on first call


@dataclass(frozen=True)
class RefinerContext:
    """What a refiner may use besides its config: the text prototypes [Q, D] (model dtype), the
    model dtype the refined logits are returned in, the device, whether diagnostics were asked, and
    the statistics the input was normalised with (the tower's)."""

    prototypes: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    diagnostics: bool
    normalisation: Normalisation


class Refiner(abc.ABC):
    name: ClassVar[str]          # also its on/off parameter
    Config: ClassVar[type]
    config_prefix: ClassVar[str]
    order: ClassVar[int]         # refiners that are on run in ascending order

    def __init__(self, config, context: RefinerContext) -> None:
        self.config = config
        self.context = context

    @property
    def per_window(self) -> bool:
        """Whether it refines each window's logits before the fusion (``refine_window``) instead of
        the fused logits (``refine``)."""
        return False

    def refine_window(self, logits: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """One window's logits [Q, h, w] (model dtype) refined, guided by its input crop [3, h, w]."""
        raise NotImplementedError(f"refiner {self.name} does not refine windows")

    @abc.abstractmethod
    def refine(self, item: WindowedImage, logits: OriginalSizeLogits, guide: Guide, info: dict
               ) -> OriginalSizeLogits:
        """The fused logits of ``item`` refined (``info``: the image's diagnostics, filled when asked)."""

    def refine_together(self, items: list[WindowedImage], fused: list[OriginalSizeLogits]
                        ) -> list[OriginalSizeLogits] | None:
        """Several images of one size refined in one call, each as ``refine`` alone would (no
        diagnostics), or None where this refiner has no such path for them."""
        return None

    def together_values(self) -> int:
        """Query × pixel values of equal-size images worth refining in one ``refine_together``
        call on this device (0: each image alone)."""
        return 0
