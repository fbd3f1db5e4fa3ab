"""One small exception hierarchy whose messages are written for the operator.

Each message says what failed, on which object, and what to do. The gRPC layer
maps each class to a status code (ferry.rpc) and the CLI to an exit status.
"""

from __future__ import annotations


def shown(value: str, limit: int = 200) -> str:
    """Echoed input, cut so a message stays readable and fits gRPC metadata."""
    return value if len(value) <= limit else value[:limit] + "..."


def said(e: BaseException) -> str:
    """An exception as a sentence for the operator: an OSError's own words
    (its strerror) without Python's "[Errno N]" prefix."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


class FerryError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class InvalidInput(FerryError):
    """The request, flag, plan or file is wrong; fixing the input fixes it."""

    exit_code = 2


class NotFound(FerryError):
    """A named object (file, transfer, plan, migration) does not exist."""

    exit_code = 2


class AlreadyExists(FerryError):
    """An object with that id exists and differs from what was asked."""

    exit_code = 2


class FailedPrecondition(FerryError):
    """The input is well formed but the system is not in a state to act on it
    (a target too small, a guest the converter does not support)."""

    exit_code = 2


class Unavailable(FerryError):
    """A service or source could not be reached; trying again may work."""


class Cancelled(FerryError):
    """The operation was cancelled by the operator."""


class OperationFailed(FerryError):
    """A job (transfer, conversion, migration) ran and failed."""
