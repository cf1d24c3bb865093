"""Every error hf-soup raises on purpose.

Each message says what is wrong *and what to do*. The CLI prints one line per error and exits with
`EXIT_CODE` (the traceback is shown only with `HF_SOUP_DEBUG=1`).
"""

from __future__ import annotations

EXIT_CODE = 2


class HfSoupError(Exception):
    """Base class of every hf-soup error."""


class NoCandidatesError(HfSoupError, ValueError):
    """No candidate matched the given patterns, or too few survived the compatibility check."""


class CandidateFormatError(HfSoupError, ValueError):
    """A candidate folder lacks a config or weights, or its weights cannot be read safely."""


class PickleRefusedError(CandidateFormatError):
    """A candidate ships only pickle (`.bin`) weights and `--allow-pickle` was not given."""


class IncompatibleCandidatesError(HfSoupError, ValueError):
    """Candidates differ in architecture, tensor names, shapes or label sets (raised with `--strict`)."""


class NonFiniteWeightsError(HfSoupError, ValueError):
    """A candidate holds NaN or Inf values."""


class DatasetError(HfSoupError, ValueError):
    """The evaluation data cannot be loaded, lacks a column, or has labels the models do not know."""


class OutputExistsError(HfSoupError, FileExistsError):
    """The output folder exists and `--overwrite` was not given."""


class DiskSpaceError(HfSoupError, OSError):
    """The output does not fit on its disk (checked before writing, and on ENOSPC while writing)."""


class ConfigError(HfSoupError, ValueError):
    """Options that contradict each other or have invalid values."""


class DemoError(HfSoupError, RuntimeError):
    """The demo's bundled model or data is missing."""


class HubError(HfSoupError, OSError):
    """The Hub refused or failed a request (not found, private, offline, HTTP error)."""


class ReproduceMismatchError(HfSoupError, ValueError):
    """A rebuilt soup does not match its manifest, or its ingredients cannot be fetched again."""
