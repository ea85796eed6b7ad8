"""pearl-ovss: training-free open-vocabulary semantic segmentation with a frozen CLIP.

Public API (docs/api.md): ``load_clip``, ``Segmentor``, ``protocol``, ``class_names``.

The model-side names are imported on first use (PEP 562), so that the report layer
(``pearl.tables``, ``pearl.figures``, ``pearl.records``) reads records without importing torch,
open_clip or OpenCV.
"""
from importlib import import_module

from .benchmarks import DATASETS
from .params import PARAMS
from .protocols import PROFILES, class_file, class_names, protocol

__version__ = "0.1.0"
__all__ = ["load_clip", "load_vfm", "Segmentor", "Prediction", "protocol", "class_names", "class_file",
           "available_methods", "PARAMS", "DATASETS", "PROFILES", "__version__"]

_ON_FIRST_USE = {"load_clip": ".loading", "Segmentor": ".segmentor", "Prediction": ".decision",
                 "available_methods": ".methods", "load_vfm": ".vfm"}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        value = getattr(import_module(_ON_FIRST_USE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pearl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))
