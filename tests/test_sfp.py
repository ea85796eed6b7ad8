"""SFP against a literal transcription of docs/methods.md §6.1 (loops over outlier cells)."""

import pytest
import torch

from pearl.methods.calibration import purify
from pearl.towers import tower_for

from .conftest import build_method
from .reference import sfp as ref


def test_sfp_matches_reference(tiny_model):
    torch.manual_seed(7)
    images = torch.randn(1, 3, 160, 176)
    hidden, grid = ref.hidden_states(tiny_model, images)
    ours = build_method("sfp").last_block(tower_for(tiny_model.visual), hidden[-1], hidden, grid, {})
    expected, cells = ref.last_block(tiny_model, hidden, grid)
    assert cells  # the random model does produce outliers
    assert torch.allclose(ours[0], expected, atol=1e-4)


def test_purify_isolated_outlier_nan_guard():
    tokens = torch.arange(2 * 9 * 2, dtype=torch.float32).view(2, 9, 2)
    outliers = torch.zeros(2, 9, dtype=torch.bool)
    outliers[0, 4] = True           # centre of a 3×3 grid: mean of its 8 clean neighbours
    outliers[1] = True              # every cell an outlier: no clean neighbour → 0 (or kept with the guard)
    out = purify(tokens, outliers, (3, 3))
    assert torch.allclose(out[0, 4], tokens[0, [0, 1, 2, 3, 5, 6, 7, 8]].mean(0))
    assert torch.equal(out[0, :4], tokens[0, :4])
    assert torch.all(out[1] == 0)
    assert torch.equal(purify(tokens, outliers, (3, 3), guard=True)[1], tokens[1])


def test_sfp_needs_twelve_blocks_or_an_explicit_layer_map(tiny_model):
    import copy
    model = copy.deepcopy(tiny_model)
    model.visual.transformer.resblocks = model.visual.transformer.resblocks[:6]
    hidden, grid = ref.hidden_states(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="12-block"):
        build_method("sfp").last_block(tower_for(model.visual), hidden[-1], hidden, grid, {})
    mapped = build_method("sfp", sfp_layers=(4, 2, 2, 4))
    out = mapped.last_block(tower_for(model.visual), hidden[-1], hidden, grid, {})
    assert out.shape == (1, 16, 64)


def test_sfp_refuses_a_tower_without_a_cls_token(tiny_model):
    from pearl.towers.open_clip_vit import OpenClipViT

    class WithoutCls(OpenClipViT):  # as a SigLIP tower would be
        has_cls = property(lambda self: False)
    hidden, grid = ref.hidden_states(tiny_model, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="SFP reads the CLS token.*no CLS token"):
        build_method("sfp").last_block(WithoutCls(tiny_model.visual), hidden[-1], hidden, grid, {})


def test_l2_and_lof_detectors_find_planted_outliers():
    from pearl.methods.calibration import lof_outliers
    from pearl.methods.sfp import _l2_outliers
    torch.manual_seed(0)
    tokens = torch.randn(1, 64, 8) * 0.1
    tokens[0, 17] += 5.0   # far from the cluster and large
    tokens[0, 40] *= 30.0  # large norm
    assert _l2_outliers(tokens, 2)[0].nonzero().flatten().tolist() == [17, 40]
    lof = lof_outliers(tokens)[0]
    assert lof[17] and lof[40] and lof.sum() <= 4  # contamination 5 % of 64 → about 3 points
