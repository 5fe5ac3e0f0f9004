"""Errors a user can cause. The CLI prints these as one line (traceback only with --debug)."""


class SecateursError(Exception):
    """Base for every error caused by input rather than by a bug."""


class ModelSourceError(SecateursError):
    """The model path / hub id / GGUF file cannot be found or read."""


class DataError(SecateursError):
    """Calibration or evaluation text is missing, empty or too short for the request."""


class PlanError(SecateursError):
    """A plan does not match the model it is applied to, or is invalid in itself."""


class ConfigError(SecateursError):
    """A setting is out of range (sparsity outside (0, 1), a target that removes every unit, ...)."""


class OutputExistsError(SecateursError):
    """The output directory exists and is not empty, and --overwrite was not given."""


class OutputError(SecateursError):
    """The output cannot be written (read-only, a mount point, not enough space, an I/O error)."""


class TaskError(SecateursError):
    """An lm-eval task cannot be found, or its dataset cannot be read (offline, not in the local cache)."""


class LossError(SecateursError):
    """A loss came back NaN or infinite; the run stops with its last good checkpoint intact."""


class WorkerError(SecateursError):
    """A data-parallel worker died, timed out or could not join the others (see `distributed`)."""


def one_line(exc: BaseException) -> str:
    """A library's exception as one line (type and message, whitespace collapsed), to wrap in ours."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
