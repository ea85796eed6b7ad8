"""Each last-block variant against an independent re-derivation from the spec's formulas."""
import copy
import math

import pytest
import torch

from pearl.methods import available_methods, get_method
from pearl.methods.naclip import neighbourhood_bias
from pearl.procrustes import polar_newton_schulz, polar_svd, procrustes_rotation, procrustes_weights
from pearl.towers import tower_for

from .conftest import build_method
from .reference import blocks as ref


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randn(2, 1 + 12, 64)  # grid 3×4


def _run(name, model, x, **overrides):
    from pearl.towers import tower_for
    overrides.setdefault("arch", "reduced")
    return build_method(name, **overrides).last_block(tower_for(model.visual), x, [], (3, 4), {})


def test_registry_holds_the_methods_in_order():
    methods = available_methods()
    assert {"clearclip", "maskclip", "naclip", "pearl", "sclip", "sfp", "vanilla"} <= set(methods)
    assert methods == sorted(methods)
    with pytest.raises(ValueError, match="valid: cass, clearclip"):
        get_method("nosuchclip")


def test_vanilla_full_block(tiny_model, tokens):
    block = tiny_model.visual.transformer.resblocks[-1]
    q, k, v = ref.qkv(block, tokens)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(ref.DIM), dim=-1)
    expected = ref.full_block(block, tokens, attn @ v)[:, 1:]
    assert torch.allclose(_run("vanilla", tiny_model, tokens, arch="vanilla"), expected, atol=1e-5)
    # stock open_clip block gives the same
    assert torch.allclose(block(tokens)[:, 1:], expected, atol=1e-5)


def test_sclip_sums_two_maps(tiny_model, tokens):
    block = tiny_model.visual.transformer.resblocks[-1]
    q, k, v = ref.qkv(block, tokens)
    s = ref.DIM ** -0.5
    attn = torch.softmax(s * q @ q.transpose(-1, -2), -1) + torch.softmax(s * k @ k.transpose(-1, -2), -1)
    expected = ref.full_block(block, tokens, attn @ v)[:, 1:]
    assert torch.allclose(_run("sclip", tiny_model, tokens), expected, atol=1e-5)


def test_maskclip_is_the_value_path_through_the_output_projection(tiny_model, tokens):
    """ClearCLIP's model_type='MaskCLIP': softmax over a 0-diagonal / −∞ mask (the identity) times v,
    out_proj, no residual, no MLP; the identity is what it hands back as its attention."""
    from pearl.methods.base import ATTENTION
    block = tiny_model.visual.transformer.resblocks[-1]
    _, _, v = ref.qkv(block, tokens)
    mask = torch.full((13, 13), float("-inf")).fill_diagonal_(0)
    expected = ref.out_proj(block, torch.softmax(mask, -1) @ v)[:, 1:]
    asked = {ATTENTION: None}
    ours = build_method("maskclip").last_block(tower_for(tiny_model.visual), tokens, [], (3, 4), asked)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.equal(asked[ATTENTION], torch.eye(13).expand(2, ref.HEADS, 13, 13))


def _constant_value_model(tiny_model):
    """A copy whose last block has v ≡ 1, identity out_proj and a zero MLP: output − x = A's row sums."""
    model = copy.deepcopy(tiny_model)
    block = model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        block.attn.in_proj_weight[128:] = 0
        block.attn.in_proj_bias[128:] = 1
        block.attn.out_proj.weight.copy_(torch.eye(64))
        block.attn.out_proj.bias.zero_()
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
    return model


@pytest.mark.parametrize("name, row_sum, arch", [("sclip", 2.0, None), ("naclip", 1.0, None),
                                                 ("clearclip", 1.0, None), ("pearl", 1.0, "reduced"),
                                                 ("vanilla", 1.0, "vanilla")])
def test_attention_rows_sum(tiny_model, tokens, name, row_sum, arch):
    model = _constant_value_model(tiny_model)
    out = _run(name, model, tokens, arch=arch or "reduced", pa=name == "pearl")
    if name in ("sclip", "vanilla"):  # residual kept: subtract x
        out = out - tokens[:, 1:]
    assert torch.allclose(out, torch.full_like(out, row_sum), atol=1e-5)


def test_naclip_bias_matrix():
    omega = neighbourhood_bias(3, 4, 5.0)
    assert omega.shape == (13, 13)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    assert torch.allclose(torch.diagonal(omega)[1:], torch.ones(12))
    # patch (0,0) ↔ (2,3): distance² = 4 + 9
    assert omega[1, 12].item() == pytest.approx(math.exp(-13 / 50), rel=1e-6)
    # upstream's construction: one-hot maps convolved with a (2h−1)×(2w−1) Gaussian window, 'same' padding
    ys = torch.arange(-2, 3, dtype=torch.float32)
    xs = torch.arange(-3, 4, dtype=torch.float32)
    window = torch.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / 50)
    eye = torch.eye(12).view(12, 1, 3, 4)
    conv = torch.nn.functional.conv2d(eye, window[None, None], padding="same").view(12, 12)
    assert torch.allclose(omega[1:, 1:], conv, atol=1e-6)


