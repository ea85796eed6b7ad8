"""Every Segmentor parameter: one flat name, its default, its meaning and its valid values.

The flat names are the public interface (``Segmentor(**params)``, the command line, the records).
Inside, :func:`build_config` turns the resolved values into each stage's typed config once
(``WindowConfig``, ``DecisionConfig``, ``TLPConfig``, ``PAMRConfig``, each method's ``Config``),
whose field defaults read this table. The defaults are PEARL's released settings;
``pearl.protocol(method, dataset)`` gives the per-dataset values (docs/api.md).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, NamedTuple

NO_PAPER_VARIANT = object()


class Param(NamedTuple):
    default: Any
    meaning: str
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None  # a range rule beyond the type
    valid: str = ""                             # that rule, as the error states it
    paper: Any = NO_PAPER_VARIANT               # the PEARL paper's value where it states one the code does not use


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda value: value >= low


def _above(low: float) -> Callable[[Any], bool]:
    return lambda value: value > low


PARAMS: dict[str, Param] = {
    "resize_short": Param(336, "short side after the keep-ratio rescale (0 = no resize)", check=_at_least(0),
                          valid="≥ 0"),
    "resize_long": Param(2048, "cap on the long side of the rescale", check=_above(0), valid="> 0"),
    "slide_crop": Param(224, "window side in pixels; 0 = whole image in one pass", check=_at_least(0), valid="≥ 0",
                        paper=224),  # PEARL's released VOC protocol is the whole image
    "slide_stride": Param(112, "window stride in pixels", check=_above(0), valid="> 0"),
    "logit_scale": Param(40.0, "temperature applied to cosine logits before the softmax over queries",
                         check=_above(0), valid="> 0"),
    "prob_thd": Param(0.0, "pixels whose top class probability is below this become class 0",
                      check=lambda v: 0 <= v <= 1, valid="in [0, 1]"),
    "area_thd": Param(0.0, "SCLIP/SFP area filter: foreground classes covering ≤ this fraction of the "
                           "foreground-predicted pixels are dropped; 0 = off", check=lambda v: 0 <= v < 1,
                      valid="in [0, 1)"),
    "arch": Param(None, "last block: 'reduced' (no residual, no FFN) or 'vanilla' (full block); "
                        "None = the method's own (pearl: reduced, vanilla: vanilla)", (None, "reduced", "vanilla"),
                  paper="vanilla"),
    "alpha_kk": Param(0.08, "weight of PEARL's key-key term α_kk·s·K_cK_cᵀ (0.3 on ADE20K and Cityscapes)"),
    "use_kk": Param(True, "PEARL's key-key term on/off (off = the paper's Ã = softmax(s·Q K̃ᵀ))", paper=False),
    "pa_solver": Param("polar", "PA rotation: 'polar' (released 5-step Newton–Schulz) or 'svd' (exact UVᵀ)",
                       ("polar", "svd"), paper="svd"),
    "pa_iters": Param(5, "Newton–Schulz iterations of the polar solver", check=_at_least(0), valid="≥ 0"),
    "tlp_site": Param("post_fusion", "where TLP runs: 'post_fusion' (released: once, on the fused logits at the "
                                     "original size) or 'per_window' (paper: on each window before fusion)",
                      ("post_fusion", "per_window"), paper="per_window"),
    "tlp_grid": Param(80, "TLP target grid side (224 on Cityscapes)", check=_at_least(1), valid="≥ 1"),
    "tlp_cg_iters": Param(25, "conjugate-gradient iterations, from X0 = Z, no early stop", check=_at_least(0),
                          valid="≥ 0"),
    "tlp_pool": Param("int_stride", "'int_stride' (released: stride round(H/grid), floor pooling) or 'adaptive' "
                                    "(paper: adaptive pooling to grid×grid)", ("int_stride", "adaptive"),
                      paper="adaptive"),
    "tlp_softmax_temp": Param(1.0, "temperature of the softmax that gives TLP's probabilities (released: 1, raw "
                                   "cosines; the paper does not state the scale)", check=_above(0), valid="> 0"),
    "tlp_quadform": Param("diag", "text terms: 'diag' (released: only G's diagonal) or 'full' (paper: pᵀGp)",
                          ("diag", "full"), paper="full"),
    "tlp_grad_norm": Param("mean", "edge term: 'mean' (released: gradients divided by their mean) or 'none'",
                           ("mean", "none"), paper="none"),
    "tlp_edge_clamp": Param(True, "clamp edge weights to [0, 1] (released) or not (paper)", paper=False),
    # TLP solves (ρ + τL)X = ρZ by conjugate gradients, which needs the system positive definite:
    # ρ ≥ ε² > 0 and the Laplacian's edge weights exp(−κ·g)(1 + λ·gate) ≥ 0, so τ, λ, κ ≥ 0 and ε > 0
    "tlp_tau": Param(1.0, "TLP smoothness weight τ", check=_at_least(0), valid="≥ 0"),
    "tlp_lambda": Param(1.0, "TLP text-gate weight λ", check=_at_least(0), valid="≥ 0"),
    "tlp_tau_s": Param(0.5, "temperature of the text-affinity softmax (divides the cosines)", check=_above(0),
                       valid="> 0"),
    "tlp_beta": Param(10.0, "diagonal boost of the text affinity", check=_at_least(0), valid="≥ 0"),
    "tlp_kappa": Param(5.0, "edge sharpness κ", check=_at_least(0), valid="≥ 0"),
    "tlp_eps": Param(0.05, "confidence floor of TLP's data weight", check=_above(0), valid="> 0"),
    "pamr": Param(False, "NACLIP's PAMR refinement after fusion (the comparison tables use NACLIP without it)"),
    "pamr_iters": Param(10, "PAMR iterations", check=_at_least(0), valid="≥ 0"),
    "pamr_dilations": Param((8, 16), "PAMR neighbour dilations"),
    "naclip_gauss_std": Param(5.0, "std (in patches) of NACLIP's Gaussian neighbourhood bias", check=_above(0),
                              valid="> 0"),
    "gem_iters": Param(1, "GEM's self-self attention iterations before the value assignment", check=_at_least(0),
                       valid="≥ 0"),
    "gem_temperature": Param(0.0, "GEM's inverse temperature of the self-self attention; 0 = the released "
                                  "adaptive one (the tokens' mean norm × head_dim^-1/2, per image)",
                             check=_at_least(0), valid="≥ 0"),
    "gem_residual": Param(False, "GEM path summed over its blocks from their input (GEMWrapper's "
                                 "ignore_residual=False) instead of the last block's self-self attention alone "
                                 "(as ClearCLIP runs it: ignore_residual=True)"),
    "gem_depth": Param(7, "GEM wraps the last depth − 1 blocks (released 7: six blocks); used with gem_residual",
                       check=_at_least(2), valid="≥ 2"),
    "sfp_outlier": Param("som", "SFP outlier detector: 'som' (released), 'l2' or 'lof'", ("som", "l2", "lof")),
    "sfp_purify": Param(True, "SFP purification of outlier tokens on/off"),
    "sfp_res_cls": Param(0.3, "SFP's CLS residual weight (also sets its res_cls·5 detection scale)"),
    "sfp_nan_guard": Param(False, "leave an outlier with no clean neighbour unpurified instead of zeroing it "
                                  "(the released zero vector turns the whole window NaN)"),
    "sfp_layers": Param(None, "SFP layer map [pre, post, first, last] (1-based block outputs); None = the released "
                              "(9, 4, 4, 10), valid only for 12-block ViTs"),
    "scclip_res_cls": Param(0.3, "SC-CLIP's weight of the CLS token added to both branches of its last block"),
    "scclip_layers": Param(None, "SC-CLIP layer map [pre, post, first, last] (1-based block outputs: the similarity "
                                 "before and after the last block, the multi-level sum first..last); None = the "
                                 "released (9, 4, 4, 10), valid only for 12-block ViTs"),
    "resclip": Param(False, "ResCLIP's RCS and SFR on the last block of sclip, naclip or clearclip (its released "
                            "per-dataset weights come with it in a run)"),
    "resclip_temp_thd": Param(0.5, "ResCLIP SFR: first-pass pixels whose top query probability is below this count "
                                   "as query 0", check=lambda v: 0 <= v <= 1, valid="in [0, 1]"),
    "resclip_rcs_tau": Param(2.0, "ResCLIP RCS: τ of A ← τ((1−λ)A + λ·A_rcs), after the softmax"),
    "resclip_rcs_lambda": Param(0.3, "ResCLIP RCS: λ, the share of blocks 6–9's mean query·key attention",
                                check=lambda v: 0 <= v <= 1, valid="in [0, 1]"),
    "resclip_sfr_tau": Param(2.2, "ResCLIP SFR: τ of S ← τ((1−λ)S + λ·prior), on the logits before the softmax"),
    "resclip_sfr_lambda": Param(0.7, "ResCLIP SFR: λ, the share of the same-class prior",
                                check=lambda v: 0 <= v <= 1, valid="in [0, 1]"),
    "resclip_same_entity": Param(True, "ResCLIP SFR: decay same-class pairs whose connecting line leaves the class "
                                       "(released delete_same_entity)"),
    "proxyclip_beta": Param(1.2, "ProxyCLIP: β of the proxy attention γ·(S − β·mean S), entries below 0 → −∞"),
    "proxyclip_gamma": Param(3.0, "ProxyCLIP: γ, the proxy attention's temperature", check=_above(0), valid="> 0"),
    "lposs_k": Param(400, "LPOSS: neighbours of each patch in its graph over all windows' patches (capped at the "
                          "image's patch count)", check=_at_least(1), valid="≥ 1"),
    "lposs_feature": Param("v", "LPOSS: the vision model's last-block projection whose cosine builds the graph: "
                                "'v' (released), 'k' or 'q'", ("q", "k", "v")),
    "lposs_gamma": Param(3.0, "LPOSS: power γ of a neighbour's cosine (negatives 0) in its edge weight",
                         check=_above(0), valid="> 0"),
    "lposs_sigma": Param(0.01, "LPOSS: σ of an edge's spatial factor exp(−σ·d^p), d between patch centres in input "
                               "pixels (0: none)", check=_at_least(0), valid="≥ 0"),
    "lposs_distance_power": Param(1.0, "LPOSS: the power p of that distance", check=_above(0), valid="> 0"),
    "lposs_alpha": Param(0.95, "LPOSS: α of the propagation (I − α·Wn)⁻¹Y over the patches",
                         check=lambda v: 0 <= v < 1, valid="in [0, 1)"),
    "lposs_iters": Param(10, "LPOSS: conjugate-gradient steps at most per query (released 10), each stopping "
                             "at a residual of 1e-6 of its start", check=_at_least(0), valid="≥ 0"),
    "cass_global_weight": Param(0.0, "CASS: weight g of the image's CLS similarity in the logits, "
                                     "(1 − g)·cos(patch, adjusted prompt) + g·cos(CLS, prompt) (per dataset)",
                                check=lambda v: 0 <= v <= 1, valid="in [0, 1]"),
    "cass_mean_vector_weight": Param(0.0, "CASS: weight with which each cluster's chosen prompt moves towards the mean "
                                          "of its two most similar patches (per dataset)",
                                     check=lambda v: 0 <= v <= 1, valid="in [0, 1]"),
    "cass_h_threshold": Param(0.0, "CASS: the height at which the Ward tree of the prompts' cosine distances is cut "
                                   "into clusters (per dataset)", check=_at_least(0), valid="≥ 0"),
    "cass_global_embedding": Param("image", "CASS: the CLS embedding the logits read when sliding: the whole "
                                            "image's ('image', released) or each window's ('window', released on "
                                            "Cityscapes)", ("image", "window")),
    "cass_gauss_std": Param(5.0, "CASS: std (in patches) of the Gaussian neighbourhood bias added to its attention",
                            check=_above(0), valid="> 0"),
    "cass_vfm_weight": Param(10.0, "CASS: scale f of a head pair's spectral distance w in the mix "
                                   "(w·f·A_vision + A_CLIP)/(w·f + 1)", check=_at_least(0), valid="≥ 0"),
    "cass_eigenvalues": Param(20, "CASS: largest eigenvalues of each head's key-key adjacency compared between the "
                                  "two models", check=_at_least(1), valid="≥ 1"),
    "cass_rank": Param(10, "CASS: rank of the vision model's adjacency after its low-rank approximation (released "
                           "10: its energy rule always stops at the first rank tried)", check=_at_least(1),
                       valid="≥ 1"),
    "cass_low_rank": Param("randomized", "CASS: that approximation by a randomised SVD ('randomized', released: "
                                         "torch.svd_lowrank, 2 power iterations, test matrices from a generator "
                                         "seeded per window) or the exact truncated SVD ('exact')",
                           ("randomized", "exact")),
    "cass_rescale_singular_values": Param(True, "CASS: kept singular values stretched to [0.5·min, 1.5·max] "
                                                "(released everywhere but VOC20 and Cityscapes)"),
    "cass_head_pairing": Param("released", "CASS: which vision head mixes into CLIP head i after the Hungarian "
                                           "matching of their spectra: 'released' (vision head c(i), c(i) the CLIP "
                                           "head matched to vision head i: indices crossed as in its code) or "
                                           "'matched' (the vision head matched to CLIP head i)",
                               ("released", "matched")),
    "glaclip_across_windows": Param(True, "GLA-CLIP: each patch attends over the patches of all windows of the image "
                                          "(its KV extension; false: of its own window)"),
    "glaclip_anchors": Param(True, "GLA-CLIP: attention from proxy anchors (each patch replaced by the mean of the "
                                   "patches more similar to it than the threshold) instead of the patch itself"),
    "glaclip_anchor_iters": Param(2, "GLA-CLIP: anchor refinements (predict.sh's --mini_iters 2)", check=_at_least(0),
                                  valid="≥ 0"),
    "glaclip_anchor_threshold": Param(0.55, "GLA-CLIP: cosine above which a patch joins an anchor (eval.py's default "
                                            "0.55: predict.sh sets 0.6 but never passes it)",
                                      check=lambda v: -1 <= v < 1, valid="in [-1, 1)"),
    "glaclip_beta": Param(1.2, "GLA-CLIP: β of (S − β·mean S)·γ without dynamic_beta"),
    "glaclip_gamma": Param(3.0, "GLA-CLIP: γ without dynamic_gamma", check=_above(0), valid="> 0"),
    "glaclip_dynamic_beta": Param(True, "GLA-CLIP: β = 1 + α_β·ln(1 + windows) (more windows, more of the mean "
                                        "removed)"),
    "glaclip_beta_alpha": Param(0.3, "GLA-CLIP: α_β", check=_at_least(0), valid="≥ 0"),
    "glaclip_dynamic_gamma": Param(True, "GLA-CLIP: γ = 1 + α_γ / support, the support a patch's anchor member "
                                         "count (sharper for patches with few similar ones)"),
    "glaclip_gamma_alpha": Param(30.0, "GLA-CLIP: α_γ", check=_at_least(0), valid="≥ 0"),
    "glaclip_cut": Param(0.0, "GLA-CLIP: attention logits below min(row max, cut) are −∞ (its cutting_hp)"),
    "glaclip_temperature": Param(1.0, "GLA-CLIP: temperature of the attention's softmax", check=_above(0),
                                 valid="> 0"),
    "lposs_plus": Param(False, "LPOSS+: label propagation over the pixels of the fused logits at the input size, "
                               "on the image's colours (the method lposs's second stage; any method can use it)"),
    "lposs_plus_window": Param(13, "LPOSS+: side r of each pixel's neighbourhood (neighbours within r // 2)",
                               check=_at_least(3), valid="≥ 3"),
    "lposs_plus_tau": Param(0.01, "LPOSS+: τ of an edge weight exp(−‖Δ Lab‖/τ), Lab scaled to [0, 1]",
                            check=_above(0), valid="> 0"),
    "lposs_plus_alpha": Param(0.95, "LPOSS+: α of the propagation over the pixels", check=lambda v: 0 <= v < 1,
                              valid="in [0, 1)"),
    "lposs_plus_iters": Param(10, "LPOSS+: conjugate-gradient steps at most per query", check=_at_least(0),
                              valid="≥ 0"),
    "pool_head": Param("value", "patch tokens on a tower whose embedding comes from an attention-pool head (SigLIP, "
                                "PE-Core): 'value' through the head's value path (value, projection, MLP, as if the "
                                "latent query attended to that token alone) or 'skip' (final norm and projection "
                                "only); no effect on CLS towers", ("value", "skip")),
    "templates": Param("openai80", "prompt templates: 'openai80' (the 80 OpenAI ImageNet templates, released), "
                                   "'single' ('a photo of a {}.') or a file of templates, one per line, each with {}",
                       check=lambda v: v in ("openai80", "single") or os.path.isfile(v),
                       valid="openai80, single or an existing file"),
    "text_cache_dir": Param(None, "disk cache of text prototypes (None = $PEARL_CACHE/text, '' = off)"),
}

_SEQUENCE_PARAMS = ("pamr_dilations", "sfp_layers", "scclip_layers")


def paper_variants() -> dict[str, Any]:
    """name → the paper's value, for every parameter where the paper states a value the released
    code does not use (docs/pearl.md §6)."""
    return {name: spec.paper for name, spec in PARAMS.items() if spec.paper is not NO_PAPER_VARIANT}


def code_vs_paper_runs() -> list[tuple[str, dict[str, Any]]]:
    """(title, overrides) of the code-vs-paper measurement: the released code, each paper variant
    alone, then all of them together."""
    variants = paper_variants()
    return ([("released code", {})] + [(f"{name}={_cli(value)}", {name: value}) for name, value in variants.items()]
            + [("all paper variants", variants)])


def _cli(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)



def resolve(overrides: dict) -> dict:
    """Defaults updated by ``overrides``; unknown names, ill-typed or out-of-range values, and
    values that together cannot give a number (:func:`check_together`) raise ValueError."""
    unknown = sorted(set(overrides) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; {did_you_mean(unknown[0], PARAMS)}"
                         f"valid: {', '.join(PARAMS)}")
    resolved = {name: p.default for name, p in PARAMS.items()}
    for name, value in overrides.items():
        resolved[name] = _check(name, value)
    check_together(resolved)
    return resolved


def check_together(resolved: dict) -> None:
    """Rules between parameters: sliding windows must cover every pixel (a stride above the window
    leaves pixels no window sees, whose fused logits are 0/0)."""
    crop, stride = resolved["slide_crop"], resolved["slide_stride"]
    if crop > 0 and stride > crop:
        raise ValueError(f"slide_stride={stride} is larger than slide_crop={crop}: the pixels between windows would "
                         f"get no logits; use slide_stride ≤ slide_crop (released: half the window)")


def did_you_mean(name: str, valid) -> str:
    """"did you mean 'X'? " for the closest valid name, or ""."""
    import difflib
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _check(name: str, value: Any) -> Any:
    spec = PARAMS[name]
    if name in _SEQUENCE_PARAMS:
        if value is None and spec.default is None:
            return None
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a list of integers, got {value!r}") from None
    if spec.choices:
        if value not in spec.choices:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, spec.choices))}")
        return value
    default = spec.default
    if default is None or isinstance(default, str):
        value = value if value is None else str(value)
        if spec.check is not None and not spec.check(value):
            raise ValueError(f"{name}={value!r} is not valid; valid: {spec.valid}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number; give a value {spec.valid or 'that is finite'}")
    if isinstance(default, int) and float(value) != int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = type(default)(value)
    if spec.check is not None and not spec.check(value):
        raise ValueError(f"{name}={value!r} is out of range: it must be {spec.valid}")
    return value


def param_name(prefix: str, field_name: str) -> str:
    """The flat name of a config field: the stage's prefix + the field (``lambda_`` → ``tlp_lambda``)."""
    return prefix + field_name.rstrip("_")


