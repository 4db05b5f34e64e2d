"""The one exception type the CLI turns into a single clear message (no traceback)."""
from __future__ import annotations


class TtfscError(Exception):
    """A user-facing error: the message names the node or file and says how to fix it."""