def test_naclip_last_block(tiny_model, tokens):
    block = tiny_model.visual.transformer.resblocks[-1]
    _, k, v = ref.qkv(block, tokens)
    attn = torch.softmax(k @ k.transpose(-1, -2) / math.sqrt(ref.DIM) + neighbourhood_bias(3, 4, 5.0), dim=-1)
    expected = ref.out_proj(block, attn @ v)[:, 1:]
    assert torch.allclose(_run("naclip", tiny_model, tokens), expected, atol=1e-5)


def test_clearclip_ignores_keys_but_not_queries(tiny_model, tokens):
    base = _run("clearclip", tiny_model, tokens)
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.visual.transformer.resblocks[-1].attn.in_proj_weight[64:128].normal_()
    assert torch.allclose(_run("clearclip", model, tokens), base, atol=1e-6)
    with torch.no_grad():
        model.visual.transformer.resblocks[-1].attn.in_proj_weight[:64].normal_()
    assert not torch.allclose(_run("clearclip", model, tokens), base, atol=1e-3)


@pytest.mark.parametrize("solver", ["polar", "svd"])
@pytest.mark.parametrize("alpha", [0.3, 0.0])  # 0: the paper's attention without the key-key term
def test_pa_matches_reference(solver, alpha):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    weights, stats = procrustes_weights(q, k, 16 ** -0.5, alpha_kk=alpha, solver=solver, diagnostics=True)
    assert torch.allclose(weights @ v, ref.procrustes_attention(q, k, v, alpha, solver=solver), atol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 9))
    if solver == "svd":
        assert stats["pa_orthogonality_error"] < 1e-4


def test_svd_rotation_is_orthogonal():
    torch.manual_seed(3)
    rotation, _, failed = procrustes_rotation(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), solver="svd")
    eye = torch.eye(8)
    assert torch.allclose(rotation.transpose(-1, -2) @ rotation, eye.expand_as(rotation), atol=1e-5) and not failed


def test_svd_failure_falls_back_to_identity_with_a_warning_and_a_count(monkeypatch):
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))

    def failing_svd(m):
        raise RuntimeError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    with pytest.warns(RuntimeWarning, match="the SVD failed, so this batch used R = I"):
        weights, stats = procrustes_weights(q, k, 8 ** -0.5, alpha_kk=0.0, solver="svd", diagnostics=True)
    assert stats["pa_svd_fallback"] == 1.0
    unaligned = torch.softmax((q * 8 ** -0.5) @ k.transpose(-1, -2), dim=-1)  # R = I: plain attention
    assert torch.allclose(weights, unaligned, atol=1e-6)


@pytest.mark.parametrize("nu, expected", [(1.0, 1.000), (0.125, 0.999), (0.05, 0.967), (0.02, 0.822),
                                          (0.01, 0.659), (1e-3, 0.237), (1e-4, 0.076)])
def test_polar_five_steps_shrinks_weak_directions_as_spec_table(nu, expected):
    """M = diag(√ν, √(1−ν²)^½·…): Γ/‖Γ‖ has eigenvalue ν on the first axis; R's first singular value is √ν·w5."""
    other = math.sqrt(1 - nu ** 2)
    m = torch.diag(torch.tensor([math.sqrt(nu), math.sqrt(other)], dtype=torch.float64))
    r = polar_newton_schulz(m, iters=5)
    assert r[0, 0].item() == pytest.approx(expected, abs=1.5e-3)


