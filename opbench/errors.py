"""Errors the CLI turns into one-line messages (exit 2) instead of tracebacks."""


class UsageError(Exception):
    """Bad command-line input: unknown op or backend, bad regex, unreadable file, ..."""
