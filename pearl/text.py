"""Text side: the 80-template prompt ensemble, synonym queries and their prototypes.

Follows docs/protocol.md §4–5 (SCLIP/NACLIP/PEARL ``get_cls_idx`` and the prototype loop in
``naclip.py``): one prototype per *name*; the class of each name is kept in ``query_to_class``.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from tqdm import tqdm

from .protocols import parse_class_lines

TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"openai80": TEMPLATES, "single": ("a photo of a {}.",)}


def template_set(templates: str) -> tuple[str, ...]:
    """The prompt templates the parameter ``templates`` names: a set's name or a file, one per line."""
    if templates in TEMPLATE_SETS:
        return TEMPLATE_SETS[templates]
    lines = tuple(line.strip() for line in Path(templates).read_text(encoding="utf-8").splitlines() if line.strip())
    bad = [line for line in lines if line.count("{}") != 1]
    if not lines or bad:
        raise ValueError(f"template file {templates}: " + (f"template {bad[0]!r} must hold {{}} exactly once" if bad
                                                           else "holds no template; write one per line, e.g. "
                                                                "'a photo of a {}.'"))
    return lines


@dataclass(frozen=True)
class Vocabulary:
    """Queries (names) in file order and the class index of each."""

    class_lines: tuple[str, ...]
    queries: tuple[str, ...]
    query_to_class: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_lines)

    @property
    def num_queries(self) -> int:
        return len(self.queries)


def load_vocabulary(classes: Sequence[str] | str | os.PathLike) -> Vocabulary:
    """Build the query list from class lines (``", "`` separates synonyms) or a class file path.

    Raises ValueError for an empty list, an empty class or name, or a duplicate class line.
    """
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise ValueError(f"class file {str(path)!r} does not exist; pass a list of class names "
                             "or the path of a file with one class per line")
        lines = parse_class_lines(path.read_text(encoding="utf-8"))
    else:
        lines = [str(c) for c in classes]
    if not lines:
        raise ValueError("the class list is empty; give at least one class name")
    seen: dict[str, int] = {}
    queries, owners = [], []
    for idx, line in enumerate(lines):
        if not line.strip():
            raise ValueError(f"class {idx} is an empty line; remove blank lines from the class list (one class a line, "
                             f"no empty last line)")
        if line in seen:
            raise ValueError(f"class {idx} {line!r} duplicates class {seen[line]}; each class must be listed once")
        seen[line] = idx
        for name in line.split(", "):
            if not name.strip():
                raise ValueError(f"class {idx} ({line!r}) has an empty name; remove stray ', ' separators")
            queries.append(name)
            owners.append(idx)
    return Vocabulary(tuple(lines), tuple(queries), tuple(owners))


