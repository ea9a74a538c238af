"""The one exception type users see."""


class ManipBenchError(Exception):
    """A user-facing error: the message says what went wrong and what to do.

    The CLI prints it as one line and exits with status 2; anything else is a bug.
    """
