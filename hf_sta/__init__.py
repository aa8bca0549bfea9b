"""hf_sta: Selective Task Arithmetic for Hugging Face models and PEFT adapters."""

from .config import MergeConfig
from .errors import CheckpointError, ConfigError, HfStaError
from .merger import STAMerger
from .methods import get_merge_method, list_merge_methods, register_merge_method
from .statistics import reestimate_batchnorm
from .task_vector import TaskVector

__version__ = "0.1.0"

__all__ = [
    "STAMerger",
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