_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_memory_cache: dict[str, torch.Tensor] = {}


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the text side as a whole: every non-visual module's structure (its ``repr``: layer
    sizes and activation, GELU or QuickGELU), its parameters and buffers with their dtypes, and the
    model's plain settings (context length, pooling, end-of-text id): identical towers give the
    same key, any difference that can change a prototype another."""
    if model not in _fingerprints:
        h = hashlib.sha256()
        for name, module in model.named_children():
            if name != "visual":
                h.update(f"{name}\0{module!r}\0".encode())
        settings = {key: value for key, value in vars(model).items()
                    if not key.startswith("_") and isinstance(value, (int, float, str, bool, type(None)))}
        h.update(repr(sorted(settings.items())).encode())
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, tensor in sorted(tensors.items()):
            if name.startswith("visual."):
                continue
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        _fingerprints[model] = h.hexdigest()
    return _fingerprints[model]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEARL_CACHE", Path.home() / ".cache" / "pearl")) / "text"


PROMPTS_PER_FORWARD = 1024


@torch.no_grad()
def _encode(model, tokenizer, queries: Sequence[str], device: torch.device, templates: Sequence[str]
            ) -> torch.Tensor:
    """[Q, D] unit prototypes: per query, L2-normalise each template embedding, mean, normalise.

    Every query × template prompt is encoded in batches of ``PROMPTS_PER_FORWARD`` (a 150-class
    vocabulary is 12,000 prompts: 12 forwards, not 150), with a progress bar on a terminal.
    """
    prompts = [template.format(query) for query in queries for template in templates]
    chunks = range(0, len(prompts), PROMPTS_PER_FORWARD)
    feats = []
    for start in tqdm(chunks, desc="text prototypes", unit="batch", disable=None if len(chunks) > 1 else True,
                      leave=False):
        batch = model.encode_text(tokenizer(prompts[start:start + PROMPTS_PER_FORWARD]).to(device))
        feats.append(batch / batch.norm(dim=-1, keepdim=True))
    mean = torch.cat(feats).reshape(len(queries), len(templates), -1).mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def _read_cache(path: Path, num_queries: int, width: int | None) -> torch.Tensor | None:
    """The cached [Q, D] prototypes, or None after warning about and deleting a file that is not
    one: unreadable, not a [Q, D] tensor, D not the model's embedding width, or not finite."""
    try:
        protos = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(protos, torch.Tensor) and protos.ndim == 2 and protos.shape[0] == num_queries
                and width in (None, protos.shape[1])):
            problem = (f"holds {type(protos).__name__} {tuple(getattr(protos, 'shape', ()))}, not "
                       f"[{num_queries}, {width or 'D'}]")
        elif not torch.isfinite(protos).all():
            problem = "holds NaN or infinite values"
        else:
            return protos
    except Exception as error:  # any unreadable file is rebuilt; what was wrong goes into the warning
        problem = f"could not be read ({type(error).__name__}: {str(error)[:120]})"
    warnings.warn(f"text-prototype cache {path} {problem}; deleted it and encoding the prompts again",
                  RuntimeWarning, stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def _embedding_width(model) -> int | None:
    """D of the joint embedding (the image tower's output width), where the model states it."""
    width = getattr(getattr(model, "visual", None), "output_dim", None)
    return width if isinstance(width, int) else None


def prototype_key(model, tokenizer, queries: Sequence[str], templates: Sequence[str]) -> str:
    """The cache key of the prototypes: the text tower (:func:`model_fingerprint`), its dtype and the
    tokens of every prompt, so that any tokenizer (vocabulary, context length, lower-casing)
    that tokenizes these prompts differently gets its own key; the queries and templates
    themselves too."""
    dtype = str(model.text_projection.dtype) if hasattr(model, "text_projection") else ""
    digest = hashlib.sha256()
    for part in (model_fingerprint(model), dtype, type(tokenizer).__qualname__, *queries, "\x01", *templates,
                 _token_digest(tokenizer, tuple(queries), tuple(templates))):
        digest.update(part.encode() + b"\x00")
    return digest.hexdigest()


_token_digests: "weakref.WeakKeyDictionary[object, dict[tuple, str]]" = weakref.WeakKeyDictionary()


def _token_digest(tokenizer, queries: tuple[str, ...], templates: tuple[str, ...]) -> str:
    """Hash of the tokens of every query × template prompt, made once per tokenizer and vocabulary
    in a process (several Segmentors of a sweep share them; a large vocabulary is 68,000 prompts)."""
    try:
        known = _token_digests.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: tokenize every time
        known = {}
    if (queries, templates) not in known:
        tokens = tokenizer([template.format(query) for query in queries for template in templates])
        digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
        digest.update(tokens.contiguous().cpu().numpy().tobytes())
        known[(queries, templates)] = digest.hexdigest()
    return known[(queries, templates)]


def text_prototypes(model, tokenizer, queries: Sequence[str], device: torch.device,
                    cache_dir: str | os.PathLike | None = None, templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """[Q, D] prototypes in the text tower's dtype, cached in memory and on disk.

    The key is :func:`prototype_key`: everything that makes the prototypes. A cache file that is
    not finite [Q, D] prototypes is named in a warning, deleted and rebuilt. ``cache_dir=""``
    disables the disk cache; None uses ``$PEARL_CACHE/text`` (default ``~/.cache/pearl/text``).
    """
    key = prototype_key(model, tokenizer, queries, templates)
    if key not in _memory_cache:
        folder = None if cache_dir == "" else Path(cache_dir) if cache_dir else default_cache_dir()
        path = folder / f"{key}.pt" if folder else None
        cached = (_read_cache(path, len(queries), _embedding_width(model)) if path is not None and path.is_file()
                  else None)
        if cached is not None:
            _memory_cache[key] = cached
        else:
            protos = _encode(model, tokenizer, queries, device, templates).cpu()
            if not torch.isfinite(protos).all():
                raise FloatingPointError(f"the text tower gave NaN or infinite prototypes for {len(queries)} queries "
                                         f"(model dtype {_dtype_of(model)}): check the weights, or use fp32")
            if path is not None:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(protos, tmp)
                os.replace(tmp, path)
            _memory_cache[key] = protos
    return _memory_cache[key].to(device)


def _dtype_of(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")
