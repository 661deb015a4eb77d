"""One exception hierarchy, so the CLI and the service map failures to messages and status codes
in one place each."""


class RankerError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RankerError):
    """A config file or value is invalid; the message names the key and its path."""


class DataError(RankerError):
    """An input data file is unusable; the message names the file and the column."""


class ArtifactError(RankerError):
    """An artifact directory is missing, corrupt or of an incompatible format."""


class RequestError(RankerError):
    """A ranking request is invalid; the message names the field."""


class TrainingError(RankerError):
    """Training cannot go on (for example a non-finite loss); the message names step and task."""


class StoreError(RankerError):
    """The feature store is unreachable, or what it holds is unusable (no current version, a
    corrupt record); the message names the key or the server."""
