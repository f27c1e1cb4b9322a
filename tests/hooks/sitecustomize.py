"""Test hook, on the PYTHONPATH of every process that a test repository starts (tests/conftest.py).

- IMGCLS_STAGE_LOG: a stage command appends its stage name (`train@mnist`, `report`) to that file
  when it exits, so tests see which stages DVC ran without reading DVC's output.
- IMGCLS_PAUSE_FIFO: the train stage, when it first writes its per-epoch history (the end of
  epoch 1), writes its PID into that FIFO and stops itself (SIGSTOP), so that a test can kill it
  mid-run however fast the machine.
"""
import atexit
import os
import signal
import sys
from pathlib import Path

HISTORY_FILE = os.path.join("live", "plots", "metrics")  # DVCLive's per-epoch history of train@<run>


def _stage() -> str | None:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.parent.name != "stages" or script.suffix != ".py":
        return None
    return script.stem + "".join(f"@{arg}" for arg in sys.argv[1:2])


def _record() -> None:
    stage = _stage()
    if stage is not None:
        with open(os.environ["IMGCLS_STAGE_LOG"], "a") as log:
            log.write(stage + "\n")


def _pause_after_first_epoch(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], str) or HISTORY_FILE not in args[0]:
        return
    if not (_stage() or "").startswith("train@"):
        return
    with open(os.environ.pop("IMGCLS_PAUSE_FIFO"), "w") as fifo:
        fifo.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)


if os.environ.get("IMGCLS_STAGE_LOG"):
    atexit.register(_record)
if os.environ.get("IMGCLS_PAUSE_FIFO"):
    sys.addaudithook(_pause_after_first_epoch)
