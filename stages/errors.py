"""One-line errors for users: every stage's entry point runs through `stage_main`."""
import functools
import sys


class PipelineError(Exception):
    """A problem the user can fix (bad param, bad file): reported as one line, exit 2."""


def stage_main(func):
    """Run a stage entry point; turn PipelineError into `error: <message>` and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