def config_params(cls, prefix: str = "") -> dict[str, str]:
    """Field name → flat parameter of a stage's config: ``prefix + f``, or the name a field's
    ``metadata["param"]`` gives (a part several methods share, e.g. ResCLIP's)."""
    return {f.name: f.metadata.get("param") or param_name(prefix, f.name) for f in dataclasses.fields(cls)}


def build_config(cls, resolved: dict, prefix: str = ""):
    """A stage's typed config from resolved flat parameters (``config_params``)."""
    return cls(**{name: resolved[param] for name, param in config_params(cls, prefix).items()})


def default(name: str) -> Any:
    """The default of a parameter, for a config field's default."""
    return PARAMS[name].default


def valid_values(name: str) -> str:
    """What ``name`` accepts, in words (its choices, its range, or its type)."""
    spec = PARAMS[name]
    if spec.choices:
        return ", ".join("null" if c is None else str(c) for c in spec.choices)
    if name in _SEQUENCE_PARAMS:
        return "list of integers" + (" or null" if spec.default is None else "")
    if isinstance(spec.default, bool):
        return "true, false"
    if spec.default is None or isinstance(spec.default, str):
        return spec.valid or "a string or null"
    kind = "integer" if isinstance(spec.default, int) else "number"
    return f"{kind} {spec.valid}" if spec.valid else kind


def markdown_table() -> str:
    """docs/parameters.md's table, generated from ``PARAMS`` (``python -m pearl.params``)."""
    def shown(value) -> str:
        return str(value).lower() if isinstance(value, bool) else repr(value)
    lines = ["| name | default | valid | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| `{name}` | `{shown(p.default)}` | {valid_values(name)} | {p.meaning} |"
                               for name, p in PARAMS.items()])


def main(argv: list[str] | None = None) -> None:
    """``python -m pearl.params``: the parameter table of docs/parameters.md; ``--code-vs-paper``: the overrides of
    each code-vs-paper run as run.py arguments, one line per run (``experiments/code_vs_paper.sh``)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m pearl.params", description=main.__doc__)
    parser.add_argument("--code-vs-paper", action="store_true", help="print the code-vs-paper runs' overrides")
    if parser.parse_args(argv).code_vs_paper:
        for _, overrides in code_vs_paper_runs():
            print(" ".join(f"{name}={_cli(value)}" for name, value in overrides.items()))
    else:
        print(markdown_table())


if __name__ == "__main__":
    main()
