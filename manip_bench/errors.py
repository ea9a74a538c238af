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


def one_line(error):
    """The message of ``error`` on one line (runs of white space, newlines included, as one space)."""
    return " ".join(str(error).split())


def command(function, *args):
    """Run a command-line entry point and return its exit status.

    The one error handling of ``manip-bench`` and of the scripts in ``benchmarks/``: a
    :class:`ManipBenchError` (bad input) becomes one line on standard error and status 2;
    Ctrl-C, a short note and status 130. Anything else is a bug and keeps its traceback.
    """
    import sys
    try:
        function(*args)
    except ManipBenchError as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr, flush=True)
        return 130
    return 0
