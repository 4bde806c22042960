"""Errors that users see.

Every problem a user can fix (bad config, missing shards, unreachable services) raises a
:class:`CliplabError` whose message names the problem and says what to do. The CLI prints it
as one line and exits with code 2; nothing else in cliplab prints bare tracebacks for them.
"""


class CliplabError(Exception):
    """A problem the user can fix. The message is one line, shown as-is by the CLI."""


class ConfigError(CliplabError):
    """An invalid experiment or sweep config (unknown key, bad type, bad value)."""


class DataError(CliplabError):
    """Shards are missing, unreadable or empty."""


class ServiceError(CliplabError):
    """A local or remote service (S3, MLflow, Ray) could not be started or reached."""


class TrainingError(CliplabError):
    """A training run failed on its workers after ``train.max_failures`` restarts."""
