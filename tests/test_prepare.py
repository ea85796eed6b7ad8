"""python -m pearl.data check / prepare on official-format inputs that the tests write."""
import dataclasses
import os
import signal

import numpy as np
import pytest
from PIL import Image

from pearl.benchmarks import BENCHMARKS
from pearl.data.__main__ import main
from pearl.data.check import check
from pearl.data.convert import (
    CONVERTERS,
    PrepareError,
    ade847_labels,
    ade_full_size,
    cityscapes_train_ids,
    coco_object_ids,
    coco_stuff10k_train_ids,
    coco_stuff_train_ids,
    context60_labels,
    context459_labels,
    conversion_jobs,
    convert_files,
)
from pearl.data.synthetic import write_dataset
from pearl.protocols import class_names as pearl_class_names

# cityscapesScripts helpers/labels.py, written out: (name, id, trainId); 255 = not evaluated
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18)]

# MMSegmentation coco_stuff164k.py clsID_to_trID, a sample of its pairs (raw value → trainId), and the
# values it does not list (→ 255): the unused COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91 minus 1
COCO_STUFF_PAIRS = {0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 43: 39, 45: 40, 64: 59, 66: 60, 69: 61,
                    71: 62, 81: 72, 83: 73, 89: 79, 91: 80, 92: 81, 150: 139, 181: 170}
COCO_UNLISTED = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, 182, 200, 255]


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_cityscapes_label_ids_become_train_ids_as_the_published_table():
    ids = np.array([[label_id for _, label_id, _ in CITYSCAPES_LABELS]], np.uint8)
    expected = np.array([[train for _, _, train in CITYSCAPES_LABELS]], np.uint8)
    assert np.array_equal(cityscapes_train_ids(ids), expected)
    assert cityscapes_train_ids(np.array([[34, 255]], np.uint8)).tolist() == [[255, 255]]


def test_coco_stuffthingmaps_become_stuff_train_ids_and_object_labels():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    stuff = coco_stuff_train_ids(raw).ravel()
    for value, train in COCO_STUFF_PAIRS.items():
        assert stuff[value] == train, value
    assert all(stuff[v] == 255 for v in COCO_UNLISTED)
    assert sorted(set(stuff.tolist()) - {255}) == list(range(171))
    objects = coco_object_ids(raw).ravel()
    things = [v for v in range(90) if v not in COCO_UNLISTED]
    assert [objects[v] for v in things] == [stuff[v] + 1 for v in things]  # things 1..80, in trainId order
    assert objects[0] == 1 and objects[89] == 80
    assert all(objects[v] == 0 for v in (91, 150, 181, 182, 255))  # stuff and unlabelled → background
    assert all(objects[v] == v for v in (11, 25, 90))  # values that never occur stay as they are


def test_an_interrupted_conversion_resumes_without_redoing_finished_files(tmp_path):
    label_dir = tmp_path / "cityscapes" / "gtFine" / "val" / "aachen"
    for i in range(4):
        _png(label_dir / f"a_{i}_gtFine_labelIds.png", np.full((4, 6), 7 + i))
    jobs = conversion_jobs("cityscapes", tmp_path)
    assert len(jobs) == 4
    assert convert_files(jobs[:2], workers=1, progress=False) == 2  # "interrupted" after two files
    finished = {j.targets[0]: os.stat(j.targets[0]).st_mtime_ns for j in jobs[:2]}
    (label_dir / "a_2_gtFine_labelTrainIds.png.999.tmp").write_bytes(b"half")  # a killed writer's leftover
    assert convert_files(jobs, workers=2, progress=False) == 2
    assert all(os.stat(path).st_mtime_ns == mtime for path, mtime in finished.items())
    train_id = {label_id: train for _, label_id, train in CITYSCAPES_LABELS}
    assert np.array_equal(np.array(Image.open(jobs[3].targets[0])), np.full((4, 6), train_id[10]))
    assert conversion_jobs("cityscapes", tmp_path) == jobs  # outputs are not inputs


