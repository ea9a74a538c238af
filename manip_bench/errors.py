"""The one exception type users see, and the one way it names an unknown registry name."""
import difflib


class ManipBenchError(Exception):
    """A user-facing error: the message says what went wrong and what to do.

    The CLI prints it as one line and exits with status 2; anything else is a bug.
    """


def unknown_name(kind, name, available):
    """The error for ``name`` missing from a registry of ``kind`` (attributor, loss, model):
    the closest of ``available``, if one is close, and all of them."""
    available = sorted(available)
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ManipBenchError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(available)}")
