"""Errors that end a run, each with the exit code of the draft BIDS Apps execution spec.

Raise one of these anywhere; ``cli.main`` prints its message and exits with its code.
A message says what is wrong, names the file, and says what to do.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_VALIDATION = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_MATCH = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANT_CREATE = 73
EXIT_IO = 74


class BidsAppError(Exception):
    """Base class: an error with an exit code."""

    exit_code = EXIT_FAILURE


class ValidationError(BidsAppError):
    """The raw dataset fails the BIDS validator."""

    exit_code = EXIT_VALIDATION


class UnknownLevelError(BidsAppError):
    exit_code = EXIT_UNKNOWN_LEVEL


class NoMatchError(BidsAppError):
    """The entity filters (labels, filter file) selected no files."""

    exit_code = EXIT_NO_MATCH


class UsageError(BidsAppError):
    exit_code = EXIT_USAGE


class DataError(BidsAppError):
    """An input file exists but its content is wrong (malformed, inconsistent)."""

    exit_code = EXIT_DATA


class MissingInputError(BidsAppError):
    """A required input file is missing."""

    exit_code = EXIT_NO_INPUT


class CantCreateError(BidsAppError):
    """The output (or work/cache) folder cannot be created or written."""

    exit_code = EXIT_CANT_CREATE


class IOFailure(BidsAppError):
    exit_code = EXIT_IO
