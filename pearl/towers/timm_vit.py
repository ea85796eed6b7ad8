"""timm's vision transformers inside open_clip's ``TimmModel``: EVA02 and PE-Core (timm ``Eva``:
rotary q/k on the patch tokens, EVA02's sub-LayerNorm before the output projection and SwiGLU MLP,
PE-Core's pre-transformer norm and attention-pool head) and SigLIP / SigLIP2 (timm
``VisionTransformer`` without a CLS token, an attention-pool head); and the same timm models bare,
as a second vision model (DINO, DINOv2 with registers: ``pearl.vfm``).

As for open_clip's own ViT we call the model's modules (``patch_embed.proj``, ``pos_embed``, ``rope``,
``blocks``, ``norm``, ``attn_pool``, ``head``) and write only what a method recombines: a block's
q/k/v, rotated as the block rotates them (timm ``EvaAttention.forward``, ``AttentionRope.forward``),
and the dense form of the head. docs/architecture.md §2.1 records each choice a family forces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..preprocess import Normalisation, model_normalisation
from . import register
from .base import POSITIONS, AttentionBlock, Tower, pair, resample_positions


def _families():
    """(trunk classes, block classes, attention classes) this module computes."""
    from timm.layers.attention import Attention, AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    from timm.models.vision_transformer import Block, VisionTransformer
    return (Eva, VisionTransformer), (EvaBlock, Block), (EvaAttention, AttentionRope, Attention)


def _trunk(visual):
    """The timm model of an open_clip ``TimmModel`` or of a bare timm model; None for anything else."""
    from open_clip.timm_model import TimmModel
    if isinstance(visual, TimmModel):
        return visual.trunk
    return visual if type(visual) in _families()[0] else None


def unsupported_part(visual) -> str | None:
    """What in an open_clip ``TimmModel`` or a bare timm model this module does not compute (None:
    everything is supported): gated or grouped-query attention, depth-dependent rotary embeddings,
    post-norm or parallel blocks, a convolutional stem, a positional embedding in the pooling head,
    open_clip's own pooling heads."""
    trunks, blocks, attentions = _families()
    trunk = _trunk(visual)
    if type(trunk) not in trunks:
        return f"timm trunk {type(trunk).__name__}"
    from timm.layers import PatchEmbed
    if type(trunk.patch_embed) is not PatchEmbed or trunk.patch_embed.dynamic_img_pad:
        return f"patch embedding {type(trunk.patch_embed).__name__} (a convolutional stem or padding)"
    from timm.layers import RotaryEmbeddingCat, RotaryEmbeddingDinoV3
    rope = getattr(trunk, "rope", None)
    if getattr(trunk, "rope_mixed", False) or (rope is not None
                                                and type(rope) not in (RotaryEmbeddingCat, RotaryEmbeddingDinoV3)):
        return f"rotary embedding {type(rope).__name__}{' (depth-dependent)' if trunk.rope_mixed else ''}"
    if trunk is not visual and any(name in ("pool", "mlp") for name, _ in visual.head.named_children()):
        return "open_clip's own pooling or MLP head"
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None and (pool.pos_embed is not None or pool.latent_len != 1):
        return "an attention-pool head with positions or several latents"
    for block in trunk.blocks:
        if type(block) not in blocks or type(block.attn) not in attentions:
            return f"block {type(block).__name__} with {type(block.attn).__name__}"
        if getattr(block.attn, "gate", None) is not None or getattr(block.attn, "num_kv_groups", 1) > 1:
            return "gated or grouped-query attention"
    return None


