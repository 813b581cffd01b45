"""Errors the CLI turns into one-line messages (exit 2) instead of tracebacks."""


class UsageError(Exception):
    """Bad command-line input: unknown op or backend, bad regex, unreadable file, ..."""


class BackendSetupError(Exception):
    """A backend that could not be constructed: the run of that backend stops with one line
    naming the backend and the exception; the other backends still run."""