def test_a_worker_that_dies_ends_prepare_naming_the_file_and_a_rerun_resumes(tmp_path, monkeypatch):
    label_dir = tmp_path / "cityscapes" / "gtFine" / "val" / "aachen"
    for i in range(6):
        _png(label_dir / f"a_{i}_gtFine_labelIds.png", np.full((4, 6), 7 + i))
    jobs = conversion_jobs("cityscapes", tmp_path)
    fatal = jobs[4].sources[-1]
    converter = CONVERTERS["cityscapes"]

    def dies_on_one_file(sources):  # as the OOM killer would end the worker (the pool's processes are forked)
        if sources[-1] == fatal:
            os.kill(os.getpid(), signal.SIGKILL)
        return converter.outputs(sources)
    monkeypatch.setitem(CONVERTERS, "cityscapes", dataclasses.replace(converter, outputs=dies_on_one_file))
    with pytest.raises(PrepareError, match="worker died") as error:
        convert_files(jobs, workers=2, progress=False)
    assert fatal in str(error.value) and "run the same command again" in str(error.value)
    monkeypatch.undo()
    written = sum(os.path.exists(job.targets[0]) for job in jobs)
    assert convert_files(jobs, workers=2, progress=False) == len(jobs) - written >= 1
    assert all(os.path.exists(job.targets[0]) for job in jobs)


@pytest.fixture
def official_sizes(monkeypatch):
    def set_size(name, size):
        monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(BENCHMARKS[name], official_size=size))
    return set_size


def _raw_map(i: int) -> np.ndarray:
    """An 8×10 stuffthingmap of values that occur in COCO (things and stuff), different per image."""
    occurring = np.array([v for v in range(182) if v not in COCO_UNLISTED], np.uint8)
    return occurring[(np.arange(80) + 60 * i) % len(occurring)].reshape(8, 10)


