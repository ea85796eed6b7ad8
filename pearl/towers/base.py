"""The image-tower interface: what the pipeline and the methods' last blocks ask of a vision transformer.

A tower wraps one image encoder (open_clip's ViT first; a timm tower, a tower without a CLS token or
a second vision model such as DINO later) and answers in one vocabulary: the patch embedding with
its positions interpolated to any grid, the blocks, one block's attention pieces (pre-norm, q/k/v per
head with any rotary embedding already applied, output projection, residuals and MLP), the prefix
tokens (CLS, registers or none), the final norm and projection, the patch size and the input
mean/std. Tokens are [B, T, C], batch first: ``prefix_tokens`` tokens, then the h'×w' patch tokens
in row-major order. docs/architecture.md §2 says why the seam is here.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..params import default
from ..preprocess import Normalisation

if TYPE_CHECKING:
    from ..methods.base import Method

# How a tower resamples its position embedding to a grid other than its native one:
# "plus_point_one": bicubic by the scale factor ((h'+0.1)/h, (w'+0.1)/w), the stock embedding whenever
# the token count is the native one (NACLIP/SCLIP/ClearCLIP/PEARL; docs/protocol.md §6.4);
# "size_antialias": bicubic to the size (h', w') with antialiasing, the stock one only on the native
# grid (timm's resample_abs_pos_embed, as GEM runs it); "size": bicubic to the size without antialiasing,
# the stock embedding whenever the token count is the native one (CLIP-DINOiser's MaskCLIP, LPOSS's CLIP).
POSITIONS = ("plus_point_one", "size_antialias", "size")


def pair(size) -> tuple[int, int]:
    """(h, w) of a size given as one int or a pair (patch sizes, grid sizes)."""
    return (size, size) if isinstance(size, int) else tuple(size)


def resample_positions(table: torch.Tensor, prefix: int, native: tuple[int, int], grid: tuple[int, int],
                       positions: str = POSITIONS[0]) -> torch.Tensor:
    """[prefix + h'w', C] fp32: a position table [prefix + h·w, C] (``prefix`` entries for the prefix
    tokens, then the native h×w grid in row-major order) resampled to the grid (h', w').

    ``plus_point_one``: bicubic with the explicit scale factor ((h'+0.1)/h, (w'+0.1)/w), not ``size=``
    (the DINO "+0.1" trick; docs/protocol.md §6.4); as in NACLIP/PEARL ``clip/model.py``
    ``VisionTransformer.forward``, the stock table is used whenever the token count equals the native
    one. ``size_antialias``: bicubic to the size with antialiasing, the stock table only on the native
    grid (timm's ``resample_abs_pos_embed``, as GEM runs it, WalBouss/GEM@5fa677c). ``size``: bicubic to
    the size (mmseg's ``resize``, align_corners=False), the stock table whenever the token count is the
    native one (wysoczanska/clip_dinoiser ``MaskClip.extract_feat``, as LPOSS runs it). Prefix entries
    are never resampled.
    """
    if positions not in POSITIONS:
        raise ValueError(f"position interpolation {positions!r} is not one of {', '.join(POSITIONS)}")
    table = table.float()
    (native_h, native_w), (grid_h, grid_w) = native, grid
    if (grid_h, grid_w) == (native_h, native_w) or (
            positions != "size_antialias" and grid_h * grid_w == native_h * native_w):
        return table
    patch_pos = table[prefix:].reshape(1, native_h, native_w, -1).permute(0, 3, 1, 2)
    if positions != "plus_point_one":
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                                  antialias=positions == "size_antialias")
    else:
        patch_pos = F.interpolate(patch_pos, scale_factor=((grid_h + 0.1) / native_h, (grid_w + 0.1) / native_w),
                                  mode="bicubic", align_corners=False)
    assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
    return torch.cat([table[:prefix], patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])


@dataclass(frozen=True)
class TowerConfig:
    """The settings a tower family forces a choice on (docs/architecture.md §2.1); the parameters of
    the same names. A family that has no such choice ignores them."""

    pool_head: str = default("pool_head")


class Trunk(NamedTuple):
    """What blocks 1..L−1 give the last block: its input x [B, T, C] (prefix tokens first), the
    outputs of blocks 1..L−1 (empty unless kept), the patch grid (h', w') and the windows
    [B, 3, H, W] they ran on."""

    x: torch.Tensor
    hidden: list
    grid: tuple[int, int]
    images: torch.Tensor | None = None


class AttentionBlock(abc.ABC):
    """One pre-norm transformer block, in the pieces the methods recombine:
    x + A(norm(x)) → y, then y + MLP(norm₂(y)), A = project(softmax(s·q kᵀ) v)."""

    heads: int
    scale: float  # the attention's own scale, head width ** −0.5

    @property
    def head_dim(self) -> int:
        return round(self.scale ** -2)

    @abc.abstractmethod
    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-attention norm of x [B, T, C]."""

    @abc.abstractmethod
    def qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, T, d] of the normed tokens y [B, T, C]: the prefix tokens, or none (a method
        attending over the patches alone), then the h'×w' patch tokens. A rotary tower rotates the
        patch tokens' q and k here."""

    @abc.abstractmethod
    def project(self, heads_out: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' output [B, heads, T, d] → [B, T, C]."""

    @abc.abstractmethod
    def attention_scale(self, attended: torch.Tensor) -> torch.Tensor:
        """The block's layer scale on the projected attention output (the identity where it has none)."""

    def attention_residual(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """x + the projected attention output, layer-scaled."""
        return x + self.attention_scale(attended)

    @abc.abstractmethod
    def mlp_residual(self, y: torch.Tensor) -> torch.Tensor:
        """y + MLP(norm₂(y)) (with the block's layer scale)."""

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The block's own forward of x [B, T, C]."""


class Tower(abc.ABC):
    """One image encoder seen through the interface; ``tower_for`` picks the implementation."""

    name: ClassVar[str]

    def __init__(self, visual, config: TowerConfig | None = None) -> None:
        self.visual = visual
        self.config = config or TowerConfig()

    @classmethod
    @abc.abstractmethod
    def matches(cls, visual) -> bool:
        """Whether this implementation computes ``visual`` (the model's image tower module)."""

    @classmethod
    def unsupported(cls, visual) -> str | None:
        """What keeps a module of this family that ``matches`` refuses from being computed (a
        variant this implementation does not write), or None: the error names it."""
        return None

    @property
    @abc.abstractmethod
    def patch_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS and registers; 0 for none)."""

    @property
    @abc.abstractmethod
    def has_cls(self) -> bool:
        """Whether the first token is a CLS token."""

    @property
    @abc.abstractmethod
    def num_blocks(self) -> int: ...

    @property
    @abc.abstractmethod
    def normalisation(self) -> Normalisation:
        """The input mean/std the tower was trained with (0–255 scale)."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the tower's weights (its inputs are cast to it)."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @abc.abstractmethod
    def embed(self, images: torch.Tensor, positions: str = POSITIONS[0]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens [B, T, C] entering block 1 and the grid (h', w'), for images [B, 3, H, W], the
        position embedding resampled to the grid as ``positions`` (one of ``POSITIONS``) says."""

    @abc.abstractmethod
    def block(self, index: int, grid: tuple[int, int]) -> AttentionBlock:
        """Block ``index`` (0-based; negative counts from the end) for tokens of a ``grid`` patch grid."""

    @abc.abstractmethod
    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's norm after its last block, of tokens [B, T, C]."""

    @abc.abstractmethod
    def final(self, patches: torch.Tensor) -> torch.Tensor:
        """The final norm and projection of patch tokens [B, N, C] → [B, N, D] (not unit-norm)."""

    def cls_embedding(self, shared: Trunk) -> torch.Tensor:
        """[B, D]: the image embedding a CLS tower's own forward gives the trunk's windows: the CLS token
        after the standard last block, through the final norm and projection (not unit-norm)."""
        x = self.block(-1, shared.grid)(shared.x)
        return self.final(x[:, :1])[:, 0]

    def normed_tokens(self, images: torch.Tensor, positions: str = POSITIONS[0]) -> torch.Tensor:
        """[B, h', w', C]: the patch tokens of the tower's own forward through its final norm, the
        prefix tokens dropped (what a second vision model gives: ``pearl.vfm``)."""
        shared = self.trunk(images, positions=positions)
        x = self.final_norm(self.block(-1, shared.grid)(shared.x))[:, self.prefix_tokens:]
        return x.reshape(x.shape[0], *shared.grid, -1)

    def trunk(self, images: torch.Tensor, keep_hidden: bool = False, positions: str = POSITIONS[0]) -> Trunk:
        """Patch embedding (``positions``: see ``POSITIONS``) and blocks 1..L−1 for images [B, 3, H, W].

        Independent of the method but for how it resamples positions: jobs that differ only in the
        last block, the refinement or the decision can share one trunk (docs/speed.md §3).
        """
        x, grid = self.embed(images, positions)
        hidden = []
        for index in range(self.num_blocks - 1):
            x = self.block(index, grid)(x)
            if keep_hidden:
                hidden.append(x)
        return Trunk(x, hidden, grid, images)

    def head(self, shared: Trunk, method: Method, info: dict | None = None, feedback=None) -> torch.Tensor:
        """Unit-norm patch features [B, h', w', D] (on ``method.output_grid``): ``method``'s last block
        on the trunk, the final norm and projection. ``info`` (a dict, or None for no diagnostics)
        receives the method's diagnostics; ``feedback`` (``Method.last_block``: ResCLIP's semantic
        feedback, a second vision model's features) is bound to the trunk's windows."""
        if feedback is not None:
            feedback = feedback.on(shared.images)
        patches = method.last_block(self, shared.x, shared.hidden, shared.grid, info, feedback)
        feats = self.final(patches)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return feats.reshape(feats.shape[0], *method.output_grid(shared.grid, feedback), -1)

    def dense_features(self, images: torch.Tensor, method: Method, diagnostics: bool = False, feedback=None
                       ) -> tuple[torch.Tensor, dict]:
        """Unit-norm patch features [B, h', w', D] with ``method`` computing the last block (given
        ``feedback`` where it needs one: ``Segmentor.window_feedback``), and its diagnostics (0-dim
        tensors; empty unless ``diagnostics``)."""
        info: dict | None = {} if diagnostics else None
        shared = self.trunk(images, method.needs_hidden_states, method.position_interpolation)
        feats = self.head(shared, method, info, feedback)
        return feats, info or {}
