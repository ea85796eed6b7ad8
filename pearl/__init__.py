"""pearl-ovss: training-free open-vocabulary semantic segmentation with a frozen CLIP.

Public API (docs/api.md): ``load_clip``, ``Segmentor``, ``protocol``, ``class_names``.
"""
from .backbone import load_clip
from .benchmarks import DATASETS
from .methods import available_methods
from .params import PARAMS
from .protocols import PROFILES, class_file, class_names, protocol
from .segmentor import Prediction, Segmentor

__version__ = "0.1.0"
__all__ = ["load_clip", "Segmentor", "Prediction", "protocol", "class_names", "class_file", "available_methods",
           "PARAMS", "DATASETS", "PROFILES", "__version__"]
