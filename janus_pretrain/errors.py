"""The one exception type for mistakes a user can fix (bad config, missing file, mismatched data).

The CLI prints these as a single line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class JanusError(Exception):
    """A user-facing error: the message alone must say what is wrong and where."""
