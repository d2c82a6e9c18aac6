"""The koopkit exception hierarchy: the library raises these, only the CLI prints them."""

__all__ = [
    "KoopkitError",
    "StoreError",
    "NotAStoreError",
    "FormatVersionError",
    "ValidationError",
    "RunNotFoundError",
    "InvalidRunIdError",
    "InvalidTagError",
    "RunLockedError",
    "RunExistsError",
    "WriteFailedError",
    "ShapeChangedError",
    "ImportFailedError",
    "PluginError",
    "UnknownNameError",
    "DuplicateNameError",
    "EstimationError",
    "InsufficientDataError",
    "NonFiniteDataError",
    "SelectionError",
    "KoopkitWarning",
    "NonFiniteSnapshotWarning",
    "VersionMismatchWarning",
]


class KoopkitError(Exception):
    """Raised for any problem koopkit reports to a user; the root of the hierarchy."""


class StoreError(KoopkitError):
    """Raised when a trajectory store cannot be opened, read or written."""


class NotAStoreError(StoreError, FileNotFoundError):
    """Raised when a path or URL does not hold a koopkit trajectory store."""


class FormatVersionError(StoreError, ValueError):
    """Raised when a store was written in a format version this koopkit cannot read."""


class ValidationError(StoreError, ValueError):
    """Raised when a store or a node's metadata violates the format; carries every reason."""

    def __init__(self, reasons):
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


class RunNotFoundError(StoreError, KeyError):
    """Raised when a run id is not present in a store."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class InvalidRunIdError(StoreError, ValueError):
    """Raised when a run id could escape the store or is not a plain relative name."""


class InvalidTagError(StoreError, ValueError):
    """Raised when a tag could not be stored as the run schema requires (a JSON scalar)."""


class RunLockedError(StoreError):
    """Raised when another live writer holds the run."""


class RunExistsError(StoreError):
    """Raised when a run already holds data and resuming was not asked for."""


class WriteFailedError(StoreError, OSError):
    """Raised when the store refuses a write (disk full, read-only, I/O error)."""


class ShapeChangedError(KoopkitError, ValueError):
    """Raised when the recorded tensors change shape or set in the middle of a run."""


class ImportFailedError(KoopkitError, ValueError):
    """Raised when existing data (npy, torch checkpoints) cannot be brought into a store."""


class PluginError(KoopkitError):
    """Raised when a plugin misbehaves while registering or running."""


class UnknownNameError(PluginError, KeyError):
    """Raised when an estimator, metric or test name is not registered."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(PluginError):
    """Raised when two plugins register the same name."""


class EstimationError(KoopkitError, ValueError):
    """Raised when an estimator cannot produce a spectrum from its input."""


class InsufficientDataError(EstimationError):
    """Raised when there are too few snapshots, runs or replicates for what was asked."""


class NonFiniteDataError(EstimationError):
    """Raised when input data or a result holds NaN or Inf."""


class SelectionError(KoopkitError, ValueError):
    """Raised when a --where/--by selection matches nothing or is malformed."""


class KoopkitWarning(UserWarning):
    """Base class of koopkit warnings."""


class NonFiniteSnapshotWarning(KoopkitWarning):
    """Warned when a recorded snapshot holds NaN or Inf; it is stored and flagged, not dropped."""


class VersionMismatchWarning(KoopkitWarning):
    """Warned when reading an artefact written by another koopkit version."""
