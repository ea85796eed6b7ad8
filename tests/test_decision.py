import pytest
import torch

from pearl.decision import decide, top_query_labels


def test_synonym_max_without_renormalisation():
    # queries: 0,1 → class 0 (background, two names); 2 → class 1; 3 → class 2
    logits = torch.tensor([[0.30, 0.0], [0.25, 0.0], [0.28, 0.9], [0.1, 0.0]]).view(4, 1, 2)
    labels, probs = decide(logits, torch.tensor([0, 0, 1, 2]), 3, logit_scale=40)
    q = torch.softmax(40 * logits, dim=0)
    assert torch.allclose(probs[0], torch.maximum(q[0], q[1]))
    assert torch.allclose(probs[1], q[2]) and torch.allclose(probs[2], q[3])
    assert probs[:, 0, 0].sum() < 0.95  # max, not sum: not renormalised
    assert labels.flatten().tolist() == [0, 1]


def test_prob_threshold_is_strict_and_sends_to_class_zero():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3])).view(3, 1, 1).repeat(1, 1, 2)
    labels, _ = decide(logits, torch.arange(3), 3, logit_scale=1.0, prob_thd=0.5)
    assert labels.flatten().tolist() == [1, 1]  # 0.5 is not strictly below 0.5
    labels, _ = decide(logits, torch.arange(3), 3, logit_scale=1.0, prob_thd=0.51)
    assert labels.flatten().tolist() == [0, 0]


def test_area_filter_drops_small_foreground_classes_but_never_background():
    # 10 pixels: class 1 wins 8, class 2 wins 1, background wins 1
    logits = torch.zeros(3, 1, 10)
    logits[1, 0, :8] = 1
    logits[2, 0, 8] = 1
    logits[0, 0, 9] = 1
    labels, probs = decide(logits, torch.arange(3), 3, logit_scale=10, area_thd=0.1)
    # class 2 has 1 of 9 foreground pixels = 0.111 > 0.1: kept
    assert labels[0, 8] == 2
    labels, probs_after = decide(logits, torch.arange(3), 3, logit_scale=10, area_thd=0.12)
    assert labels[0, 8] == 0  # class 2 filtered; background is next best
    assert torch.equal(probs, probs_after)  # returned probabilities are pre-filter
    logits[0, 0, :9] = -5
    logits[0, 0, 9] = 1
    labels, _ = decide(logits, torch.arange(3), 3, logit_scale=10, area_thd=0.5)
    assert labels[0, 9] == 0


def test_ties_take_the_first_class():
    labels, _ = decide(torch.zeros(4, 2, 2), torch.arange(4), 4, logit_scale=40)
    assert torch.all(labels == 0)


def test_synonym_max_is_exact_for_unsorted_owners_and_nan():
    torch.manual_seed(0)
    logits = torch.randn(7, 5, 6)
    logits[4, 2, 3] = float("nan")  # SFP's released purification can leave NaN logits
    owners = [2, 0, 2, 1, 0, 2, 1]
    labels, probs = decide(logits, torch.tensor(owners), 3, logit_scale=40)
    q = torch.softmax(40 * logits, dim=0)
    for c in range(3):
        expected = torch.stack([q[i] for i, owner in enumerate(owners) if owner == c]).amax(dim=0)
        assert torch.equal(probs[c].nan_to_num(-1), expected.nan_to_num(-1)), c


def test_prob_threshold_reads_the_probabilities_after_the_area_filter():
    # pixel 0: class 2 wins with 0.9 but covers 1 of 10 foreground pixels and is filtered;
    # what remains at pixel 0 is below prob_thd, so it becomes class 0
    probs = torch.full((3, 1, 10), 0.02)
    probs[1, 0, 1:] = 0.9
    probs[2, 0, 0], probs[1, 0, 0] = 0.9, 0.06
    logits = torch.log(probs)  # logit_scale 1: softmax gives back the normalised probabilities
    labels, _ = decide(logits, torch.arange(3), 3, logit_scale=1.0, area_thd=0.2, prob_thd=0.3)
    assert labels[0, 0] == 0 and labels[0, 1:].tolist() == [1] * 9


def test_area_filter_drops_a_class_exactly_at_the_threshold():
    # 10 foreground pixels: class 1 wins 9, class 2 wins 1 = exactly 0.1 of them: not strictly more, dropped
    logits = torch.zeros(3, 1, 11)
    logits[1, 0, :9] = 1
    logits[2, 0, 9] = 1
    logits[0, 0, 10] = 1
    logits[1, 0, 9] = 0.5  # the runner-up at the dropped pixel
    labels, _ = decide(logits, torch.arange(3), 3, logit_scale=10, area_thd=0.1)
    assert labels[0, 9] == 1


@pytest.mark.parametrize("prob_thd", [0.0, 0.3, 0.6])
def test_top_query_labels_equal_the_softmax_rule(prob_thd):
    torch.manual_seed(5)
    owners = torch.tensor([0, 1, 1, 2, 2, 2, 3])  # synonyms: the class max is over several queries
    logits = torch.randn(7, 40, 50) * 0.05
    logits[:, :3, :3] = float("nan")  # NaN features (SFP's released purification) decide alike
    expected, _ = decide(logits, owners, 4, logit_scale=40, prob_thd=prob_thd)
    assert torch.equal(top_query_labels(logits, owners, 40, prob_thd), expected)
    if prob_thd:  # the threshold binds somewhere
        assert not torch.equal(expected, decide(logits, owners, 4, logit_scale=40)[0])
