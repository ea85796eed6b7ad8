"""The batched evaluation path against the per-window reference loop of ``pearl.bench``: one batch-1
forward per window, each window's logits upsampled and added on their own, one image at a time."""
import pytest
import torch

import pearl
from pearl.bench import reference_predict

CLASSES = ["sky", "cat, kitten", "cup, mug", "grass", "person"]


@pytest.mark.parametrize("method, params", [
    ("pearl", {}), ("pearl", {"pa": False, "tlp_site": "per_window"}), ("naclip", {"pamr": True}),
    ("sclip", {"area_thd": 0.1, "prob_thd": 0.2}), ("clearclip", {"slide_crop": 72, "slide_stride": 40}),
    ("sfp", {"sfp_nan_guard": True, "slide_crop": 96, "slide_stride": 64}), ("vanilla", {"slide_crop": 0}),
    ("lposs", {"lposs_k": 30, "lposs_plus": True})])
def test_batched_path_gives_the_reference_loops_labels_and_probabilities(tiny_model, tokenizer, photos, method,
                                                                         params):
    params = {"resize_short": 112, "slide_crop": 64, "slide_stride": 32, **params}
    vfm = pearl.load_vfm("tiny") if method == "lposs" else None
    seg = pearl.Segmentor(tiny_model, CLASSES, method=method, tokenizer=tokenizer, window_batch_size=64, vfm=vfm,
                          **params)
    images = [photos["chelsea"], photos["coffee"], photos["coffee"][::-1, :400]]  # three sizes
    batched = seg.predict_batch(images)
    windows = 0
    for image, fast in zip(images, batched):
        loop = seg._to_cpu(reference_predict(seg, image))
        assert (fast.labels == loop.labels).float().mean() >= 0.999
        assert torch.allclose(fast.probs, loop.probs, atol=1e-4, rtol=0)
        windows += fast.info["windows"]
    assert windows > len(images) or params["slide_crop"] == 0  # several windows per forward were batched


def test_marginal_cost_of_pa_and_tlp_is_against_the_same_method_with_both_off():
    from pearl.bench import marginal_costs
    rows = [{"method": "pearl", "size": "voc21", "pa": True, "tlp": True, "default": True, "images_per_s": 1.5},
            {"method": "pearl", "size": "voc21", "pa": False, "tlp": False, "default": False, "images_per_s": 2.0},
            {"method": "pearl", "size": "ade20k", "pa": True, "tlp": True, "default": True, "images_per_s": 1.0},
            {"method": "naclip", "size": "voc21", "pa": False, "tlp": False, "default": True, "images_per_s": 3.0}]
    # 1/1.5 s against 1/2.0 s per image: PA + TLP add 0.1667 s of 0.6667 s = 25 %; ADE20K has no 'off' run,
    # NACLIP's default has neither
    assert marginal_costs(rows) == {("pearl", "voc21"): pytest.approx(0.25)}


def test_speedup_ceiling_puts_the_backbone_at_the_matrix_product_peak():
    from pearl.bench import speedup_ceiling
    row = {"reference_images_per_s": 2.0, "backbone_gflop": 60.0, "ms_fusion": 5.0, "ms_tlp": 40.0,
           "ms_decision": 35.0, "ms_backbone": 300.0, "ms_pa": 25.0, "ms_vfm": 0.0}
    # loop 500 ms per image; best case 60 GFLOP at 0.3 TFLOP/s = 200 ms + 80 ms of other stages
    assert speedup_ceiling(row, 0.3e12) == pytest.approx(500 / 280)
    # a peak timed below what the backbone reached (60 GFLOP in 325 ms): the backbone's own time
    assert speedup_ceiling(row, 0.1e12) == pytest.approx(500 / 405)
    assert speedup_ceiling({**row, "reference_images_per_s": None}, 0.3e12) is None


