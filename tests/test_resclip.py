"""ResCLIP (resclip=true on sclip, naclip, clearclip) against the transcription of its released forward
(tests/reference/resclip.py), and the switch's settings."""
import numpy as np
import pytest
import torch

import pearl
from pearl.methods.resclip import SemanticFeedback
from pearl.preprocess import normalise
from pearl.settings import job_settings
from pearl.towers import tower_for

from .conftest import build_method
from .reference import resclip as ref
from .reference import sfp as sfp_ref

HOSTS = ("naclip", "sclip", "clearclip")


@pytest.fixture(scope="module")
def windows(photos):
    """Two 96×128 windows (a 6×8 grid) of real photographs, normalised as the Segmentor does."""
    crops = [np.ascontiguousarray(photos["chelsea"][100:196, 150:278]),
             np.ascontiguousarray(photos["coffee"][60:156, 200:328])]
    return torch.stack([normalise(crop) for crop in crops])


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("overrides, reference", [
    ({}, {}),
    ({"resclip_temp_thd": 0.3, "resclip_rcs_tau": 1.5, "resclip_rcs_lambda": 0.6, "resclip_sfr_tau": 1.8,
      "resclip_sfr_lambda": 0.4, "resclip_same_entity": False},
     {"temp_thd": 0.3, "weights": {"rcs": (1.5, 0.6), "sfr": (1.8, 0.4)}, "same_entity": False})])
def test_resclip_matches_the_released_forward(tiny_model, windows, host, overrides, reference):
    hidden, grid = sfp_ref.hidden_states(tiny_model, windows)
    prototypes = _prototypes_from(tiny_model, hidden)
    method = build_method(host, resclip=True, **overrides)
    assert method.needs_hidden_states and method.needs_feedback
    with torch.no_grad():
        ours = method.last_block(tower_for(tiny_model.visual), hidden[-1], hidden, grid, None,
                                 SemanticFeedback(prototypes, 40.0).on(windows))
        labels_seen = []
        for index in range(2):  # each window on its own, as upstream runs them
            expected, labels = ref.forward(tiny_model, [h[index:index + 1] for h in hidden],
                                           windows[index:index + 1], prototypes, host, **reference)
            labels_seen.append(labels.unique().numel())
            assert torch.allclose(ours[index], expected, atol=1e-4), (ours[index] - expected).abs().max()
    assert max(labels_seen) > 1, "a one-label first pass everywhere would leave SFR's prior flat"


def _prototypes_from(model, hidden) -> torch.Tensor:
    """[5, D] text-like prototypes that the random tiny model's patches do match: five of its own
    patch features (random prototypes give one label everywhere)."""
    with torch.no_grad():
        feats = model.visual.ln_post(hidden[-1][:, 1:]) @ model.visual.proj
    return torch.nn.functional.normalize(torch.cat([feats[0, [3, 25, 44]], feats[1, [5, 30]]]), dim=-1)


@pytest.mark.parametrize("host", HOSTS)
def test_resclip_changes_the_host_and_off_leaves_it_as_it_was(tiny_model, windows, host):
    hidden, grid = sfp_ref.hidden_states(tiny_model, windows)
    tower = tower_for(tiny_model.visual)
    feedback = SemanticFeedback(_prototypes_from(tiny_model, hidden), 40.0).on(windows)
    with torch.no_grad():
        plain = build_method(host).last_block(tower, hidden[-1], hidden, grid, None)
        on = build_method(host, resclip=True).last_block(tower, hidden[-1], hidden, grid, None, feedback)
    assert not build_method(host).needs_feedback
    assert on.shape == plain.shape and (on - plain).abs().max() > 1e-3


def test_resclip_without_the_first_pass_inputs_says_what_it_needs(tiny_model, windows):
    hidden, grid = sfp_ref.hidden_states(tiny_model, windows)
    with pytest.raises(ValueError, match="resclip=True needs the text prototypes and the windows"):
        build_method("naclip", resclip=True).last_block(tower_for(tiny_model.visual), hidden[-1], hidden, grid, None)


def test_resclip_is_refused_where_its_code_does_not_apply(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="resclip=True has no meaning for method 'sfp'.*clearclip, naclip, sclip only"):
        pearl.Segmentor(tiny_model, ["cat"], method="sfp", tokenizer=tokenizer, resclip=True)
    with pytest.raises(ValueError, match="resclip=True has no meaning for method 'pearl'"):
        job_settings("pearl", None, None, "voc21", overrides={"resclip": True})


def test_a_resclip_job_takes_the_released_weights_of_its_dataset_beneath_the_overrides():
    ade = job_settings("naclip", None, None, "ade20k", overrides={"resclip": True})
    assert (ade["resclip_temp_thd"], ade["resclip_sfr_tau"], ade["resclip_rcs_lambda"]) == (0.25, 2.1, 0.3)
    voc20 = job_settings("sclip", None, None, "voc20", overrides={"resclip": True, "resclip_rcs_lambda": 0.1})
    assert (voc20["resclip_temp_thd"], voc20["resclip_rcs_lambda"]) == (0.1, 0.1)  # the override wins
    off = job_settings("naclip", None, None, "ade20k")
    assert off["resclip"] is False and off["resclip_temp_thd"] == 0.5  # untouched defaults when off


