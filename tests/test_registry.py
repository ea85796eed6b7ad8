"""The core behaviour of every registered method, parametrized over the registry: a method added as
its module and its protocol file is tested here without editing a test (shapes and probabilities on
a photograph, batched = one at a time, TLP after it, a run's record, the segment CLI)."""
import numpy as np
import pytest
import torch

import pearl
from pearl.methods import available_methods

from .conftest import compose

CLASSES = ["sky, wall", "cat", "cup", "table"]


def _segmentor(model, tokenizer, method: str, **params) -> pearl.Segmentor:
    return pearl.Segmentor(model, CLASSES, method=method, tokenizer=tokenizer, text_cache_dir="",
                           **(pearl.protocol(method, "context60") | {"resize_short": 112} | params))


@pytest.mark.parametrize("method", available_methods())
def test_a_prediction_has_the_image_s_shape_and_probabilities(tiny_model, tokenizer, photos, method):
    image = photos["chelsea"]
    out = _segmentor(tiny_model, tokenizer, method).predict(image)
    height, width = image.shape[:2]
    assert out.labels.shape == (height, width) and out.labels.dtype == torch.long
    assert 0 <= int(out.labels.min()) and int(out.labels.max()) < len(CLASSES)
    assert out.probs.shape == (len(CLASSES), height, width) and out.logits.shape[1:] == (height, width)
    decided = torch.isfinite(out.probs).all(dim=0)  # SFP's released purification may leave NaN windows
    assert decided.float().mean() > (0.5 if out.info["nan_windows"] else 0.999)
    probs = out.probs[:, decided]
    queries = sum(len(line.split(", ")) for line in CLASSES)
    # a class's probability is its best name's share of a softmax over all names: in [0, 1], the top ≥ 1/Q
    assert probs.min() >= 0 and probs.max() <= 1 and (probs.max(dim=0).values >= 1 / queries - 1e-6).all()


@pytest.mark.parametrize("method", available_methods())
def test_images_predicted_together_get_what_each_gets_alone(tiny_model, tokenizer, photos, method):
    seg = _segmentor(tiny_model, tokenizer, method)
    images = [photos["chelsea"], photos["coffee"]]
    together = seg.predict_batch(images)
    for image, joint in zip(images, together):
        alone = seg.predict(image)
        assert (joint.labels == alone.labels).float().mean() >= 0.999
        both = torch.isfinite(alone.probs) & torch.isfinite(joint.probs)
        assert torch.allclose(joint.probs[both], alone.probs[both], atol=1e-4)


@pytest.mark.parametrize("method", available_methods())
def test_tlp_runs_after_the_method_and_changes_its_logits(tiny_model, tokenizer, photos, method):
    plain = _segmentor(tiny_model, tokenizer, method, tlp=False).predict(photos["chelsea"])
    refined = _segmentor(tiny_model, tokenizer, method, tlp=True).predict(photos["chelsea"])
    assert refined.labels.shape == plain.labels.shape
    assert torch.isfinite(refined.logits).all() and not torch.allclose(refined.logits, plain.logits)


@pytest.mark.parametrize("method", available_methods())
def test_a_run_writes_a_valid_record_of_the_method_s_own_protocol(synthetic, tmp_path, method):
    from pearl import runner
    from pearl.records import load_records
    status, record = runner.run_job(compose(["model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path}",
                                             "progress=false", "loader_workers=0", f"method={method}"]))
    assert status == "ran" and record.method == method and record.deviations == {}
    published = pearl.protocol(method, "voc21")
    assert {name: record.params[name] for name in published} == published  # the released settings, as run
    assert [r.config_hash for r in load_records(tmp_path)] == [record.config_hash]


@pytest.mark.parametrize("method", available_methods())
def test_the_segment_cli_runs_the_method(tmp_path, photos, method, capsys):
    from PIL import Image

    from pearl.segment import main
    Image.fromarray(photos["coffee"]).save(tmp_path / "coffee.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "coffee.png"), "--classes", "; ".join(CLASSES), "--model", "tiny", "--method",
                 method, "--resize_short", "112", "--out", str(out)]) == 0
    labels = np.asarray(Image.open(out / "coffee_labels.png"))
    assert labels.shape == photos["coffee"].shape[:2] and labels.max() < len(CLASSES)
    assert f"segmented with {method}" in capsys.readouterr().out