def test_bench_writes_every_measurement_with_its_ceiling(tmp_path, capsys):
    import csv

    from pearl.bench import main
    out = tmp_path / "bench.csv"
    assert main(["--model", "tiny", "--methods", "vanilla", "--sizes", "voc21", "--images", "1", "--repeats", "1",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(row["pa"], row["tlp"]) for row in rows] == [("True", "True"), ("True", "False"), ("False", "True"),
                                                         ("False", "False")]  # PA on/off × TLP on/off
    for row in rows:
        value = {key: float(row[key]) for key in ("gemm_peak_tflops", "backbone_gflop", "reference_images_per_s",
                                                  "ms_backbone", "ms_pa", "ms_fusion", "ms_tlp", "ms_decision",
                                                  "speedup_ceiling")}
        assert value["gemm_peak_tflops"] > 0 and value["backbone_gflop"] > 0 and float(row["speedup"]) > 0
        # the loop's ms per image over the backbone's FLOPs at the peak (or its own time, if shorter)
        # plus the other stages as measured
        best_ms = min(value["backbone_gflop"] / value["gemm_peak_tflops"], value["ms_backbone"] + value["ms_pa"]) + sum(
            value[f"ms_{stage}"] for stage in ("fusion", "tlp", "decision"))
        assert value["speedup_ceiling"] == pytest.approx(1000 / value["reference_images_per_s"] / best_ms, rel=1e-4)
    assert "TFLOP/s" in capsys.readouterr().out and not out.with_name("bench.csv.partial").exists()


def test_bench_names_a_bad_size_and_exits_2(capsys):
    from pearl.bench import main
    assert main(["--sizes", "voc21,vocc", "--model", "tiny"]) == 2
    assert "vocc" in capsys.readouterr().err


def test_bench_vocabularies_times_each_method_at_each_query_count(tmp_path, capsys):
    import csv

    from pearl.bench import main
    out = tmp_path / "vocabulary.csv"
    assert main(["--model", "tiny", "--methods", "naclip,pearl,naclip+resclip", "--vocabularies", "3,40",
                 "--images", "1", "--repeats", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(row["method"], row["queries"], row["pa"], row["tlp"]) for row in rows] == [
        ("naclip", "3", "False", "False"), ("naclip", "40", "False", "False"),
        ("pearl", "3", "True", "True"), ("pearl", "40", "True", "True"),  # each method at its defaults
        ("naclip+resclip", "3", "False", "False"), ("naclip+resclip", "40", "False", "False")]
    assert all(row["size"] == "ade20k" and float(row["ms_per_image"]) > 0 for row in rows)
    assert "naclip    40 vs 3 queries" in capsys.readouterr().out
    for bad in ("21,x", "0,21"):
        assert main(["--model", "tiny", "--vocabularies", bad]) == 2
        assert f"--vocabularies '{bad}'" in capsys.readouterr().err
    assert main(["--model", "tiny", "--methods", "naclip+tlp", "--vocabularies", "3"]) == 2
    assert "--methods 'naclip+tlp': 'tlp' is not a plug-in; valid: resclip, lposs_plus" in capsys.readouterr().err


def test_a_bench_plug_in_entry_takes_the_plug_in_s_settings():
    from pearl.bench import bench_settings, variants
    settings = bench_settings("clearclip+resclip", "ade20k", random_weights=True)
    assert settings["resclip"] is True and settings["resclip_temp_thd"] == 0.25 and settings["templates"] == "single"
    assert "resclip" not in bench_settings("clearclip", "ade20k", random_weights=False)
    assert bench_settings("lposs+lposs_plus", "voc21", random_weights=False)["lposs_plus"] is True  # LPOSS+
    assert variants(["lposs+lposs_plus", "pearl"]) == [
        ("lposs+lposs_plus", False, True), ("lposs+lposs_plus", False, False),
        ("pearl", True, True), ("pearl", True, False), ("pearl", False, True), ("pearl", False, False)]
