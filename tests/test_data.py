"""Datasets read synthetic copies of their real layouts, with each label convention."""
import numpy as np
import pytest
from PIL import Image

from pearl.benchmarks import BENCHMARKS
from pearl.data import DatasetError, build_dataset
from pearl.data.synthetic import write_dataset

ALL = ["voc21", "voc20", "context60", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(["voc21", "context60", "coco_stuff", "cityscapes", "ade20k"]):
        write_dataset(name, root, num_images=3, size=(40, 56), seed=seed)
    return root


# Written out here, not read from pearl.benchmarks: where MMSegmentation puts each label file, and
# which benchmarks ignore label 0 (reduce_zero_label).
LABEL_FILES = {"voc21": "VOCdevkit/VOC2012/SegmentationClass/{}.png",
               "voc20": "VOCdevkit/VOC2012/SegmentationClass/{}.png",
               "context60": "VOCdevkit/VOC2010/SegmentationClassContext/{}.png",
               "context59": "VOCdevkit/VOC2010/SegmentationClassContext/{}.png",
               "coco_object": "coco_stuff164k/annotations/val2017/{}_instanceTrainIds.png",
               "coco_stuff": "coco_stuff164k/annotations/val2017/{}_labelTrainIds.png",
               "cityscapes": "cityscapes/gtFine/val/{}_gtFine_labelTrainIds.png",
               "ade20k": "ADEChallengeData2016/annotations/validation/{}.png"}
OFFICIAL = {"voc21": 1449, "voc20": 1449, "context60": 5105, "context59": 5105, "coco_object": 5000,
            "coco_stuff": 5000, "cityscapes": 500, "ade20k": 2000}
REDUCE_ZERO_LABEL = {"voc20", "context59", "ade20k"}


def _raw(root, name, sample_id):
    return np.array(Image.open(root / LABEL_FILES[name].format(sample_id))).astype(np.int64)


@pytest.mark.parametrize("name", ALL)
def test_reads_layout_with_label_convention(root, name):
    dataset = build_dataset(name, root)
    assert len(dataset) == 3 and dataset.expected_images == OFFICIAL[name]
    sample = dataset[0]
    assert sample.image.shape == (40, 56, 3) and sample.image.dtype == np.uint8
    raw = _raw(root, name, sample.id)
    if name in REDUCE_ZERO_LABEL:
        expected = np.where(raw == 0, 255, np.where(raw == 255, 255, raw - 1))
    else:
        expected = raw
    assert np.array_equal(sample.label, expected)
    valid = sample.label[sample.label != 255]
    assert valid.min() >= 0 and valid.max() < dataset.num_classes


def test_voc_palette_png_gives_indices_and_boundaries(root):
    path = root / BENCHMARKS["voc21"].label_dir / "2008_000000.png"
    assert Image.open(path).mode == "P"
    label = build_dataset("voc21", root)[0].label
    assert 255 in label and label[label != 255].max() <= 20


def test_coco_object_has_no_ignored_pixels(root):
    stuff = build_dataset("coco_stuff", root)[0].label
    objects = build_dataset("coco_object", root)[0].label
    assert (stuff == 255).any() and not (objects == 255).any()
    assert np.array_equal(objects, np.where(stuff < 80, stuff + 1, 0))


def test_scan_order_is_sorted_by_path(root):
    ids = [item[0] for item in build_dataset("ade20k", root).items]
    assert ids == sorted(ids) and ids[0] == "ADE_val_00000001"
    assert build_dataset("cityscapes", root).items[0][0].startswith("synthcity/")


def test_missing_dataset_names_dataset_paths_and_the_layout_doc(tmp_path):
    with pytest.raises(DatasetError) as error:
        build_dataset("ade20k", tmp_path)
    message = str(error.value)
    assert "'ade20k'" in message and "ADEChallengeData2016/images/validation" in message
    assert "docs/datasets.md" in message


def test_missing_label_corrupt_image_and_wrong_size(tmp_path):
    write_dataset("ade20k", tmp_path, num_images=3, size=(32, 48))
    layout = BENCHMARKS["ade20k"]
    label = tmp_path / layout.label_dir / "ADE_val_00000001.png"
    label.rename(label.with_suffix(".bak"))
    with pytest.raises(DatasetError, match=r"1 file\(s\) .*missing .*ADE_val_00000001.png"):
        build_dataset("ade20k", tmp_path)  # found before any model is built, not when the run reaches it
    label.with_suffix(".bak").rename(label)
    (tmp_path / layout.image_dir / "ADE_val_00000002.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / layout.label_dir / "ADE_val_00000003.png")
    dataset = build_dataset("ade20k", tmp_path)
    with pytest.raises(DatasetError, match="cannot decode image .*ADE_val_00000002.jpg"):
        dataset[1]
    with pytest.raises(DatasetError, match="ADE_val_00000003.png is 10×10 but image"):
        dataset[2]


def test_files_a_split_lists_but_lacks_are_named_up_front(tmp_path):
    write_dataset("voc21", tmp_path, num_images=4, size=(32, 48))
    layout = BENCHMARKS["voc21"]
    ids = (tmp_path / layout.split_file).read_text().split()
    (tmp_path / layout.image_dir / f"{ids[3]}.jpg").unlink()
    (tmp_path / layout.label_dir / f"{ids[2]}.png").unlink()
    with pytest.raises(DatasetError, match=rf"2 file\(s\) .*missing \(e.g. .*{ids[2]}.png, .*{ids[3]}.jpg\)"):
        build_dataset("voc21", tmp_path)
    assert len(build_dataset("voc21", tmp_path, max_images=2)) == 2  # only the evaluated items must exist


def test_out_of_range_label_values_are_refused(tmp_path):
    write_dataset("cityscapes", tmp_path, num_images=1, size=(32, 48))
    path = next((tmp_path / BENCHMARKS["cityscapes"].label_dir).rglob("*.png"))
    Image.fromarray(np.full((32, 48), 40, np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"values \[40\] outside 0..18"):
        build_dataset("cityscapes", tmp_path)[0]


def test_folder_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "img" / "b.jpg")
    Image.fromarray(np.ones((8, 12), np.uint8)).save(tmp_path / "mask" / "a.png")
    (tmp_path / "classes.txt").write_text("background\ncat, kitten")
    with pytest.raises(DatasetError, match="missing .*mask/b.png"):
        build_dataset("folder", images=tmp_path / "img", classes=tmp_path / "classes.txt", masks=tmp_path / "mask")
    Image.fromarray(np.ones((8, 12), np.uint8)).save(tmp_path / "mask" / "b.png")
    dataset = build_dataset("folder", images=tmp_path / "img", classes=tmp_path / "classes.txt",
                            masks=tmp_path / "mask")
    assert np.all(dataset[0].label == 1)
    unlabelled = build_dataset("folder", images=tmp_path / "img", classes=tmp_path / "classes.txt")
    assert unlabelled[1].label is None
    with pytest.raises(DatasetError, match="image folder"):
        build_dataset("folder", images=tmp_path / "nope", classes=tmp_path / "classes.txt")


def test_truncated_images_and_labels_are_errors_not_grey_pixels(tmp_path):
    import cv2
    write_dataset("ade20k", tmp_path, num_images=2, size=(64, 96))
    layout = BENCHMARKS["ade20k"]
    photo = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    jpeg = tmp_path / layout.image_dir / "ADE_val_00000001.jpg"
    cv2.imwrite(str(jpeg), photo)
    complete = jpeg.read_bytes()
    jpeg.write_bytes(complete[: len(complete) // 3])
    assert cv2.imread(str(jpeg)) is not None  # OpenCV alone would score a half-grey image
    label = tmp_path / layout.label_dir / "ADE_val_00000002.png"
    data = label.read_bytes()
    label.write_bytes(data[: len(data) - 20])  # IEND cut off
    dataset = build_dataset("ade20k", tmp_path)
    with pytest.raises(DatasetError, match="ADE_val_00000001.jpg is truncated .*JPEG end-of-image"):
        dataset[0]
    with pytest.raises(DatasetError, match="label .*ADE_val_00000002.png is truncated .*PNG IEND"):
        dataset[1]
    jpeg.write_bytes(complete + b"\0" * 100)  # trailing bytes after the end marker are fine
    assert dataset[0].image.shape == (64, 96, 3)


def test_oversized_images_and_labels_are_dataset_errors_with_a_setting(tmp_path, monkeypatch):
    write_dataset("ade20k", tmp_path, num_images=1, size=(64, 96))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 96 // 4)  # Pillow alone: a DecompressionBombError
    with pytest.raises(DatasetError, match=r"image .*ADE_val_00000001.jpg is 96×64 = 6,144 pixels, above "
                                           r"max_pixels=6,000; .*raise max_pixels"):
        build_dataset("ade20k", tmp_path, max_pixels=6000)[0]
    image = tmp_path / BENCHMARKS["ade20k"].image_dir / "ADE_val_00000001.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)  # a small image, the label stays 96×64
    with pytest.raises(DatasetError, match=r"label .*ADE_val_00000001.png is 96×64 .*above max_pixels=6,000"):
        build_dataset("ade20k", tmp_path, max_pixels=6000)[0]
    with pytest.raises(DatasetError, match=r"label .*is 8×8 but|is 96×64 but image"):
        build_dataset("ade20k", tmp_path)[0]  # the default limit reads it (despite Pillow's lowered one)


def test_empty_split_file_and_duplicate_ids_are_named(tmp_path):
    write_dataset("voc21", tmp_path, num_images=3, size=(32, 48))
    split = tmp_path / BENCHMARKS["voc21"].split_file
    ids = split.read_text().split()
    split.write_text("\n".join(ids + [ids[1]]) + "\n")
    with pytest.raises(DatasetError, match=f"more than once .*{ids[1]}"):
        build_dataset("voc21", tmp_path)
    split.write_text("\n\n")
    with pytest.raises(DatasetError, match="lists no image ids"):
        build_dataset("voc21", tmp_path)


def test_jpeg_damaged_inside_is_an_error_not_a_smeared_image(tmp_path):
    import cv2
    from skimage import data
    write_dataset("ade20k", tmp_path, num_images=1, size=(64, 96))
    jpeg = tmp_path / BENCHMARKS["ade20k"].image_dir / "ADE_val_00000001.jpg"
    label = tmp_path / BENCHMARKS["ade20k"].label_dir / "ADE_val_00000001.png"
    cv2.imwrite(str(jpeg), data.astronaut()[:, :, ::-1])
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(label)
    damaged = bytearray(jpeg.read_bytes())
    middle = len(damaged) // 2
    damaged[middle:middle + 40] = bytes(0xFF if i % 7 == 0 else b ^ 0x5A
                                        for i, b in enumerate(damaged[middle:middle + 40], start=middle))
    jpeg.write_bytes(bytes(damaged))  # the end-of-image marker is intact
    assert cv2.imread(str(jpeg)) is not None  # OpenCV alone returns an image (and only prints a warning)
    with pytest.raises(DatasetError, match=r"ADE_val_00000001.jpg decodes only with a decoder warning "
                                           r"\(Corrupt JPEG data"):
        build_dataset("ade20k", tmp_path)[0]


def test_images_are_decoded_to_rgb_with_known_colours(tmp_path):
    (tmp_path / "img").mkdir()
    colours = np.zeros((4, 6, 3), np.uint8)
    colours[:, :2] = (255, 0, 0)
    colours[:, 2:4] = (0, 255, 0)
    colours[:, 4:] = (0, 0, 255)
    Image.fromarray(colours).save(tmp_path / "img" / "flags.png")  # lossless: exact colours
    (tmp_path / "classes.txt").write_text("background\nred")
    sample = build_dataset("folder", images=tmp_path / "img", classes=tmp_path / "classes.txt")[0]
    assert sample.image[0, 0].tolist() == [255, 0, 0] and sample.image[0, 5].tolist() == [0, 0, 255]


def test_the_data_fingerprint_sees_content_and_a_rerun_reads_no_file_again(tmp_path, monkeypatch):
    import os

    from pearl.data import digests
    from pearl.data.datasets import build_dataset
    from pearl.data.synthetic import write_dataset
    monkeypatch.setenv("PEARL_CACHE", str(tmp_path / "cache"))
    root = write_dataset("voc21", tmp_path / "data", num_images=3, size=(48, 64))
    dataset = build_dataset("voc21", root)
    before = dataset.fingerprint()
    hashed = []
    sha256 = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda path: hashed.append(path) or sha256(path))
    monkeypatch.setattr(digests, "_memory", {})  # a new process: only the disk cache
    assert build_dataset("voc21", root).fingerprint() == before and hashed == []
    label = dataset.items[1][2]
    raw = bytearray(label.read_bytes())
    raw[-20] ^= 0xFF  # a corrected label of the same byte size (its content, not a valid PNG, is what counts)
    stat = label.stat()
    label.write_bytes(bytes(raw))
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert label.stat().st_size == stat.st_size
    after = build_dataset("voc21", root).fingerprint()
    assert after["files_sha256"] != before["files_sha256"] and hashed == [label]
    assert set(after) == set(before)


def test_images_that_differ_only_in_their_suffix_are_refused_in_a_folder(tmp_path):
    import cv2
    import numpy as np

    from pearl.data.datasets import DatasetError, build_dataset
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "a.png", "b.png"):
        cv2.imwrite(str(images / name), np.zeros((20, 20, 3), np.uint8))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=r"a\.jpg, .*a\.png differ only in their suffix"):
        build_dataset("folder", images=images, classes=classes)


def test_one_output_name_per_image_in_pearl_segment(tmp_path):
    from pearl.errors import UserError
    from pearl.segment import output_names
    one, two = tmp_path / "one", tmp_path / "two"
    assert output_names([one / "a.jpg", one / "b.jpg"]) == ["a", "b"]
    assert output_names([one / "a.jpg", one / "a.png", one / "c.png"]) == ["a_jpg", "a_png", "c"]
    assert output_names([one / "a.jpg", two / "a.jpg"]) == ["one_a_jpg", "two_a_jpg"]
    with pytest.raises(UserError, match="several images would be written as 'one_a_jpg'"):
        output_names([one / "a.jpg", one / "a_jpg.png", tmp_path / "one_a_jpg.png", one / "a.png"])


def test_a_very_thin_image_is_skipped_under_on_error_skip(tmp_path):
    import cv2
    import numpy as np

    from pearl import runner
    from pearl.errors import UserError

    from .conftest import compose
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "thin.png"), np.full((1, 5000, 3), 90, np.uint8))
    cv2.imwrite(str(images / "wide.png"), np.full((40, 60, 3), 90, np.uint8))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    job = ["model=tiny", "dataset=folder", f"dataset.images={images}", f"dataset.classes={classes}",
           f"results_dir={tmp_path / 'res'}", "progress=false", "loader_workers=0"]
    with pytest.raises(UserError, match="image thin: an image of 5000×1 pixels rescales to 2048×0"):
        runner.run_job(compose(job))
    _, record = runner.run_job(compose(job + ["on_error=skip"]))
    assert record.image_count == 1 and [item["id"] for item in record.skipped] == ["thin"]


def test_an_exif_orientation_tag_rotates_neither_the_image_nor_its_label(tmp_path):
    """Pixels as stored for both: a JPEG tagged "rotate 90°" (orientation 6) stays 40 wide, 20 high,
    like its label, everywhere an image is read (datasets, pearl.segment, PIL given to predict)."""
    from pearl.data.datasets import build_dataset, read_image
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(images / "tagged.jpg", exif=exif, quality=95)
    label = np.zeros((20, 40), np.uint8)
    label[:, :20] = 1
    Image.fromarray(label).save(masks / "tagged.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("dark\nbright\n")
    with Image.open(images / "tagged.jpg") as tagged:
        assert tagged.getexif()[0x0112] == 6  # the tag is there to be ignored
    image = read_image(images / "tagged.jpg")
    assert image.shape == (20, 40, 3) and image[:, :20].mean() > 200 and image[:, 20:].mean() < 50
    sample = build_dataset("folder", images=images, classes=classes, masks=masks)[0]
    assert sample.image.shape[:2] == sample.label.shape == (20, 40)
    assert np.array_equal(sample.label == 1, sample.image[:, :, 0] > 128)
