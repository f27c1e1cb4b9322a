"""One-line errors for users: every stage's entry point runs through `stage_main`."""
import functools
import re
import sys


class PipelineError(Exception):
    """A problem the user can fix (bad param, bad file): reported as one line, exit 2."""


def _out_of_memory(err: BaseException) -> str | None:
    """A one-line hint for running out of memory, or None if `err` is something else.

    torch is looked up, not imported: stages that never load it (report) stay quick.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        tried = re.search(r"Tried to allocate [^.]*\.?\d*\s*\w+", str(err))
        detail = f" ({tried.group(0)})" if tried else ""
        return (f"CUDA out of memory{detail}; lower the batch size (train.<run>.batch_size, "
                f"embed.batch_size) or set train.<run>.device: cpu")
    if isinstance(err, MemoryError):
        return "out of memory; lower data.<study>.limit or data.<study>.image_size, or use a machine with more RAM"
    return None


def stage_main(func):
    """Run a stage entry point; turn PipelineError (and out-of-memory) into `error: <message>`, exit 2."""

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
        except (MemoryError, RuntimeError) as err:
            message = _out_of_memory(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper
