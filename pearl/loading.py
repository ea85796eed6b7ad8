"""open_clip models: weights (tags, files, the offline cache), the device and the precision.

What a loaded model's image tower computes is ``pearl.towers``'; this module only makes the model.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from pathlib import Path

import open_clip
import torch
from open_clip.timm_model import TimmModel

from .checkpoints import check_plain_checkpoint_error, is_torchscript_archive, load_torchscript_weights
from .errors import ConfigError, MissingFileError, WeightsError
from .tiny import TINY_CONFIG, tiny_clip  # noqa: F401 (the loaders' public names)
from .towers import tower_for

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")


_unreachable: dict[tuple, str] = {}  # (name, tag, cache) → the error: a sweep asks the Hub once, not per job


def _hub_file(model_name: str, pretrained: str) -> tuple[str, tuple[str, ...]] | None:
    """(Hub repository, candidate file names) of an open_clip tag, or None for a URL-only tag."""
    hub = (open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("hf_hub", "")
    if not hub:
        return None
    repo, filename = os.path.split(hub)  # 'org/name/' (open_clip's default file names) or 'org/name/file'
    return repo, (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_state(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> str:
    """Where a model's weights would come from, without loading or downloading them: "random",
    "file", "cached", "not cached" (downloaded when the job runs; offline it fails) or "by URL"
    (open_clip fetches the tag from a URL; whether it is cached is not known here)."""
    if pretrained is None:
        return "random"
    if os.path.isfile(pretrained):
        return "file"
    hub = _hub_file(model_name, pretrained)
    if hub is None:
        return "by URL"
    return "cached" if hub_files_cached(*hub, cache_dir) else "not cached"


def hub_files_cached(repo: str, filenames, cache_dir: str | None = None) -> bool:
    """Whether any of ``filenames`` of the Hub repository ``repo`` is in the cache folder."""
    from huggingface_hub import try_to_load_from_cache
    folder = cache_dir or hf_cache_dir()
    return any(isinstance(try_to_load_from_cache(repo, name, cache_dir=folder), str) for name in filenames)


def _offline_help(model_name: str, pretrained: str, cache_dir: str | None) -> str:
    where = cache_dir or hf_cache_dir()
    hub = _hub_file(model_name, pretrained)
    place = (f"place the Hub repository {hub[0]} (file {hub[1][0]}) in the cache folder {where}" if hub
             else f"make the weights reachable from the cache folder {where}")
    return (f"Without network access {place} (on a connected machine run `python -c \"import open_clip; "
            f"open_clip.create_model('{model_name}', pretrained='{pretrained}'); "
            f"open_clip.get_tokenizer('{model_name}')\"` and copy the folder across; "
            f"HF_HUB_CACHE or model.cache_dir point to it), or pass a checkpoint file as pretrained=/path/to/file "
            f"(for ViT-B/16 OpenAI: ViT-B-16.pt, sha256 5806e77c…).")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hub answers a TCP connection within ``timeout_s`` (no request is sent)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _require_reachable_weights(model_name: str, pretrained: str, cache_dir: str | None) -> None:
    """Fail within seconds, once per process, when the weights are neither cached nor downloadable."""
    folder = cache_dir or hf_cache_dir()
    key = (model_name, pretrained, folder)
    if key in _unreachable:
        raise WeightsError(_unreachable[key])
    hub = _hub_file(model_name, pretrained)
    if hub is None:
        return  # a URL-only tag: open_clip's own download reports its errors
    if hub_files_cached(*hub, folder):
        return
    if not hub_reachable():
        _unreachable[key] = (f"weights {model_name}:{pretrained} are not in the cache and the Hub cannot be "
                             f"reached. " + _offline_help(model_name, pretrained, cache_dir))
        raise WeightsError(_unreachable[key])


def load_clip(name: str = "ViT-B-16", pretrained: str | None = "openai", device: str | torch.device = "cpu",
              precision: str = "fp32", cache_dir: str | None = None, quick_gelu: bool | None = None):
    """(model, tokenizer) from open_clip, the model in eval mode (``load_model``, ``load_tokenizer``;
    the tokenizer first: a missing library fails in seconds, before any weights are read)."""
    tokenizer = load_tokenizer(name.replace("/", "-"), cache_dir)
    return load_model(name, pretrained, device, precision, cache_dir, quick_gelu), tokenizer


def load_model(name: str = "ViT-B-16", pretrained: str | None = "openai", device: str | torch.device = "cpu",
               precision: str = "fp32", cache_dir: str | None = None, quick_gelu: bool | None = None):
    """An open_clip model in eval mode.

    ``pretrained``: an open_clip tag, a local checkpoint file (safetensors, state dict or OpenAI's
    TorchScript ``ViT-B-16.pt``), or None for random weights. OpenAI weights are built with
    QuickGELU (a plain ``ViT-B-16`` + ``openai`` would silently use GELU; docs/engineering.md §1.1).
    ``quick_gelu`` forces the activation either way; None decides from the tag or file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    model_name = name.replace("/", "-")
    is_file = pretrained is not None and os.path.isfile(pretrained)
    torchscript = is_file and is_torchscript_archive(pretrained)
    looks_like_path = bool(pretrained) and (os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES))
    if looks_like_path and not is_file:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none for this model"
        raise MissingFileError(f"checkpoint file {pretrained!r} does not exist; give an existing file "
                                f"or an open_clip pretrained tag ({tags})")
    if quick_gelu is None:
        if is_file:
            quick_gelu = torchscript  # OpenAI's own archive: trained with QuickGELU
        elif pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        else:
            quick_gelu = False
    if pretrained and not is_file:
        _require_reachable_weights(model_name, pretrained, cache_dir)
    kwargs = dict(precision=precision, device=device, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
    if torchscript:  # torch.load would unpickle it unrestricted: read the tensors ourselves
        with _without_random_init_warning():  # the weights come next
            model = open_clip.create_model(model_name, pretrained=None, **kwargs)
        load_torchscript_weights(model, pretrained)
    else:
        model = _create_with_weights(model_name, pretrained, is_file, kwargs)
    return model.eval()


def load_tokenizer(model_name: str, cache_dir: str | None = None):
    """The model's own tokenizer (open_clip's ``get_tokenizer``): CLIP's BPE, or a Hugging Face tokenizer
    (SigLIP, SigLIP2), which needs the ``transformers`` library (the ``siglip`` extra) and its files in
    the Hub cache; a one-line error naming what is missing otherwise."""
    try:
        return open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except ImportError as error:
        raise ConfigError(f"the tokenizer of {model_name} needs the Python package {error.name!r}: "
                          f"pip install 'pearl-ovss[siglip]' (docs/architecture.md §2.1)") from None
    except OSError as error:  # transformers' "can't load tokenizer": files neither cached nor downloadable
        source = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_tokenizer_name", "")
        reason = str(error).splitlines()[0][:160].rstrip(".")
        raise WeightsError(f"the tokenizer of {model_name} ({source or 'a Hugging Face tokenizer'}) could not be "
                           f"loaded: {reason}. Without network access run `python -c "
                           f"\"import open_clip; open_clip.get_tokenizer('{model_name}')\"` on a connected machine and "
                           f"copy its Hugging Face cache folder to {cache_dir or hf_cache_dir()} (HF_HUB_CACHE)"
                           ) from None


@contextlib.contextmanager
def _without_random_init_warning():
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _create_with_weights(model_name: str, pretrained: str | None, is_file: bool, kwargs: dict):
    """open_clip's own loading (``torch.load(weights_only=True)`` for a file), errors made ours."""
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, weights_only=True, **kwargs)
    except (RuntimeError, pickle.UnpicklingError) as error:
        refused = check_plain_checkpoint_error(pretrained, error) if is_file else None
        if refused is not None:
            raise refused from None
        if pretrained and not is_file:
            raise WeightsError(f"could not load {model_name!r} weights {pretrained!r}: {error}. "
                               + _offline_help(model_name, pretrained, kwargs["cache_dir"])) from error
        raise


def _timm_model_to_low_precision(model, dtype: torch.dtype) -> None:
    """open_clip's conversion of a model with a timm tower (``_set_model_device_and_precision``): every
    tensor to ``dtype``, then its ``LayerNormFp32`` modules back to fp32."""
    from open_clip.transformer import LayerNormFp32
    model.to(dtype=dtype)
    for module in model.modules():
        if isinstance(module, LayerNormFp32):
            module.float()


def resolve_device(requested: str) -> torch.device:
    """The device ``requested`` names ("auto": CUDA if visible, else the CPU); a ConfigError naming
    it when this machine has none such (a CUDA or MPS device that is not there)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r} but no CUDA device is visible; use device=cpu or device=auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but this machine has no usable MPS (Apple GPU) device; use device=cpu or "
                          "device=auto")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"device={requested!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None


def prepare_model(model, device: str | torch.device, precision: str | None = None):
    """The model moved to ``device`` and, when asked, converted to ``precision`` (in place), in eval mode.

    Lower precision converts conv/linear/attention weights and the projections, as OpenAI's
    ``clip.load`` on GPU and open_clip's ``convert_weights_to_lp`` do; LayerNorms and
    embeddings stay fp32 (docs/protocol.md §7). A model with a timm image tower is converted
    whole, as open_clip's ``create_model`` converts it (only its fp32 LayerNorms stay fp32).
    ``precision`` None keeps the model's own.
    """
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if PRECISIONS[precision] != tower_for(model.visual).dtype:
            if precision == "fp32":
                model = model.float()
            elif isinstance(model.visual, TimmModel):
                _timm_model_to_low_precision(model, PRECISIONS[precision])
            else:
                from open_clip.model import convert_weights_to_lp
                convert_weights_to_lp(model, PRECISIONS[precision])
    return model.to(device).eval()