def test_resclip_segmentors_share_a_fusion_only_at_one_logit_scale(tiny_model, tokenizer, photos):
    common = dict(method="naclip", tokenizer=tokenizer, resize_short=96, slide_crop=64, slide_stride=32, resclip=True)
    classes = ["sky, wall", "cat", "cup"]
    a = pearl.Segmentor(tiny_model, classes, logit_scale=40, **common)
    b = pearl.Segmentor(tiny_model, classes, logit_scale=40, prob_thd=0.3, **common)
    c = pearl.Segmentor(tiny_model, classes, logit_scale=10, **common)
    assert a.fuses_as(b) and not a.fuses_as(c)  # the first pass's softmax reads the logit scale
    together = list(pearl.segmentor.predict_jointly([a, c], [photos["chelsea"]]))[0]
    alone = c.predict(photos["chelsea"])
    assert torch.equal(together[1].labels, alone.labels)


def test_patch_labels_threshold_then_take_each_patch_s_most_frequent_label():
    # 2 queries on a 5×4 image of 2-pixel patches: a 2×2 grid (the fifth row is beyond it and dropped)
    p1 = torch.tensor([[0.9, 0.9, 0.52, 0.52],
                       [0.9, 0.1, 0.52, 0.1],
                       [0.3, 0.3, 0.9, 0.9],
                       [0.3, 0.6, 0.9, 0.9],
                       [0.9, 0.9, 0.9, 0.9]])
    probs = torch.stack([1 - p1, p1])[None]
    labels = pearl.methods.resclip.patch_labels(probs, temp_thd=0.56, patch=2, grid=(2, 2))
    # top-left: 1,1,1,0 → 1; top-right: 1,1,1,0 but 0.52 < 0.56 makes them 0 → 0; bottom-left: 0,0,0,1 → 0;
    # bottom-right: all 1 → 1
    assert labels.tolist() == [[[1, 0], [0, 1]]]
    tie = torch.stack([1 - p1[:2, :2], p1[:2, :2]])[None]  # 1, 1, 1, 0 — then make it 2 : 2
    tie[0, :, 0, 0] = torch.tensor([0.9, 0.1])
    assert pearl.methods.resclip.patch_labels(tie, 0.0, 2, (1, 1)).tolist() == [[[0]]]  # smallest label on a tie


def test_the_sfr_prior_is_the_released_matrix_rounded_through_fp16():
    from pearl.methods.resclip import sfr_prior
    labels = torch.tensor([[0, 0, 1, 1, 1], [0, 2, 2, 1, 1], [0, 2, 2, 2, 1]])
    ours = sfr_prior(labels[None], same_entity=True, prefix_tokens=1, dtype=torch.float32)[0, 0]
    assert torch.equal(ours, ours.half().float())  # the released code casts it to fp16
    assert torch.allclose(ours, ref.sfr_prior(labels, (3, 5)), atol=1e-3)
    assert ours[0].abs().sum() == 0 and ours[:, 0].abs().sum() == 0 and ours.max() == 1


@pytest.mark.parametrize("chunk", [1 << 23, 50])  # all starts at once; a few starts per chunk
def test_the_same_entity_check_samples_each_line_as_released(monkeypatch, chunk):
    from pearl.methods import resclip
    monkeypatch.setattr(resclip, "_PATH_CHUNK_SAMPLES", chunk)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], [0, 0, 1, 2, 2, 0], [1, 1, 1, 2, 0, 0]])
    valid, steps = resclip._same_entity(labels)
    expected, expected_steps, _ = ref.check_path(labels, 6)
    assert valid.tolist() == [[expected[i, j] for j in range(24)] for i in range(24)]
    assert steps.tolist() == [[expected_steps[i, j] for j in range(24)] for i in range(24)]
    assert 0.2 < valid.float().mean() < 0.8  # both outcomes occur


def test_pamr_in_slabs_of_queries_is_pamr(photos):
    from pearl.refine.pamr import pamr
    image = normalise(np.ascontiguousarray(photos["coffee"][:64, :80]))[None]
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 64, 80)
    assert torch.equal(pamr(image, logits, 3, (2, 4), queries_per_slab=3), pamr(image, logits, 3, (2, 4)))


@pytest.mark.parametrize("host", ["sclip", "clearclip"])
def test_the_resclip_profile_runs_any_host_with_resclip_s_own_settings(host):
    from pearl.benchmarks import DATASETS
    from pearl.protocols import class_file, protocol
    for dataset in DATASETS:  # ResCLIP's configs are NACLIP v2's (docs/methods.md §10)
        assert protocol(host, dataset, "resclip") == protocol("naclip", dataset), dataset
        assert class_file(dataset, host, "resclip") == class_file(dataset)
    assert protocol("sclip", "voc21")["area_thd"] == 0.1 and protocol("sclip", "voc21", "resclip")["area_thd"] == 0
    settings = job_settings("clearclip", None, None, "voc20", "resclip", {"resclip": True})
    assert (settings["slide_crop"], settings["resclip_temp_thd"]) == (0, 0.1)


def test_blends_of_tau_1_lambda_0_leave_the_host_as_it_is(tiny_model, tokenizer, photos):
    # docs/methods.md §10: the paper's one-module ablations are these settings of the other module
    common = dict(method="naclip", tokenizer=tokenizer, resize_short=96, slide_crop=64, slide_stride=32)
    plain = pearl.Segmentor(tiny_model, ["sky", "cat"], **common).predict(photos["coffee"]).logits
    off = pearl.Segmentor(tiny_model, ["sky", "cat"], resclip=True, resclip_sfr_tau=1, resclip_sfr_lambda=0,
                          resclip_rcs_tau=1, resclip_rcs_lambda=0, **common).predict(photos["coffee"]).logits
    assert torch.equal(plain, off)
