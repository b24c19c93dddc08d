"""The user-facing error type: the bottom of the house, so that every layer may raise it."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us: the command line prints it as one line, no traceback."""