def test_polar_approaches_svd_with_more_iterations():
    torch.manual_seed(4)
    m = torch.randn(6, 6, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    exact, _ = polar_svd(m)
    errors = [torch.linalg.norm(polar_newton_schulz(m, iters) - exact).item() for iters in (1, 3, 5, 30)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[-1] < 1e-4  # the floor is set by the released +1e-6·I regulariser


@pytest.mark.parametrize("solver", ["polar", "svd"])
def test_pa_invariant_to_rotating_the_keys(solver):
    torch.manual_seed(5)
    q, k = (torch.randn(1, 2, 11, 8, dtype=torch.float64) for _ in range(2))
    ortho, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    weights, _ = procrustes_weights(q, k, 8 ** -0.5, solver=solver)
    rotated, _ = procrustes_weights(q, k @ ortho, 8 ** -0.5, solver=solver)
    assert torch.allclose(weights, rotated, atol=1e-8)


def test_pearl_pa_off_is_plain_query_key_attention_in_reduced_block(tiny_model, tokens):
    block = tiny_model.visual.transformer.resblocks[-1]
    q, k, v = ref.qkv(block, tokens)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(ref.DIM), dim=-1)
    expected = ref.out_proj(block, attn @ v)[:, 1:]
    assert torch.allclose(_run("pearl", tiny_model, tokens, pa=False), expected, atol=1e-5)
    with_pa = _run("pearl", tiny_model, tokens, pa=True)
    assert torch.allclose(with_pa, ref.out_proj(block, ref.procrustes_attention(q, k, v, 0.08))[:, 1:], atol=1e-4)
    no_kk = _run("pearl", tiny_model, tokens, pa=True, use_kk=False)
    assert torch.allclose(no_kk, ref.out_proj(block, ref.procrustes_attention(q, k, v, 0.0))[:, 1:], atol=1e-4)


@pytest.mark.parametrize("overrides, reference", [
    ({}, {}),                                                   # as ClearCLIP runs it: the last block alone
    ({"gem_iters": 3, "gem_temperature": 2.5}, {"iters": 3, "temperature": 2.5}),
    ({"gem_residual": True}, {"ignore_residual": False}),       # summed over the last six blocks
    ({"gem_residual": True, "gem_depth": 3}, {"ignore_residual": False, "depth": 3})])
def test_gem_matches_the_transcribed_self_self_attention(tiny_model, overrides, reference):
    from .reference import gem as gem_ref
    from .reference import sfp as sfp_ref
    torch.manual_seed(3)
    hidden, grid = sfp_ref.hidden_states(tiny_model, torch.randn(2, 3, 48, 64))
    method = build_method("gem", **overrides)
    assert method.needs_hidden_states == overrides.get("gem_residual", False)
    ours = method.last_block(tower_for(tiny_model.visual), hidden[-1], hidden, grid, {})
    expected = gem_ref.gem_path(tiny_model, hidden, **reference)[:, 1:]
    assert torch.allclose(ours, expected, atol=1e-5)


def test_gem_resamples_positions_by_size_with_antialiasing(tiny_model):
    import torch.nn.functional as F

    from pearl.towers.open_clip_vit import positional_embedding
    visual = tiny_model.visual
    pos = visual.positional_embedding.detach().float()
    assert torch.equal(positional_embedding(visual, 4, 4, "size_antialias"), pos)
    grid = pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 8), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(16, 64)
    out = positional_embedding(visual, 2, 8, "size_antialias")  # the native token count, another grid: resampled
    assert torch.equal(out[0], pos[0]) and torch.allclose(out[1:], expected)
    assert not torch.allclose(out, positional_embedding(visual, 2, 8), atol=1e-4)  # "+0.1" keeps the stock one


def test_cass_head_pairs_cross_the_indices_as_released():
    from pearl.methods.cass import head_pairs
    # rows: vision heads, columns: CLIP heads; the minimum-cost matching is 0→2, 1→0, 2→1 (cost 0.3)
    costs = torch.tensor([[0.9, 0.9, 0.1], [0.1, 0.9, 0.9], [0.9, 0.1, 0.9]]).numpy()
    # released: CLIP head i takes vision head c(i), c(i) the CLIP head matched to vision head i
    assert head_pairs(costs, "released") == [(0, 2), (1, 0), (2, 1)]
    # matched: CLIP head j takes the vision head matched to it (0 ← 1, 1 ← 2, 2 ← 0)
    assert head_pairs(costs, "matched") == [(0, 1), (1, 2), (2, 0)]


def test_cass_matching_ties_when_every_difference_keeps_its_sign():
    """docs/methods.md §13.3: with the vision spectra more concentrated than CLIP's at every rank the
    cost of a pair is a sum a_i + b_j, so every matching of the heads costs the same."""
    import itertools

    from pearl.methods.cass import spectral_costs
    torch.manual_seed(0)
    tops = torch.tensor([0.9, 0.6, 0.4]).view(1, 3, 1)
    vision = torch.cat([tops, torch.rand(1, 3, 5) * 0.01], dim=-1).double()
    clip = torch.cat([torch.full((1, 3, 1), 0.3), 0.2 + torch.rand(1, 3, 5) * 0.05], dim=-1).double()
    costs = spectral_costs(vision, clip)[0]
    totals = [sum(costs[i, j].item() for i, j in enumerate(order)) for order in itertools.permutations(range(3))]
    assert max(totals) - min(totals) < 1e-6 and costs.std() > 1e-2  # different costs, equal matchings
    peaked = torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64).view(1, 1, 6)
    mixed = spectral_costs(vision, torch.cat([clip[:, :1], peaked, clip[:, 2:]], dim=1))[0]
    totals = [sum(mixed[i, j].item() for i, j in enumerate(order)) for order in itertools.permutations(range(3))]
    assert max(totals) - min(totals) > 1e-2  # a CLIP head more concentrated than the vision heads breaks it


