"""python -m pearl.segment, offline with the tiny model on scikit-image's photographs."""
import numpy as np
from PIL import Image

from pearl.render import palette
from pearl.segment import main


def _photos(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, array in photos.items():
        Image.fromarray(array).save(folder / f"{name}.png")
    return folder


def test_segment_a_folder_writes_overlay_labels_and_probs(tmp_path, photos, capsys):
    folder = _photos(tmp_path, photos)
    out = tmp_path / "out"
    classes = "background, sky, wall; cat, kitten; cup; table"
    assert main([str(folder), "--classes", classes, "--model", "tiny", "--out", str(out), "--save-probs",
                 "--resize_short", "112", "--tlp_grid", "40"]) == 0
    assert "2 image(s) segmented with pearl" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_{kind}" for n in photos
                                                            for kind in ("overlay.png", "labels.png", "probs.npy"))
    for name, array in photos.items():
        labels_png = Image.open(out / f"{name}_labels.png")
        overlay = Image.open(out / f"{name}_overlay.png")
        assert labels_png.mode == "P" and labels_png.size == (array.shape[1], array.shape[0])
        # the random model's pictures say so: a caption strip beneath the overlay, a note in both PNGs
        assert overlay.width == array.shape[1] and overlay.height > array.shape[0]
        assert "random weights" in overlay.text["note"] and "random weights" in labels_png.text["note"]
        assert np.asarray(overlay.convert("RGB"))[array.shape[0]:].min() < 50  # the caption's dark text
        labels = np.array(labels_png)
        assert labels.max() < 4
        present = sorted(np.unique(labels).tolist())
        legend = overlay.text["legend"].splitlines()
        names = ["background, sky, wall", "cat, kitten", "cup", "table"]
        assert legend == [f"{i}: {names[i]}" for i in present]  # exactly the classes present
        assert labels_png.getpalette()[:12] == palette(4).ravel().tolist()
        probs = np.load(out / f"{name}_probs.npy")
        assert probs.dtype == np.float16 and probs.shape == (4, *array.shape[:2])
        # no prob_thd / area filter by default: the labels are the argmax (float16 may tie a few pixels)
        assert (probs.astype(np.float32).argmax(0) == labels).mean() > 0.999


def test_segment_bad_input_is_one_line(tmp_path, photos, capsys):
    folder = _photos(tmp_path, photos)
    assert main([str(tmp_path / "nope.jpg"), "--classes", "cat", "--model", "tiny"]) == 2
    assert f"image or folder {tmp_path / 'nope.jpg'} does not exist" in capsys.readouterr().err
    assert main([str(folder), "--classes", " ; ", "--model", "tiny"]) == 2
    assert "class list is empty" in capsys.readouterr().err
    assert main([str(folder), "--classes", "cat", "--method", "nosuchclip", "--model", "tiny"]) == 2
    assert "unknown method 'nosuchclip'" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main([str(broken), "--classes", "cat", "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_palette_is_the_voc_colour_map():
    assert palette(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette(21)[15].tolist() == [192, 128, 128]  # VOC's person colour


def test_compare_writes_one_panel_per_method_with_the_ground_truth(tmp_path, photos, capsys):
    from pearl.render import PANEL_HEIGHT
    folder = _photos(tmp_path, photos)
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, array in photos.items():
        truth = np.zeros(array.shape[:2], np.uint8)
        truth[: array.shape[0] // 2] = 2
        truth[:4] = 255  # ignored pixels
        Image.fromarray(truth).save(masks / f"{name}.png")
    out = tmp_path / "out"
    common = [str(folder), "--classes", "sky; cat; cup", "--model", "tiny", "--resize_short", "112", "--out", str(out),
              "--compare", "vanilla,naclip,pearl:tlp=false:tlp_grid=40", "--masks", str(masks)]
    assert main(common) == 0
    assert "2 image(s) segmented with 3 variants" in capsys.readouterr().out
    for name in photos:
        figure = Image.open(out / f"{name}_compare.png")
        assert figure.text["panels"].splitlines() == ["input", "ground truth", "vanilla", "naclip",
                                                      "pearl:tlp=false:tlp_grid=40"]
        legend = [line.split(": ", 1)[1] for line in figure.text["legend"].splitlines()]
        assert "cup" in legend and set(legend) <= {"sky", "cat", "cup"}  # the truth's class 2 is shown
        assert figure.height > PANEL_HEIGHT and "random weights" in figure.text["note"]
    assert main(common + ["--grid"]) == 0
    grid = Image.open(out / "compare_grid.png")
    assert "random weights" in grid.text["note"]
    assert grid.height > 2 * PANEL_HEIGHT  # one row per image
    assert main([*common[:-2], "--masks", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ground truth" in err and "chelsea.png" in err and "does not exist" in err
    assert main([str(folder), "--classes", "cat", "--model", "tiny", "--compare", "pearl:tlp"]) == 2
    assert "options are name=value" in capsys.readouterr().err
    if not __import__("torch").backends.mps.is_available():
        assert main([str(folder), "--classes", "cat", "--model", "tiny", "--device", "mps"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: device='mps'") and len(err.strip().splitlines()) == 1


def test_more_classes_than_a_palette_holds_give_a_16_bit_label_png(tmp_path, photos):
    from pearl.render import _TITLE, PANEL_HEIGHT, comparison_row, write_outputs
    image = photos["chelsea"][:PANEL_HEIGHT, :300]  # a panel's own height: drawn unscaled below its title
    labels = np.zeros(image.shape[:2], np.int64)
    labels[:, 150:] = 300
    classes = [f"class {i}" for i in range(459)]
    write_outputs(tmp_path, "cat", image, labels, classes)
    saved = Image.open(tmp_path / "cat_labels.png")
    assert saved.mode.startswith("I") and np.array_equal(np.array(saved), labels)
    assert Image.open(tmp_path / "cat_overlay.png").text["legend"].splitlines() == ["0: class 0", "300: class 300"]
    truth = labels.copy()
    truth[:40] = 65535  # ignored in a 16-bit label file: black, and not in the legend
    row = comparison_row(image, [("pearl", labels)], classes, truth)
    truth_panel = np.asarray(row.panels[1])[_TITLE:]
    assert (truth_panel[:40] == 0).all() and (truth_panel[40:, 150:] == palette(459)[300]).all()
    assert row.shown == {0, 300}
