"""Errors meant for the user: the GUI and the CLI show their message as is, without a traceback.

Raise one of these only when the message says what was wrong and what to do about it; anything
else is a bug and should surface as an ordinary exception.
"""

from __future__ import annotations


class MedGenError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class InputError(MedGenError):
    """The input volumes, labels or options cannot be used as given."""


class WeightsError(MedGenError):
    """The model weights cannot be found, downloaded, verified or loaded."""


class Cancelled(MedGenError):
    """The user stopped a running job; not a failure."""