class TimmBlock(AttentionBlock):
    """timm ``EvaBlock`` (layer scale ``gamma_1``/``gamma_2``) or ``Block`` (``ls1``/``ls2``) with its
    attention, q and k rotated by ``rope`` [h'w', 2·d] on the patch tokens (None: no rotary)."""

    def __init__(self, module, rope: torch.Tensor | None) -> None:
        self.module, self.rope = module, rope
        self.heads = module.attn.num_heads
        self.scale = module.attn.scale

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.norm1(x)

    def qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.module.attn
        batch, tokens, _ = y.shape
        if attn.qkv is not None:
            q_bias = getattr(attn, "q_bias", None)
            if q_bias is None:
                packed = attn.qkv(y)
            elif attn.qkv_bias_separate:
                packed = attn.qkv(y) + torch.cat((q_bias, attn.k_bias, attn.v_bias))
            else:
                packed = F.linear(y, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
            q, k, v = packed.reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (proj(y).reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if self.rope is not None:
            q, k = self._rotate(q, v), self._rotate(k, v)
        return q, k, v

    def _rotate(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """t [B, heads, T, d] with its last h'w' (patch) tokens rotated, any tokens before them (the
        prefix, or none where a method attends over the patches alone) not, in v's dtype."""
        from timm.layers import apply_rot_embed_cat
        prefix = t.shape[2] - self.rope.shape[0]
        rotated = apply_rot_embed_cat(t[:, :, prefix:], self.rope, half=getattr(self.module.attn, "rotate_half", False))
        return torch.cat([t[:, :, :prefix], rotated], dim=2).type_as(like)

    def project(self, heads_out: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, dim = heads_out.shape
        attn = self.module.attn
        return attn.proj(attn.norm(heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim)))

    def attention_scale(self, attended: torch.Tensor) -> torch.Tensor:
        block = self.module
        if hasattr(block, "ls1"):
            return block.ls1(attended)
        return attended if block.gamma_1 is None else block.gamma_1 * attended

    def mlp_residual(self, y: torch.Tensor) -> torch.Tensor:
        block = self.module
        out = block.mlp(block.norm2(y))
        if hasattr(block, "ls2"):
            return y + block.ls2(out)
        return y + (out if block.gamma_2 is None else block.gamma_2 * out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The block's own forward (timm's fused attention)."""
        return self.module(x) if self.rope is None else self.module(x, rope=self.rope)


def attention_pool_value_path(pool, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C]: each token [B, N, C] through an attention-pool head (timm ``AttentionPoolLatent``) as if
    the latent query attended to that token alone: its value, the output projection, then the head's
    MLP residual. The head's pooled output is the attention-weighted mean of these before the MLP, so
    a patch's feature lands where the pooled embedding lives (docs/architecture.md §2.1)."""
    width = tokens.shape[-1]
    out = pool.proj(pool.kv(tokens)[..., width:])
    return out if pool.mlp is None else out + pool.mlp(pool.norm(out))


def _is_timm(visual) -> bool:
    from open_clip.timm_model import TimmModel
    return isinstance(visual, TimmModel) or type(visual) in _families()[0]


@register
class TimmViT(Tower):
    name = "timm_vit"

    @classmethod
    def matches(cls, visual) -> bool:
        return _is_timm(visual) and unsupported_part(visual) is None

    @classmethod
    def unsupported(cls, visual) -> str | None:
        return unsupported_part(visual) if _is_timm(visual) else None

    def __init__(self, visual, config=None) -> None:
        super().__init__(visual, config)
        self.trunk_module = _trunk(visual)
        self._ropes: dict[tuple, torch.Tensor | None] = {}

    @property
    def patch_size(self) -> int:
        size = pair(self.trunk_module.patch_embed.patch_size)
        if size[0] != size[1]:
            raise ValueError(f"patch size {size} is not square")
        return size[0]

    @property
    def prefix_tokens(self) -> int:
        return self.trunk_module.num_prefix_tokens

    @property
    def has_cls(self) -> bool:
        return self.trunk_module.cls_token is not None

    @property
    def num_blocks(self) -> int:
        return len(self.trunk_module.blocks)

    @property
    def normalisation(self) -> Normalisation:
        """open_clip's from the tag (``image_mean``/``image_std``); a bare timm model's from its
        pretrained config (ImageNet's for DINO)."""
        if self.trunk_module is self.visual:
            config = self.visual.pretrained_cfg
            return Normalisation(tuple(255 * v for v in config["mean"]), tuple(255 * v for v in config["std"]))
        return model_normalisation(self.visual)

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk_module.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.trunk_module.patch_embed.proj.weight.device

    def embed(self, images: torch.Tensor, positions: str = POSITIONS[0]) -> tuple[torch.Tensor, tuple[int, int]]:
        """timm's ``patch_embed`` → ``_pos_embed`` → ``norm_pre`` at any grid (the stock forward only
        takes the native size): the absolute table resampled as ``positions`` says, prefix tokens
        concatenated before or after it as the trunk's ``no_embed_class`` says."""
        trunk = self.trunk_module
        x = trunk.patch_embed.proj(images.to(self.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = trunk.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [token.to(x.dtype).expand(x.shape[0], -1, -1)
                  for token in (trunk.cls_token, getattr(trunk, "reg_token", None)) if token is not None]
        pos = None
        if trunk.pos_embed is not None:
            table_prefix = 0 if trunk.no_embed_class else self.prefix_tokens
            pos = resample_positions(trunk.pos_embed[0], table_prefix, pair(trunk.patch_embed.grid_size), grid,
                                     positions).to(x.dtype)
        if pos is not None and trunk.no_embed_class:  # the table covers the patches alone
            x = x + pos
        x = torch.cat(prefix + [x], dim=1)
        if pos is not None and not trunk.no_embed_class:
            x = x + pos
        return trunk.norm_pre(x), grid

    def rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The rotary embedding [h'w', 2·d] of a grid, or None for a tower without one; computed once
        per grid. ``get_embed(shape=…)`` builds it for any grid (DINOv3's, and a dynamic-size tower's),
        except where a tower built for a fixed size caches its native grid's table: there another
        grid's table is built from the frequency bands as timm's dynamic-size forward builds it."""
        rope = getattr(self.trunk_module, "rope", None)
        if rope is None:
            return None
        key = (grid, self.device)
        if key not in self._ropes:
            native = tuple(pair(self.trunk_module.patch_embed.grid_size))
            if not getattr(rope, "_use_cached_embed", False):
                self._ropes[key] = rope.get_embed(shape=list(grid))
            elif tuple(grid) == native:
                self._ropes[key] = rope.get_embed()
            else:
                self._ropes[key] = rope._build_embed_cat(list(grid), rope.bands)
        return self._ropes[key]

    def block(self, index: int, grid: tuple[int, int]) -> TimmBlock:
        return TimmBlock(self.trunk_module.blocks[index], self.rope(grid))

    def final(self, patches: torch.Tensor) -> torch.Tensor:
        """The trunk's final norm, then (``pool_head``) its attention-pool head's value path or
        nothing, ``fc_norm``, its classifier-as-projection and open_clip's head."""
        trunk = self.trunk_module
        x = self.final_norm(patches)
        if trunk.attn_pool is not None and self.config.pool_head == "value":
            x = attention_pool_value_path(trunk.attn_pool, x)
        x = trunk.head(trunk.fc_norm(x))
        return x if trunk is self.visual else self.visual.head(x)

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk_module.norm(tokens)
