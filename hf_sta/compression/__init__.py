"""Compress a multi-task model for the edge: keep the tasks a device needs, prune heads / FFN neurons / layers by
the kept tasks' group importance, write a smaller stock-transformers checkpoint (``STAMerger.compress``)."""

from .api import (
    COMPRESSION_RECORD,
    CompressionConfig,
    CompressionResult,
    CompressMixin,
    compress_model,
    save_compressed,
)
from .architecture import SUPPORTED_MODEL_TYPES, ParameterBudget, Widths, architecture_spec, non_embedding_parameters
from .scoring import StructureScores, TaskHead, fuse, structure_scores

__all__ = [
    "COMPRESSION_RECORD",
    "SUPPORTED_MODEL_TYPES",
    "CompressMixin",
    "CompressionConfig",
    "CompressionResult",
    "ParameterBudget",
    "StructureScores",
    "TaskHead",
    "Widths",
    "architecture_spec",
    "compress_model",
    "fuse",
    "non_embedding_parameters",
    "save_compressed",
    "structure_scores",
]
