"""CUDA checks, for a machine with a GPU: ``python -m pytest tests -m cuda`` (benchmarks/gpu_check.sh).

Deselected by default (this repository's CI has no GPU); asked for where no CUDA device is visible,
they fail instead of skipping. The CPU computation is the independent reference: on the GPU the
same fp32 arithmetic runs in other kernels. cuDNN's TF32 convolutions are turned off for the
comparisons, so that fp32 means fp32 in the patch embedding too.
"""
import pytest
import torch

import pearl
from pearl.methods import available_methods, get_method
from pearl.refine.tlp import BATCHED_TLP_VALUES, TLPRefiner
from pearl.runner import run

from .conftest import compose, make_tiny

pytestmark = pytest.mark.cuda

CLASSES = ["sky", "cat, kitten", "cup, mug", "grass", "person"]
SMALL = {"resize_short": 112, "slide_crop": 64, "slide_stride": 32}


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a CUDA device and none is visible; run them on a GPU machine")
    conv_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = conv_tf32


@pytest.mark.parametrize("method, params", [(method, {}) for method in available_methods()]
                         + [("lposs", {"lposs_plus": True})])
def test_cuda_predictions_equal_the_cpu_ones(cuda, tokenizer, photos, method, params):
    images = [photos["chelsea"], photos["coffee"][::-1, :400]]

    def vision() -> dict:  # each segmentor moves its vision model to its device: one (seeded) model each
        return {"vfm": pearl.load_vfm("tiny")} if get_method(method).needs_vfm else {}
    on_cpu = pearl.Segmentor(make_tiny(), CLASSES, method=method, tokenizer=tokenizer, **vision(), **SMALL,
                             **params).predict_batch(images)
    on_gpu = pearl.Segmentor(make_tiny(), CLASSES, method=method, tokenizer=tokenizer, device=cuda, **vision(),
                             **SMALL, **params).predict_batch(images)
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert gpu.labels.device.type == "cpu"  # predict_batch hands back CPU tensors
        assert (cpu.labels == gpu.labels).float().mean() >= 0.999
        assert torch.allclose(cpu.probs, gpu.probs, atol=1e-4, rtol=0)


def test_batched_tlp_on_cuda_gives_each_image_its_own_result(cuda, tokenizer, photos, monkeypatch):
    seg = pearl.Segmentor(make_tiny(), CLASSES, method="pearl", tokenizer=tokenizer, device=cuda, **SMALL)
    assert seg.together_values == BATCHED_TLP_VALUES  # on by default on a GPU
    images = [photos["chelsea"], photos["chelsea"][:, ::-1].copy(), photos["chelsea"][::-1].copy()]  # one size
    solves = []
    refine_together = TLPRefiner.refine_together
    monkeypatch.setattr(TLPRefiner, "refine_together",
                        lambda self, *args: solves.append(len(args[0])) or refine_together(self, *args))
    together = seg.predict_batch(images)
    assert solves == [3]
    alone = [seg.predict(image) for image in images]
    for one, batched in zip(alone, together):
        assert torch.equal(one.labels, batched.labels)
        assert (one.logits - batched.logits).abs().max() <= 1e-5


def test_prediction_on_the_device_needs_no_host_sync(cuda, tokenizer, photos):
    """predict on_device and the confusion-matrix update queue work without waiting for the GPU."""
    from pearl.metrics import ConfusionMatrix
    seg = pearl.Segmentor(make_tiny(), CLASSES, method="pearl", tokenizer=tokenizer, device=cuda, **SMALL)
    prepared = [seg.preprocess(photos["chelsea"]), seg.preprocess(photos["coffee"])]
    labels = [torch.zeros(image.shape[:2], dtype=torch.long, device=cuda) for image in (photos["chelsea"],
                                                                                        photos["coffee"])]
    matrix = ConfusionMatrix(seg.vocabulary.num_classes, cuda)
    seg.predict_batch(prepared, on_device=True)  # warm-up: kernels, allocator, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for out, label in zip(seg.predict_batch(prepared, on_device=True), labels):
            matrix.update(out.labels, label)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert matrix.matrix.sum().item() == sum(label.numel() for label in labels)


def test_a_cuda_run_records_the_cpu_runs_metrics(cuda, synthetic, tmp_path):
    records = {device: run(compose(["model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path / device}",
                                    "progress=false", "dataset=voc21", f"device={device}"]))
               for device in ("cpu", "cuda")}
    assert records["cuda"].device.startswith("cuda") and records["cpu"].device == "cpu"
    assert records["cuda"].image_count == records["cpu"].image_count == 3
    for metric in ("mIoU", "aAcc", "mAcc"):
        assert getattr(records["cuda"], metric) == pytest.approx(getattr(records["cpu"], metric), abs=1e-3)
