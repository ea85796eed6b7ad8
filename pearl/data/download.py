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
    digest: str | None    # "md5:…" or "sha256:…"; None = not pinned here (the SHA-256 is printed to compare)
    extract_to: str       # folder under the data root


_VOC = Archive("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
               "md5:6cd6e144f989b92b3379bac3b3de84fd", ".")  # the digest torchvision pins
_COCO = (Archive("http://images.cocodataset.org/zips/val2017.zip", None, "coco_stuff164k/images"),
         Archive("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
                 None, "coco_stuff164k/annotations"))
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "voc21": (_VOC,), "voc20": (_VOC,),
    "ade20k": (Archive("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", None, "."),),
    "coco_stuff": _COCO, "coco_object": _COCO,
}
BEHIND_LOGIN = {
    "cityscapes": "register at https://www.cityscapes-dataset.com, download gtFine_trainvaltest.zip and "
                  "leftImg8bit_trainvaltest.zip, unzip both into <root>/cityscapes, then run prepare again",
    "context60": "download VOC2010 (VOCtrainval_03-May-2010.tar) into <root>/VOCdevkit and the PASCAL Context "
                 "annotations, then build the labels with MMSegmentation's pascal_context.py",
}
BEHIND_LOGIN["context59"] = BEHIND_LOGIN["context60"]
CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, digest: str | None) -> str:
    """The file's SHA-256 (or pinned digest) after checking it; a mismatch deletes the file."""
    if digest is None:
        return f"sha256:{file_digest(path, 'sha256')} (not pinned here: compare with the publisher's)"
    algorithm, expected = digest.split(":", 1)
    actual = file_digest(path, algorithm)
    if actual != expected:
        path.unlink()
        raise DownloadError(f"{path} has {algorithm} {actual}, expected {expected}: deleted it; download it again "
                            f"(a damaged or changed file)")
    return digest


def fetch(url: str, path: Path, digest: str | None, progress: bool = True, timeout: float = 60.0) -> str:
    """Download ``url`` to ``path`` (resuming ``path.part``), verify it; returns the digest line."""
    path = Path(path)
    if path.is_file():
        return _verify(path, digest)
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
    return _verify(path, digest)


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
    lines = []
    for archive in ARCHIVES[name]:
        path = root / "downloads" / archive.url.rsplit("/", 1)[-1]
        digest = fetch(archive.url, path, archive.digest, progress)
        extract(path, root / archive.extract_to)
        lines.append(f"{path.name}: {digest}, extracted into {root / archive.extract_to}")
    return lines
