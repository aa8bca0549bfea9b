"""Errors raised at hf_sta's boundaries. Each message names the file, task or tensor at fault."""


class HfStaError(Exception):
    """Base class for hf_sta errors."""


class CheckpointError(HfStaError, ValueError):
    """A checkpoint is missing, unreadable, of another architecture, or holds bad values."""


class ConfigError(HfStaError, ValueError):
    """A configuration field (Python API, YAML recipe or CLI) has a bad value."""


class CalibrationDataError(HfStaError, ValueError):
    """A calibration batch does not fit the model (token ids past the vocabulary, wrong shapes, no loss)."""
