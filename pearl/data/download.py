"""Fetching the official archives: resumable HTTP downloads, digest check, safe extraction.

A download goes to ``<file>.part`` and continues from its size with an HTTP range request when run
again; the finished file is checked against its pinned digest (a mismatch deletes it and says so)
and extracted where the layout expects it. Datasets behind a login get instructions instead.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError


class DownloadError(UserError, RuntimeError):
    """A download that failed or does not match its pinned digest."""


@dataclass(frozen=True)
class Archive:
    url: str
    extract_to: str                 # folder under the data root
    digests: tuple[str, ...] = ()   # "md5:…" / "sha256:…", all checked; () = not pinned (its SHA-256 is printed)
    size: int | None = None         # bytes, checked before hashing
    source: str = ""                # where the pinned values come from


_VOC2012 = Archive("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar", ".",
                   ("md5:6cd6e144f989b92b3379bac3b3de84fd",
                    "sha256:e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb"), 1999639040,
                   "MD5: torchvision datasets/voc.py; SHA-256 and size: tensorflow_datasets url_checksums/voc.txt")
_VOC2010 = Archive("http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar", ".",
                   ("md5:da459979d0c395079b5c75ee67908abb",), source="torchvision datasets/voc.py")
_CONTEXT = (_VOC2010, Archive("https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz", "VOCdevkit/VOC2010"))
_COCO = (Archive("http://images.cocodataset.org/zips/val2017.zip", "coco_stuff164k/images",
                 ("sha256:4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",), 815585330,
                 "tensorflow_datasets url_checksums/coco2017.txt"),
         Archive("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
                 "coco_stuff164k/annotations"))
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "voc21": (_VOC2012,), "voc20": (_VOC2012,),
    "ade20k": (Archive("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", ".",
                       ("sha256:7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29",), 967382037,
                       "tensorflow_datasets url_checksums/ade20k.txt"),),
    "coco_stuff": _COCO, "coco_object": _COCO,
    "context60": _CONTEXT, "context59": _CONTEXT, "context459": _CONTEXT,
    "coco_stuff10k": (Archive("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                              "cocostuff-10k-v1.1.zip", "coco_stuff10k"),),
}
BEHIND_LOGIN = {
    "cityscapes": "register at https://www.cityscapes-dataset.com, download gtFine_trainvaltest.zip and "
                  "leftImg8bit_trainvaltest.zip, unzip both into <root>/cityscapes, then run prepare again",
    "ade847": "request the ADE20K full release at https://groups.csail.mit.edu/vision/datasets/ADE20K/request_data/, "
              "unpack it so that <root>/ADE20K_2021_17_01/images/ADE/validation holds the ADE_val_*.jpg and "
              "*_seg.png files, then run prepare again (without --download)",
}
CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, archive: Archive) -> str:
    """What was checked, after checking the file's size and every pinned digest; a mismatch deletes it."""
    def reject(what: str) -> DownloadError:
        path.unlink()
        return DownloadError(f"{path} {what}: deleted it; download it again (a damaged, truncated or changed file)")
    if archive.size is not None and path.stat().st_size != archive.size:
        raise reject(f"has {path.stat().st_size} bytes, expected {archive.size}")
    if not archive.digests:
        return f"sha256:{file_digest(path, 'sha256')} (not pinned here: compare with the publisher's)"
    for digest in archive.digests:
        algorithm, expected = digest.split(":", 1)
        actual = file_digest(path, algorithm)
        if actual != expected:
            raise reject(f"has {algorithm} {actual}, expected {expected}")
    return ", ".join(digest.split(":")[0] for digest in archive.digests) + " as pinned" + \
        (f" ({archive.source})" if archive.source else "")


def fetch(archive: Archive, path: Path, progress: bool = True, timeout: float = 60.0) -> str:
    """Download ``archive`` to ``path`` (resuming ``path.part``), verify it; returns what was checked."""
    path, url = Path(path), archive.url
    if path.is_file():
        return _verify(path, archive)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if start and response.status != 206:  # the server ignored the range: start over
                start = 0
            total = response.length + start if response.length is not None else None
            with open(part, "ab" if start else "wb") as out, tqdm(total=total, initial=start, unit="B",
                                                                  unit_scale=True, desc=path.name,
                                                                  disable=not progress) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and part.stat().st_size < total:
                raise DownloadError(f"{url}: the transfer stopped at {part.stat().st_size} of {total} bytes; run "
                                    f"again to resume from {part}")
    except DownloadError:
        raise
    except Exception as error:  # network errors of every kind: the partial file stays for the resume
        raise DownloadError(f"{url}: {type(error).__name__}: {error}; run again to resume from {part}") from None
    os.replace(part, path)
    return _verify(path, archive)


def _inside(root: Path, member: str) -> bool:
    target = (root / member).resolve()
    return target == root or root in target.parents


def extract(archive: Path, destination: Path) -> None:
    """Unpack a .tar(.gz) or .zip into ``destination``, refusing members that would land outside it."""
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            names = bundle.namelist()
            bad = [n for n in names if not _inside(root, n)]
            if bad:
                raise DownloadError(f"{archive} holds paths outside its folder ({bad[0]}); not extracted")
            bundle.extractall(root)
        return
    with tarfile.open(archive) as bundle:
        members = bundle.getmembers()
        bad = [m.name for m in members if not _inside(root, m.name) or m.issym() or m.islnk()]
        if bad:
            raise DownloadError(f"{archive} holds links or paths outside its folder ({bad[0]}); not extracted")
        bundle.extractall(root, members=members)


def download(name: str, root: Path, progress: bool = True) -> list[str]:
    """Fetch, verify and extract the official archives of benchmark ``name``; one line per archive."""
    if name in BEHIND_LOGIN:
        raise DownloadError(f"{name} cannot be downloaded without a login: {BEHIND_LOGIN[name]}")
    if name not in ARCHIVES:
        raise DownloadError(f"{name} has no archive to download")
    lines = []
    for archive in ARCHIVES[name]:
        path = root / "downloads" / archive.url.rsplit("/", 1)[-1]
        checked = fetch(archive, path, progress)
        stamp = path.with_name(path.name + ".extracted")  # a second prepare --download does not unpack again
        if not stamp.is_file():
            extract(path, root / archive.extract_to)
            stamp.write_text(f"{root / archive.extract_to}\n")
        lines.append(f"{path.name}: {checked}; extracted into {root / archive.extract_to}")
    return lines
