"""hf_sta: Selective Task Arithmetic for Hugging Face models and PEFT adapters.

The public names are loaded on first use (PEP 562 module ``__getattr__``): ``import hf_sta`` and ``hf-sta --help``
import neither torch nor transformers; ``from hf_sta import STAMerger`` imports what the merger needs, then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, HfStaError

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access)
_LAZY_ATTRIBUTES: dict[str, str] = {
    "STAMerger": "merger",
    "ForgettingCurve": "merger",
    "MergeConfig": "config",
    "TaskVector": "task_vector",
    "STAMergeCallback": "callback",
    "get_merge_method": "methods",
    "list_merge_methods": "methods",
    "register_merge_method": "methods",
    "reestimate_batchnorm": "statistics",
}

__all__ = [
    "STAMerger",
    "STAMergeCallback",
    "ForgettingCurve",
    "MergeConfig",
    "TaskVector",
    "CheckpointError",
    "ConfigError",
    "HfStaError",
    "get_merge_method",
    "list_merge_methods",
    "register_merge_method",
    "reestimate_batchnorm",
    "__version__",
]

if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from .callback import STAMergeCallback
    from .config import MergeConfig
    from .merger import ForgettingCurve, STAMerger
    from .methods import get_merge_method, list_merge_methods, register_merge_method
    from .statistics import reestimate_batchnorm
    from .task_vector import TaskVector


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access and cache the attribute in this module."""
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_sta' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
