"""The one exception type for problems a user can cause and fix."""


class OnnxObsError(Exception):
    """A user-facing error: its message is one line saying what is wrong and how to fix it."""


def first_line(e: Exception) -> str:
    """The first non-blank line of an exception's message (at most 300 characters), or its type
    name: what a one-line message quotes of an error from a library."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__
