"""Exceptions medshield raises on bad input: a clear message, never a torch traceback."""


class MedshieldError(Exception):
    """Base class of every error medshield raises on purpose."""

    exit_code = 2
    """The command line's exit status for this error: 2 for bad input."""


class DataError(MedshieldError, ValueError):
    """Missing, corrupt or malformed data (files, splits, image arrays)."""


class InputError(MedshieldError, ValueError):
    """A tensor or text given to a model or attack that breaks the input conventions."""


class ConfigError(MedshieldError, ValueError):
    """An invalid configuration file or override."""


class UnknownNameError(MedshieldError, KeyError):
    """A name that is not in a registry (model backend, attack, method, defense, judge)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsafeFileError(MedshieldError, ValueError):
    """A file that could only be loaded with pickle, which medshield refuses."""


class NonFiniteError(MedshieldError, ArithmeticError):
    """A NaN or infinite training loss or model output: training diverged."""


class NothingMeasured(MedshieldError):
    """A run in which every group was skipped or every row failed: there is no result."""

    exit_code = 1
