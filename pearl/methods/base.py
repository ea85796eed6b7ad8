"""The method interface and the block pieces several methods share.

Methods see the image tower only through ``pearl.towers.base`` (its blocks' q/k/v, projection,
residuals; the prefix tokens), so one method runs on any tower that provides what it needs.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..params import default
from ..procrustes import procrustes_weights
from ..stages import stage
from ..towers.base import AttentionBlock, Tower
from ..vfm import vfm_input

ATTENTION = "attention"  # the ``info`` key under which a last block returns its attention weights


def keep_attention(info: dict | None, weights: torch.Tensor) -> None:
    """Hand the last block's attention weights [B, heads, T, T] (rows = queries, prefix tokens first)
    to the caller when it asked for them by putting the key ``ATTENTION`` into ``info``
    (``pearl.attention``); otherwise nothing is kept."""
    if info is not None and ATTENTION in info:
        info[ATTENTION] = weights.detach()


@dataclass(frozen=True)
class NoConfig:
    """A method without settings of its own."""


@dataclass(frozen=True)
class AttentionConfig:
    """The query·key last block of vanilla and PEARL: block form and Procrustes alignment."""

    arch: str = "reduced"
    pa: bool = False
    pa_solver: str = default("pa_solver")
    pa_iters: int = default("pa_iters")
    alpha_kk: float = default("alpha_kk")
    use_kk: bool = default("use_kk")


class Method(abc.ABC):
    """How the last block computes. Subclasses set the class attributes and ``last_block``.

    A method is built with its own config (``Config``, a dataclass whose field ``f`` is the flat
    parameter ``config_prefix + f``; ``pearl.params.build_config`` makes it) and nothing else.
    ``last_block(tower, x, hidden, grid, info)`` receives the image tower (``pearl.towers.base.Tower``:
    ``tower.block(-1, grid)`` is the last block), the input of the last block x [B, T, C] (the
    tower's prefix tokens first), the outputs of blocks 1..L−1 when
    ``needs_hidden_states`` (else an empty list), the grid (h', w') and a dict to put diagnostics
    in, or None when none were asked for (then computing them would be wasted work); it returns
    the patch tokens [B, h'w', C] before the final norm (on ``output_grid(grid, feedback)``, the
    second vision model's grid for ProxyCLIP). When ``info`` holds the key
    ``ATTENTION`` it also hands back the attention weights it multiplied the values
    with (``keep_attention``), which ``pearl.attention`` draws. ``feedback``
    (``pearl.methods.resclip.SemanticFeedback``: the text prototypes, the logit scale and the
    windows) is given when ``needs_feedback``, for a method that segments the windows once inside its
    last block (ResCLIP's SFR); a second vision model's features of the windows [B, h'', w'', C]
    (``pearl.vfm.VisionFeatures``) when ``needs_vfm`` (ProxyCLIP).
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    config_prefix: ClassVar[str] = ""
    # What the method is: set from its resources/protocols/<name>.yaml (``method:``) when it is
    # registered, so the report layer reads the same facts without importing the model code.
    default_pa: ClassVar[bool]
    default_tlp: ClassVar[bool]
    default_arch: ClassVar[str]
    # PA rotates keys against queries: meaningful only where attention has a query·key term.
    has_query_key_term: ClassVar[bool]
    needs_hidden_states: ClassVar[bool] = False  # a property where the method's config decides (GEM)
    needs_feedback: ClassVar[bool] = False       # likewise (ResCLIP's first pass)
    # A second vision model's features of the windows come as ``feedback`` (ProxyCLIP; pearl.vfm), or the
    # model itself to ``across_windows`` (LPOSS)
    needs_vfm: ClassVar[bool] = False
    # What a last block that reads the vision model takes of it (``pearl.vfm.VisionFeatures``: "dense" or the
    # last block's "q", "k", "v") and how the model's input is made from CLIP's windows (a staticmethod)
    vfm_feature: ClassVar[str] = "dense"
    prepare_vfm_input = staticmethod(vfm_input)
    # After the last block, before the fusion: the logits of all windows of an image refined together
    # (``across_windows``; LPOSS's propagation over all their patches)
    propagates_across_windows: ClassVar[bool] = False
    # The last block attends over all windows of an image at once (GLA-CLIP): the trunk's batches then hold
    # the windows of one image each, in window order (``pearl.joint``)
    attends_across_windows: ClassVar[bool] = False
    # Whole-image mode: upsample patch logits to the input size, then to the original size
    # (NACLIP/PEARL); otherwise straight to the original size (SCLIP/SFP/ClearCLIP). docs/protocol.md §6.5
    whole_upsample_via_input: ClassVar[bool] = False
    # Sliding-window crops zero-padded (centred) to a multiple of this: 0 none, "patch" the tower's patch
    # size (ClearCLIP), or a number of pixels (ProxyCLIP: 56). ClearCLIP also fuses in the model dtype.
    pad_crops_to: ClassVar[int | str] = 0
    fuse_in_model_dtype: ClassVar[bool] = False
    # How the tower resamples its position embedding to a window's grid (``pearl.towers.base.POSITIONS``):
    # the "+0.1" scale factor of the NACLIP/SCLIP/ClearCLIP code, or GEM's resample by size with antialiasing.
    position_interpolation: ClassVar[str] = "plus_point_one"
    # What the method reads from the CLS token, for a method that needs one ("" for none): a tower
    # without a single CLS prefix token (SigLIP, registers) is refused, as no other token stands in the
    # residual stream where the CLS token stands (docs/architecture.md §2.1).
    reads_cls: ClassVar[str] = ""

    def __init__(self, config=None) -> None:
        self.config = config if config is not None else self.Config()

    def check_tower(self, tower: Tower) -> None:
        """One line naming the tower when it lacks what the method reads (``reads_cls``)."""
        if self.reads_cls and not (tower.has_cls and tower.prefix_tokens == 1):
            raise ConfigError(f"{self.reads_cls}; the image tower {tower.name} has {tower.prefix_tokens} prefix "
                              f"tokens and {'a' if tower.has_cls else 'no'} CLS token: use a tower with a CLS token "
                              f"or another method")

    def check_vfm(self, tower: Tower, vfm: Tower) -> None:
        """One line naming both when the second vision model cannot serve this method beside ``tower``."""

    def output_grid(self, grid: tuple[int, int], feedback) -> tuple[int, int]:
        """The grid of the patches ``last_block`` returns for a trunk of ``grid`` (the same, but for a
        method whose features come out at a second vision model's grid)."""
        return grid

    def window_features(self, feats: torch.Tensor, windows: torch.Tensor, vfm: Tower | None) -> torch.Tensor:
        """The unit features [B, h, w, D] the windows' logits are taken from, given the tower's ``feats``
        [B, h', w', D] of the windows [B, 3, H, W] (LPOSS: on the second vision model's grid); as they are."""
        return feats

    @property
    def vfm_in_last_block(self) -> bool:
        """Whether ``last_block`` takes the second vision model's features as its feedback (ProxyCLIP);
        LPOSS reads the model after the last block, in ``across_windows``."""
        return self.needs_vfm and not self.propagates_across_windows

    def across_windows(self, patch_logits: list[torch.Tensor], windows: list, vision) -> list[torch.Tensor]:
        """The windows' logits of one image ([Q, h', w'] each, in window order) refined together, for a method
        that ``propagates_across_windows``; ``vision`` (``pearl.vfm.WindowProjections``) the second vision
        model on those windows."""
        raise NotImplementedError(f"method {self.name} does not refine its windows together")

    @property
    def reads_image_embedding(self) -> str:
        """The CLIP image embedding the method's logits read beside the patches (``logits``): "window"
        (each window's CLS embedding), "image" (the whole image's, for every window of it) or "" for none."""
        return ""

    def logits(self, feats: torch.Tensor, prototypes: torch.Tensor, embeddings: torch.Tensor | None
               ) -> torch.Tensor:
        """[B, h, w, Q]: the logits of the unit patch features [B, h, w, D] against the unit text
        prototypes [Q, D], their cosines; ``embeddings`` [B, D] the unit image embeddings the method reads
        (``reads_image_embedding``), else None."""
        return feats @ prototypes.T

    def releases_nan_windows(self) -> bool:
        """Whether the released code itself turns some windows' logits NaN (then the published
        numbers include them, and so does our record); for any other method a NaN fails the job."""
        return False

    @abc.abstractmethod
    def last_block(self, tower: Tower, x: torch.Tensor, hidden: list[torch.Tensor], grid: tuple[int, int],
                   info: dict | None, feedback=None) -> torch.Tensor:
        """Patch tokens [B, h'w', C] before the final norm, on ``output_grid(grid, feedback)``."""


class ClearCLIPSegmentorMethod(Method, abc.ABC):
    """A method as mc-lan/ClearCLIP@ad68a40 ``clearclip_segmentor.py`` runs it (ClearCLIP, and
    MaskCLIP and GEM through its ``model_type``): sliding-window crops zero-padded to a multiple of
    the patch size, the fusion canvas in the model dtype (docs/methods.md §5)."""

    pad_crops_to = "patch"
    fuse_in_model_dtype = True


def finish_block(block: AttentionBlock, x: torch.Tensor, heads_out: torch.Tensor, arch: str, prefix_tokens: int
                 ) -> torch.Tensor:
    """Patch tokens [B, N, C] from the heads' output [B, heads, T, d] (the first ``prefix_tokens`` dropped).

    ``reduced``: out_proj(A·v) alone (no residual, no FFN); ``vanilla``: the standard block,
    x + out_proj(A·v), then + MLP.
    """
    out = block.project(heads_out.to(x.dtype))
    if arch == "vanilla":
        out = block.mlp_residual(block.attention_residual(x, out))
    elif arch != "reduced":
        raise ValueError(f"arch {arch!r} is not 'reduced' or 'vanilla'")
    return out[:, prefix_tokens:]


def value_block(tower: Tower, x: torch.Tensor, grid: tuple[int, int], arch: str, info: dict | None) -> torch.Tensor:
    """MaskCLIP's last block: each token's value embedding through the output projection, attention
    dropped (``finish_block`` with ``arch``), patch tokens [B, h'w', C]. The attention it stands for is
    the identity (a softmax over a mask 0 on the diagonal, −∞ elsewhere), handed to ``pearl.attention``."""
    block = tower.block(-1, grid)
    _, _, v = block.qkv(block.norm(x))
    if info is not None and ATTENTION in info:
        tokens = v.shape[2]
        keep_attention(info, torch.eye(tokens, dtype=v.dtype, device=v.device).expand(*v.shape[:2], -1, -1))
    # softmax(mask) @ v with the identity is v exactly (1·v plus exact zeros), so v is used as is
    return finish_block(block, x, v, arch, tower.prefix_tokens)


def query_key_block(tower: Tower, x: torch.Tensor, grid: tuple[int, int], config: AttentionConfig,
                    info: dict | None) -> torch.Tensor:
    """Last block with softmax(s·q kᵀ) attention, or PEARL's Procrustes alignment when ``pa``.

    Plain attention scales q first, as NACLIP/PEARL ``custom_attn`` ('vanilla' strategy). PA runs
    in fp32 (docs/pearl.md §2) and its output is cast back to the activation dtype.
    """
    block = tower.block(-1, grid)
    q, k, v = block.qkv(block.norm(x))
    scale = block.scale
    if config.pa:
        with stage("pa"):
            weights, stats = procrustes_weights(
                q.float(), k.float(), scale, alpha_kk=config.alpha_kk if config.use_kk else 0.0,
                solver=config.pa_solver, iters=config.pa_iters, diagnostics=info is not None)
        if info is not None:
            info.update(stats)
        out = weights @ v.float()
    else:
        weights = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)
        out = weights @ v
    keep_attention(info, weights)
    return finish_block(block, x, out, config.arch, tower.prefix_tokens)
