"""User-facing errors.

Every error a user can cause by bad input (a config key, a shard, a manifest, a checkpoint) is
one of these. The CLI prints ``error: <message>`` on one line and exits with status 2, so the
message itself must name the file, field or shard and say what was expected.
"""

import reprlib


class DLMError(Exception):
    """Base class of errors caused by user input rather than by a bug."""


class ConfigError(DLMError):
    """A config file, key, value or CLI override is invalid."""


class DataError(DLMError):
    """An input file, shard or manifest is missing, corrupt or inconsistent with the config."""


class CheckpointError(DLMError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingError(DLMError):
    """Training cannot go on safely (a non-finite loss or gradient): it stopped before writing
    anything non-finite."""


class TrackingError(DLMError):
    """Experiment tracking (MLflow) failed or timed out under `tracking.on_error: fail`."""


_CLIP = reprlib.Repr()
_CLIP.maxlevel, _CLIP.maxlist, _CLIP.maxtuple, _CLIP.maxdict = 2, 4, 4, 4
_CLIP.maxstring, _CLIP.maxother = 60, 60


def clip(value: object, limit: int = 80, quote: bool = True) -> str:
    """`repr(value)` (or `str` for `quote=False`) cut to about `limit` characters, in time
    bounded by the cut: nested containers are summarised, never fully rendered, so quoting a
    value built by a YAML alias bomb is as fast and short as quoting a number."""
    text = value if isinstance(value, str) and not quote else _CLIP.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