def test_cass_randomized_low_rank_is_torch_svd_lowrank_with_the_same_draws():
    from pearl.methods.cass import low_rank
    torch.manual_seed(3)
    keys = torch.randn(40, 16, dtype=torch.float64)
    adjacency = keys @ keys.T
    generator = torch.Generator().manual_seed(7)
    u, s, v = low_rank(adjacency, 10, "randomized", generator)
    torch.manual_seed(7)
    ru, rs, rv = torch.svd_lowrank(adjacency, q=10)
    assert torch.allclose(s, rs, rtol=1e-10) and torch.allclose((u * s) @ v.T, (ru * rs) @ rv.T, atol=1e-9)
    eu, es, ev = low_rank(adjacency, 10, "exact")
    spectrum = torch.linalg.eigvalsh(adjacency).flip(0)
    assert torch.allclose(es, spectrum[:10], rtol=1e-9)  # a PSD matrix's singular values are its eigenvalues
    # Eckart–Young: the truncation's spectral-norm error is the 11th singular value
    assert math.isclose(torch.linalg.matrix_norm(adjacency - (eu * es) @ ev.T, 2).item(), spectrum[10].item(),
                        rel_tol=1e-9)
    assert (s[-1] - es[-1]).abs() > 1e-3 * es[-1]  # the randomised tail is an approximation


def test_cass_released_pixels_are_torchvisions_undo_truncated_by_numpy():
    import numpy as np
    from skimage import data
    from torchvision import transforms

    from pearl.methods.cass import released_pixels
    from pearl.preprocess import normalise
    window = normalise(data.astronaut()[:64, :80])
    undo = transforms.Normalize(mean=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255],
                                std=[1 / 0.229, 1 / 0.224, 1 / 0.255])
    expected = (undo(window.clone()).permute(1, 2, 0).numpy() * 255).astype("uint8")
    assert np.array_equal(released_pixels(window[None])[0].permute(1, 2, 0).numpy(), expected)


def test_glaclip_normalisation_by_hand():
    """(S − β·max(0, mean S))·γ per row, entries below min(row max, 0) dropped: a row of negative mean is
    not shifted; β grows with the window count, γ shrinks with the anchor's support."""
    from pearl.methods.glaclip import GLACLIPConfig, normalised_attention
    fixed = GLACLIPConfig(dynamic_beta=False, dynamic_gamma=False, beta=1.2, gamma=3.0)
    negative = torch.tensor([[-0.5, -0.2, 0.1, -0.9]])  # mean −0.375: no shift, only 0.1 ≥ 0
    assert torch.equal(normalised_attention(negative, None, 4, fixed), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    row = torch.tensor([[0.9, 0.5, 0.3, 0.1]])  # mean 0.45
    dynamic = GLACLIPConfig(beta_alpha=0.3, gamma_alpha=30.0)
    beta, gamma = 1 + 0.3 * math.log(1 + 6), 1 + 30 / 4
    logits = (row - 0.45 * beta) * gamma  # 0.9 alone stays above zero
    expected = torch.softmax(logits.masked_fill(logits < 0, float("-inf")), dim=-1)
    assert torch.allclose(normalised_attention(row, torch.tensor([[4.0]]), 6, dynamic), expected, atol=1e-6)
    assert torch.equal(expected, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    everything_below = torch.tensor([[-0.3, -0.1, -0.2]])  # the row max below the cut is kept
    out = normalised_attention(everything_below, None, 1, fixed)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0]]))


def test_glaclip_an_anchor_without_members_keeps_its_own_patch():
    """A query no key resembles above the threshold keeps its own patch as its anchor, by its index among
    all the image's patches (the rows are a slice of them)."""
    from pearl.methods.glaclip import GLACLIPConfig, anchored_similarity
    torch.manual_seed(2)
    keys = 0.5 * torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # half-length: no cosine·0.5 > 0.9
    config = GLACLIPConfig(anchor_iters=1, anchor_threshold=0.9)
    similarity, support = anchored_similarity(keys, slice(3, 5), config)
    assert torch.allclose(similarity, torch.nn.functional.normalize(keys[3:5], dim=-1) @ keys.T, atol=1e-6)
    assert torch.equal(support, torch.ones(2, 1))
