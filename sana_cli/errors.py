"""Exceptions that carry their exit code, so every layer can fail with the right answer for scripts."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # generation failed at run time
EXIT_USAGE = 2  # bad usage or input
EXIT_PARTIAL = 3  # a batch finished but some rows failed
EXIT_ENVIRONMENT = 4  # no CUDA, model missing / not cached while offline, missing dependency
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class SanaError(Exception):
    """Base class: a one-line message for stderr, an optional hint, and an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details  # extra fields for the --json error object

    def line(self) -> str:
        """The single line printed on stderr."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __str__(self) -> str:
        return self.line()


class UsageError(SanaError):
    """The user asked for something invalid (options, sizes, batch rows, paths)."""

    exit_code = EXIT_USAGE


class GenerationError(SanaError):
    """Generation failed at run time (out of memory after every fallback, NaNs, write failure)."""

    exit_code = EXIT_FAILED


class EnvironmentProblem(SanaError):
    """The machine cannot run this: no CUDA, model not found or not cached offline, missing package."""

    exit_code = EXIT_ENVIRONMENT


class PartialFailure(SanaError):
    """A batch ran to the end but some rows failed."""

    exit_code = EXIT_PARTIAL


class Interrupted(SanaError):
    """SIGINT or SIGTERM stopped the run after cleaning up."""

    def __init__(self, message: str, *, signal_number: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
