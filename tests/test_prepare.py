"""python -m pearl.data check / prepare on official-format inputs that the tests write."""
import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from pearl.benchmarks import BENCHMARKS
from pearl.data.__main__ import main
from pearl.data.check import check
from pearl.data.convert import (
    cityscapes_train_ids,
    coco_object_ids,
    coco_stuff_train_ids,
    conversion_jobs,
    convert_files,
)
from pearl.data.synthetic import write_dataset

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
    label_dir = tmp_path / "gtFine" / "val" / "aachen"
    for i in range(4):
        _png(label_dir / f"a_{i}_gtFine_labelIds.png", np.full((4, 6), 7 + i))
    jobs = conversion_jobs("cityscapes", tmp_path / "gtFine" / "val")
    assert len(jobs) == 4
    assert convert_files(jobs[:2], workers=1, progress=False) == 2  # "interrupted" after two files
    finished = {j[2]: os.stat(j[2]).st_mtime_ns for j in jobs[:2]}
    (label_dir / "a_2_gtFine_labelTrainIds.png.999.tmp").write_bytes(b"half")  # a killed writer's leftover
    assert convert_files(jobs, workers=2, progress=False) == 2
    assert all(os.stat(path).st_mtime_ns == mtime for path, mtime in finished.items())
    assert np.array_equal(np.array(Image.open(jobs[3][2])), np.full((4, 6), cityscapes_train_ids(np.uint8(10))))
    assert conversion_jobs("cityscapes", tmp_path / "gtFine" / "val") == jobs  # outputs are not inputs


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
    assert f"no official label files (*_gtFine_labelIds.png) under {tmp_path}/cityscapes/gtFine/val" in \
        capsys.readouterr().err
    assert main(["prepare", "context59", "--root", str(tmp_path)]) == 2
    assert "pascal_context.py" in capsys.readouterr().err


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

    from pearl.data.download import DownloadError, extract, fetch
    payload = _archive(tmp_path)
    server = _Server(payload, cut_first=True)
    target = tmp_path / "downloads" / "archive.tar"
    pinned = "sha256:" + hashlib.sha256(payload).hexdigest()
    try:
        with pytest.raises(DownloadError, match="run again to resume"):
            fetch(server.url, target, pinned, progress=False)
        part = target.with_name("archive.tar.part")
        assert 0 < part.stat().st_size < len(payload) and not target.exists()
        assert fetch(server.url, target, pinned, progress=False) == pinned
        assert server.ranges == [0, len(payload) // 2]  # the second request resumed where the first stopped
        assert target.read_bytes() == payload and not part.exists()
        extract(target, tmp_path)
        assert (tmp_path / "VOCdevkit" / "VOC2012" / "hello.bin").stat().st_size == 300_000
        target.unlink()
        with pytest.raises(DownloadError, match=r"archive.tar has md5 [0-9a-f]+, expected 0+: deleted it"):
            fetch(server.url, target, "md5:" + "0" * 32, progress=False)
        assert not target.exists()
    finally:
        server.close()


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
