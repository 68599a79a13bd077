"""User-facing errors.

Every error a user can cause by bad input (a config key, a shard, a manifest, a checkpoint) is
one of these. The CLI prints ``error: <message>`` on one line and exits with status 2, so the
message itself must name the file, field or shard and say what was expected.
"""


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