def test_prepare_coco_stuff_from_raw_stuffthingmaps_then_check(tmp_path, official_sizes, capsys):
    official_sizes("coco_stuff", 2)
    official_sizes("coco_object", 2)
    images = tmp_path / "coco_stuff164k" / "images" / "val2017"
    raw_dir = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    for i in range(2):
        _png(images / f"00000000000{i}.jpg", np.zeros((8, 10, 3)))
        _png(raw_dir / f"00000000000{i}.png", _raw_map(i))
    assert main(["prepare", "coco_stuff", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 0
    assert main(["prepare", "coco_object", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "coco_stuff: 2 converted" in out and "ok        coco_object: 2 images" in out
    assert main(["prepare", "coco_stuff", "--root", str(tmp_path), "--quiet"]) == 0
    assert "0 converted, 2 already there" in capsys.readouterr().out
    label = np.array(Image.open(raw_dir / "000000000001_labelTrainIds.png"))
    assert np.array_equal(label, coco_stuff_train_ids(_raw_map(1)))


def test_prepare_without_official_files_names_the_folder(tmp_path, capsys):
    assert main(["prepare", "cityscapes", "--root", str(tmp_path)]) == 2
    assert f"no official files under {tmp_path}: cityscapes is built from cityscapes/gtFine/val/*_gtFine_labelIds" \
        in capsys.readouterr().err
    assert main(["prepare", "context59", "--root", str(tmp_path)]) == 2
    assert f"{tmp_path}/VOCdevkit/VOC2010/ImageSets/Main/val.txt is missing: it comes with VOC2010" in \
        capsys.readouterr().err


def test_check_names_each_fault(tmp_path, official_sizes):
    official_sizes("voc21", 4)
    write_dataset("voc21", tmp_path, num_images=4, size=(32, 48))
    layout = BENCHMARKS["voc21"]
    ids = (tmp_path / layout.split_file).read_text().split()
    report = check("voc21", tmp_path)
    assert report.ready and "4 images with labels" in report.line()

    official_sizes("voc21", 1449)
    assert "4 images, the official split has 1449" in check("voc21", tmp_path).line()
    official_sizes("voc21", 4)

    label = tmp_path / layout.label_dir / f"{ids[1]}.png"
    kept = label.read_bytes()
    _png(label, np.zeros((10, 10)))
    line = check("voc21", tmp_path).line()
    assert line.startswith("NOT READY voc21") and f"1 label(s) not the size of their image (e.g. {label}" in line
    label.write_bytes(kept)

    label.write_bytes(kept[:-20])  # cut short: only decoding finds it
    assert "decoded files are unusable" in check("voc21", tmp_path, deep=True).line()
    assert "truncated" in check("voc21", tmp_path, deep=True).line()
    label.unlink()
    assert "missing" in check("voc21", tmp_path).line() and f"{ids[1]}.png" in check("voc21", tmp_path).line()


def test_check_command_exits_nonzero_when_any_dataset_is_not_ready(tmp_path, official_sizes, capsys):
    official_sizes("ade20k", 2)
    write_dataset("ade20k", tmp_path, num_images=2, size=(32, 48))
    assert main(["check", "ade20k", "--root", str(tmp_path)]) == 0
    assert main(["check", "ade20k", "cityscapes", "--root", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("ok        ade20k") and lines[-1].startswith("NOT READY cityscapes: dataset")
    assert "pearl.data check" not in lines[-1]  # the check gives no advice to run itself; the runner's error does
    assert main(["check", "voc2012"]) == 2


class _Server:
    """A local HTTP server with range requests; ``cut_first`` ends the first transfer halfway."""

    def __init__(self, payload: bytes, cut_first: bool = False):
        import http.server
        import threading
        server_self = self
        self.payload, self.cut, self.ranges = payload, cut_first, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                header = self.headers.get("Range")
                start = int(header.split("=")[1].rstrip("-")) if header else 0
                server_self.ranges.append(start)
                body = server_self.payload[start:]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server_self.cut:
                    server_self.cut = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-transfer
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/archive.tar"

    def close(self):
        self.httpd.shutdown()


def _archive(tmp_path) -> bytes:
    import io
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        data = os.urandom(300_000)
        info = tarfile.TarInfo("VOCdevkit/VOC2012/hello.bin")
        info.size = len(data)
        bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_an_interrupted_download_resumes_and_is_checked(tmp_path):
    import hashlib

    from pearl.data.download import Archive, DownloadError, extract, fetch
    payload = _archive(tmp_path)
    server = _Server(payload, cut_first=True)
    target = tmp_path / "downloads" / "archive.tar"
    sha256, md5 = hashlib.sha256(payload).hexdigest(), hashlib.md5(payload).hexdigest()
    pinned = Archive(server.url, ".", (f"md5:{md5}", f"sha256:{sha256}"), len(payload), "the test")
    try:
        with pytest.raises(DownloadError, match="run again to resume"):
            fetch(pinned, target, progress=False)
        part = target.with_name("archive.tar.part")
        assert 0 < part.stat().st_size < len(payload) and not target.exists()
        assert fetch(pinned, target, progress=False) == "md5, sha256 as pinned (the test)"
        assert server.ranges == [0, len(payload) // 2]  # the second request resumed where the first stopped
        assert target.read_bytes() == payload and not part.exists()
        extract(target, tmp_path)
        assert (tmp_path / "VOCdevkit" / "VOC2012" / "hello.bin").stat().st_size == 300_000
        wrong_sha = Archive(server.url, ".", (f"md5:{md5}", "sha256:" + "0" * 64), len(payload))
        with pytest.raises(DownloadError, match=rf"archive.tar has sha256 {sha256}, expected 0+: deleted it"):
            fetch(wrong_sha, target, progress=False)  # the file on disk is checked (md5 right, sha256 wrong)
        assert not target.exists()
        with pytest.raises(DownloadError, match=rf"has {len(payload)} bytes, expected {len(payload) + 1}: deleted"):
            fetch(Archive(server.url, ".", (f"sha256:{sha256}",), len(payload) + 1), target, progress=False)
        assert not target.exists()
        unpinned = fetch(Archive(server.url, "."), target, progress=False)
        assert unpinned == f"sha256:{sha256} (not pinned here: compare with the publisher's)"
    finally:
        server.close()


def test_prepare_download_fetches_checks_and_extracts_once(tmp_path, monkeypatch, capsys):
    import hashlib

    from pearl.data import download as downloads
    payload = _archive(tmp_path)
    server = _Server(payload)
    archive = downloads.Archive(server.url, ".", ("sha256:" + hashlib.sha256(payload).hexdigest(),), len(payload))
    monkeypatch.setitem(downloads.ARCHIVES, "voc21", (archive,))
    try:
        assert main(["prepare", "voc21", "--download", "--root", str(tmp_path), "--quiet"]) == 1  # no images yet
        out = capsys.readouterr().out
        assert f"archive.tar: sha256 as pinned; extracted into {tmp_path}\n" in out
        assert (tmp_path / "VOCdevkit" / "VOC2012" / "hello.bin").is_file()
        (tmp_path / "VOCdevkit" / "VOC2012" / "hello.bin").unlink()
        main(["prepare", "voc21", "--download", "--root", str(tmp_path), "--quiet"])
        assert server.ranges == [0] and not (tmp_path / "VOCdevkit" / "VOC2012" / "hello.bin").exists()
    finally:
        server.close()


def test_every_public_archive_is_pinned_or_says_it_is_not():
    from pearl.benchmarks import ALL_DATASETS
    from pearl.data.download import ARCHIVES, BEHIND_LOGIN
    assert set(ARCHIVES) | set(BEHIND_LOGIN) == set(ALL_DATASETS)
    pinned = {a.url.rsplit("/", 1)[-1]: a for archives in ARCHIVES.values() for a in archives if a.digests}
    assert set(pinned) == {"VOCtrainval_11-May-2012.tar", "VOCtrainval_03-May-2010.tar",
                           "ADEChallengeData2016.zip", "val2017.zip"}
    for archive in pinned.values():
        assert archive.source and all(d.split(":")[0] in ("md5", "sha256") for d in archive.digests)
        assert all(len(d.split(":")[1]) == {"md5": 32, "sha256": 64}[d.split(":")[0]] for d in archive.digests)


def test_archives_that_would_write_outside_their_folder_are_refused(tmp_path):
    import io
    import tarfile

    from pearl.data.download import DownloadError, extract
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as bundle:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        bundle.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="outside its folder"):
        extract(evil, tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()


def test_datasets_behind_a_login_get_instructions(tmp_path, capsys):
    assert main(["prepare", "cityscapes", "--download", "--root", str(tmp_path)]) == 2
    assert "register at https://www.cityscapes-dataset.com" in capsys.readouterr().err


# MMSegmentation pascal_context.py ``_mapping`` as published (unsorted; 0 = background), and the
# names of the 459-class labels.txt at a few of those ids
MMSEG_CONTEXT_MAPPING = [0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
                         420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72,
                         458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115]
CONTEXT_LABELS_TXT = {1: "accordion", 2: "aeroplane", 9: "bag", 284: "person", 458: "wood", 459: "wool"}


def _mat(path, **arrays):
    from scipy.io import savemat
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, arrays)


def test_pascal_context_classes_agree_with_the_published_tables():
    pc459, pc59 = pearl_class_names("context459"), pearl_class_names("context59")
    assert len(pc459) == 459 and len(pc59) == 59
    assert all(pc459[label_id - 1] == name for label_id, name in CONTEXT_LABELS_TXT.items())
    assert [pc459[label_id - 1] for label_id in sorted(MMSEG_CONTEXT_MAPPING)[1:]] == pc59
    # PEARL's pc60.txt keeps a trailing space in "wood " (byte-exact, docs/protocol.md)
    assert pearl_class_names("context60") == ["background"] + pc59[:-1] + ["wood "]


def test_prepare_pascal_context_from_the_official_mat_files_then_check(tmp_path, official_sizes, capsys):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    ids = ["2008_000002", "2008_000003", "2010_000004"]
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids + ["2010_000009"]) + "\n")  # 9: no .mat
    every_id = np.arange(1, 460, dtype=np.uint16)
    maps = {ids[0]: every_id[:230].reshape(10, 23), ids[1]: every_id[229:].reshape(10, 23),
            ids[2]: np.array([[0, 256, 257, 284] * 5] * 4, np.uint16)}  # 0: no class (never in the release)
    for i, label_map in maps.items():
        _png(base / "JPEGImages" / f"{i}.jpg", np.zeros((*label_map.shape, 3)))
        _mat(base / "trainval" / f"{i}.mat", LabelMap=label_map)
    for name in ("context60", "context59", "context459"):
        official_sizes(name, 3)
    assert main(["prepare", "context60", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 0
    assert main(["prepare", "context459", "--root", str(tmp_path), "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "context60: 3 converted" in out and "ok        context459: 3 images" in out
    assert (base / "ImageSets" / "SegmentationContext" / "val.txt").read_text().split() == ids
    evaluated = sorted(MMSEG_CONTEXT_MAPPING)
    for i, label_map in maps.items():
        expected60 = np.vectorize(lambda v: evaluated.index(v) if v in evaluated else 0)(label_map)
        assert np.array_equal(np.array(Image.open(base / "SegmentationClassContext" / f"{i}.png")), expected60)
        tif = np.array(Image.open(base / "annotations_detectron2" / "pc459_val" / f"{i}.tif"))
        assert tif.dtype == np.uint16
        assert np.array_equal(tif, np.where(label_map == 0, 65535, label_map.astype(np.int64) - 1))
    assert main(["check", "context60", "context59", "context459", "--root", str(tmp_path)]) == 0
    from pearl.data.datasets import build_dataset
    sample = build_dataset("context459", tmp_path)[2]
    assert sample.label[0, :4].tolist() == [65535, 255, 256, 283]  # 255 is a class here, 65535 is ignored


def test_context_rules_refuse_values_that_are_not_class_ids():
    with pytest.raises(ValueError, match="not PASCAL Context's 459 class ids"):
        context60_labels(np.array([[1, 460]]))
    with pytest.raises(ValueError, match="not PASCAL Context's"):
        context459_labels(np.array([[-1.0, 3.0]]))
    assert context459_labels(np.array([[1.0, 459.0]])).tolist() == [[0, 458]]  # MATLAB doubles are fine


# MMSegmentation coco_stuff10k.py clsID_to_trID, a sample of its pairs (the .mat's COCO id → label)
COCO10K_PAIRS = {0: 0, 1: 1, 11: 11, 13: 12, 25: 24, 27: 25, 28: 26, 31: 27, 44: 40, 46: 41, 65: 60, 67: 61, 70: 62,
                 72: 63, 82: 73, 84: 74, 90: 80, 92: 81, 150: 139, 182: 171}


def test_prepare_coco_stuff10k_from_the_official_mat_files(tmp_path, official_sizes, capsys):
    base = tmp_path / "coco_stuff10k"
    (base / "imageLists").mkdir(parents=True)
    (base / "imageLists" / "test.txt").write_text("COCO_train2014_000000000077\nCOCO_train2014_000000000078\n")
    (base / "imageLists" / "train.txt").write_text("COCO_train2014_000000000009\n")
    ids = {"COCO_train2014_000000000077": np.array(list(COCO10K_PAIRS) * 2, np.uint8).reshape(4, 10),
           "COCO_train2014_000000000078": np.arange(183, dtype=np.uint8)[np.arange(40) % 183].reshape(4, 10),
           "COCO_train2014_000000000009": np.zeros((4, 10), np.uint8)}
    for i, s_array in ids.items():
        _png(base / "images" / f"{i}.jpg", np.full((4, 10, 3), 90))
        _mat(base / "annotations" / f"{i}.mat", S=s_array)
    official_sizes("coco_stuff10k", 2)
    assert main(["prepare", "coco_stuff10k", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 0
    assert "ok        coco_stuff10k: 2 images" in capsys.readouterr().out
    out = np.array(Image.open(base / "annotations" / "test2014" / "COCO_train2014_000000000077_labelTrainIds.png"))
    assert out.ravel().tolist() == [COCO10K_PAIRS[v] for v in ids["COCO_train2014_000000000077"].ravel()]
    copied = base / "images" / "test2014" / "COCO_train2014_000000000078.jpg"
    assert copied.read_bytes() == (base / "images" / "COCO_train2014_000000000078.jpg").read_bytes()
    assert not (base / "images" / "test2014" / "COCO_train2014_000000000009.jpg").exists()  # train: not evaluated
    used = [i for i in range(1, 183) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)]
    assert coco_stuff10k_train_ids(np.array(used, np.uint8)).tolist() == list(range(1, 172))
    from pearl.data.datasets import build_dataset
    label = build_dataset("coco_stuff10k", tmp_path)[0].label  # reduce_zero_label: 0 ignored, k → k − 1
    assert label.ravel().tolist() == [255 if COCO10K_PAIRS[v] == 0 else COCO10K_PAIRS[v] - 1
                                      for v in ids["COCO_train2014_000000000077"].ravel()]


# MaskFormer / CAT-Seg ADE20K_SEM_SEG_FULL_CATEGORIES, a sample: (name, ADE20K-full class index, label)
ADE_FULL_SAMPLE = [("wall", 2978, 0), ("building, edifice", 312, 1), ("sky", 2420, 2), ("armchair", 57, 29),
                   ("towel rail", 2826, 845), ("adding machine, totalizer, totaliser", 3148, 846)]


def _seg_png(class_index: np.ndarray) -> np.ndarray:
    """ADE20K-full ``_seg.png`` colours: R = class // 256 · 10 (+ a remainder R // 10 drops), G = class % 256."""
    rgb = np.zeros((*class_index.shape, 3), np.uint8)
    rgb[..., 0] = class_index // 256 * 10 + 7
    rgb[..., 1] = class_index % 256
    rgb[..., 2] = 33  # the instance channel, not the class
    return rgb


def test_prepare_ade847_from_the_full_release(tmp_path, official_sizes, capsys):
    names = pearl_class_names("ade847")
    assert len(names) == 847 and all(names[label] == name for name, _, label in ADE_FULL_SAMPLE)
    folder = tmp_path / "ADE20K_2021_17_01" / "images" / "ADE" / "validation" / "cultural" / "apse_indoor"
    small = np.array([[full_id for _, full_id, _ in ADE_FULL_SAMPLE] + [1, 4000]] * 3)  # 1, 4000: not evaluated
    blocks = np.kron(np.array([[2978, 312, 57], [2420, 3148, 5]]), np.ones((300, 300), int))  # 600 × 900
    for stem, class_index in (("ADE_val_00000001", small), ("ADE_val_00000002", blocks)):
        _png(folder / f"{stem}.jpg", np.full((*class_index.shape, 3), 120))
        _png(folder / f"{stem}_seg.png", _seg_png(class_index))
    official_sizes("ade847", 2)
    assert main(["prepare", "ade847", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 0
    assert "ok        ade847: 2 images" in capsys.readouterr().out
    out_dir = tmp_path / "ADE20K_2021_17_01" / "annotations_detectron2" / "validation"
    label = np.array(Image.open(out_dir / "ADE_val_00000001.tif"))
    assert label.dtype == np.uint16 and label[0].tolist() == [lab for _, _, lab in ADE_FULL_SAMPLE] + [65535, 65535]
    resized = np.array(Image.open(out_dir / "ADE_val_00000002.tif"))  # short side 600 → 512, 900 → 768
    assert resized.shape == (512, 768) and resized[128, 128] == 0 and resized[128, 640] == 29
    assert resized[384, 384] == 846 and resized[384, 640] == 65535  # full index 5 is not one of the 847
    image = Image.open(tmp_path / "ADE20K_2021_17_01" / "images_detectron2" / "validation" / "ADE_val_00000002.jpg")
    assert image.size == (768, 512)
    assert ade_full_size(600, 800) == (512, 683) and ade_full_size(1024, 600) == (874, 512)
    assert ade_full_size(512, 700) is None and ade_full_size(300, 200) is None
    # CAT-Seg: "ad, advertisement" has id 6, trainId 263; 4000 is no ADE20K-full class
    assert ade847_labels(_seg_png(np.array([[3148, 6, 4000]]))).tolist() == [[846, 263, 65535]]


def test_prepare_names_a_damaged_official_annotation(tmp_path, capsys):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n2008_000003\n")
    _mat(base / "trainval" / "2008_000002.mat", LabelMap=np.ones((4, 5), np.uint16))
    (base / "trainval" / "2008_000003.mat").write_bytes(b"MATLAB 5.0 MAT-file, cut short")  # truncated download
    assert main(["prepare", "context60", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"cannot convert {base / 'trainval' / '2008_000003.mat'}" in err and "re-extract it" in err
    _mat(base / "trainval" / "2008_000003.mat", Other=np.ones((4, 5)))  # a .mat without the LabelMap array
    assert main(["prepare", "context60", "--root", str(tmp_path), "--workers", "1", "--quiet"]) == 2
    assert "not an official annotation with a 'LabelMap' array" in capsys.readouterr().err
