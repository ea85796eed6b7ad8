import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from pearl.metrics import ConfusionMatrix


def test_hand_computed_example():
    gt = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 3]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    s = cm.summary()
    # class 0: I=1, P=2, G=2 → 1/3; class 1: I=2, P=3, G=3 → 2/4; class 2: I=1, P=1, G=2 → 1/2;
    # class 3: predicted once, absent from GT → 0 and counts. Pixel under 255 is dropped.
    iou = [1 / 3, 1 / 2, 1 / 2, 0.0]
    assert s["per_class_iou"] == pytest.approx([v * 100 for v in iou])
    assert s["mIoU"] == pytest.approx(np.mean(iou) * 100)
    assert s["aAcc"] == pytest.approx(4 / 7 * 100)
    assert s["mAcc"] == pytest.approx(np.mean([1 / 2, 2 / 3, 1 / 2]) * 100)  # class 3 absent from GT: skipped


def test_against_torchmetrics_over_a_dataset():
    rng = np.random.default_rng(0)
    c = 6
    cm = ConfusionMatrix(c)
    jaccard = MulticlassJaccardIndex(c, average="macro", ignore_index=255, validate_args=False)
    accuracy = MulticlassAccuracy(c, average="micro", ignore_index=255, validate_args=False)
    for _ in range(5):
        gt = torch.from_numpy(rng.integers(0, c - 1, (13, 17)))  # class 5 never in GT
        gt[torch.from_numpy(rng.random((13, 17)) < 0.1)] = 255
        pred = torch.from_numpy(rng.integers(0, c, (13, 17)))
        cm.update(pred, gt)
        jaccard.update(pred.flatten(), gt.flatten())
        accuracy.update(pred.flatten(), gt.flatten())
    s = cm.summary()
    assert s["mIoU"] == pytest.approx(jaccard.compute().item() * 100, abs=1e-4)
    assert s["aAcc"] == pytest.approx(accuracy.compute().item() * 100, abs=1e-4)
    assert s["per_class_iou"][5] == 0.0


def test_empty_prediction_and_absent_classes():
    cm = ConfusionMatrix(3)
    gt = torch.zeros(4, 4, dtype=torch.long)
    cm.update(torch.zeros(4, 4, dtype=torch.long), gt)
    s = cm.summary()
    assert s["per_class_iou"] == [100.0, None, None]  # union 0 → NaN → skipped
    assert s["mIoU"] == 100.0
    cm.update(torch.full((4, 4), 2), gt)  # predicting a class that is never in GT
    assert cm.summary()["mIoU"] == pytest.approx((50.0 + 0.0) / 2)


def test_all_ignored_and_size_mismatch():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(cm.summary()["mIoU"]) and math.isnan(cm.summary()["aAcc"])
    with pytest.raises(ValueError, match="differ in size"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 2))


def test_more_than_255_classes_count_label_255_and_drop_65535():
    # PASCAL Context 459 / ADE20K-847: 255 is a class, the 16-bit files' 65535 is ignored
    gt = torch.tensor([[255, 255, 458, 65535], [0, 0, 255, 65535]])
    pred = torch.tensor([[255, 0, 458, 255], [0, 0, 255, 458]])
    cm = ConfusionMatrix(459)
    cm.update(pred, gt)
    s = cm.summary()
    # class 0: I=2, P=3, G=2 → 2/3; class 255: I=2, P=2, G=3 → 2/3; class 458: I=1, P=1, G=1 → 1;
    # the two 65535 pixels are dropped; every other class is absent from both → skipped
    assert s["per_class_iou"][0] == pytest.approx(200 / 3)
    assert s["per_class_iou"][255] == pytest.approx(200 / 3)
    assert s["per_class_iou"][458] == pytest.approx(100.0)
    assert sum(v is not None for v in s["per_class_iou"]) == 3
    assert s["mIoU"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3 * 100)
    assert s["aAcc"] == pytest.approx(5 / 6 * 100)
