"""The one exception type for problems a user can cause and fix."""


class OnnxObsError(Exception):
    """A user-facing error: its message is one line saying what is wrong and how to fix it."""
