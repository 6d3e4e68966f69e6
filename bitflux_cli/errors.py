"""The project's errors: each carries the one line shown to the user and the exit code."""


class BitfluxError(Exception):
    """A failure reported as one line and an exit code (1: runtime error)."""

    exit_code = 1


class UsageError(BitfluxError):
    """Bad flags, config or order of commands (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file that does not validate."""


class MissingArtifactError(UsageError):
    """A stage's input is not in the workdir; the message names the command that makes it."""


class ArtifactError(BitfluxError):
    """An artifact that exists but is truncated, edited or does not match the model."""


class ModelUnavailableError(BitfluxError):
    """The base model cannot be loaded (offline with no local copy)."""


class BusyError(BitfluxError):
    """Another run holds the lock of a workdir stage this run would write (exit 1: retry once it ends)."""
