"""Tiny seeded random CLIPs for offline smoke runs and the tests, one per image-tower family.

Random weights: a tiny model's mIoU is a smoke figure, never a result. Every tiny tower has 12 blocks
(SFP and SC-CLIP read fixed layer positions), width 64 in 2 heads of 32 and 16-pixel patches on a
64-pixel input; a timm family's tower is the named timm architecture at that size (its block, rotary
embedding, norms and pooling head as in the real one), registered with timm as ``pearl_tiny_<family>``
because open_clip builds timm towers by name.
"""
from __future__ import annotations

import open_clip
import torch

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_CONFIG = {"embed_dim": 32, "quick_gelu": True,
               "vision_cfg": {"image_size": 64, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
               "text_cfg": TINY_TEXT}

_TIMM_SIZE = {"embed_dim": 64, "num_heads": 2, "depth": 12, "img_size": 64}
# family → (timm architecture, open_clip's timm_pool and timm_proj for it): as in open_clip's model
# configs EVA02-B-16, PE-Core-B-16 and ViT-B-16-SigLIP2
TIMM_FAMILIES = {"eva02": ("eva02_base_patch16_clip_224", "token", None),
                 "pe_core": ("vit_pe_core_base_patch16_224", "map", None),
                 "siglip": ("vit_base_patch16_siglip_224", "map", "none")}
FAMILIES = ("vit", *TIMM_FAMILIES)


def tiny_config(family: str = "vit") -> dict:
    """The open_clip model config of the tiny CLIP of a tower family (one of ``FAMILIES``)."""
    if family == "vit":
        return TINY_CONFIG
    if family not in TIMM_FAMILIES:
        raise ValueError(f"tiny tower family {family!r} is not one of {', '.join(FAMILIES)}")
    _, pool, proj = TIMM_FAMILIES[family]
    # without a projection the trunk's width is the joint embedding's
    embed_dim = _TIMM_SIZE["embed_dim"] if proj == "none" else TINY_CONFIG["embed_dim"]
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": 64, "timm_model_name": f"pearl_tiny_{family}", "timm_pool": pool,
                           "timm_proj": proj},
            "text_cfg": TINY_TEXT}


def _register_timm_architectures() -> None:
    import timm
    from timm.models import register_model
    for family, (architecture, _, _) in TIMM_FAMILIES.items():
        name = f"pearl_tiny_{family}"
        if timm.is_model(name):
            continue

        def entrypoint(pretrained: bool = False, _architecture=architecture, **kwargs):
            return timm.create_model(_architecture, pretrained=pretrained, **(_TIMM_SIZE | kwargs))
        entrypoint.__name__ = entrypoint.__qualname__ = name
        register_model(entrypoint)


def tiny_clip(seed: int = 0, config: dict | None = None):
    """(model, tokenizer): the seeded random tiny CLIP of ``config`` (default ``TINY_CONFIG``;
    ``tiny_config(family)`` for another tower family), eval mode."""
    config = config or TINY_CONFIG
    if str(config["vision_cfg"].get("timm_model_name", "")).startswith("pearl_tiny_"):
        _register_timm_architectures()
    torch.manual_seed(seed)
    return open_clip.CLIP(**config).eval(), open_clip.get_tokenizer("ViT-B-16")
