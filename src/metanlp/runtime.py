"""Process state, in one place: the environment defaults every entry point sets, and seeded scopes.

Library code never edits `os.environ` or reseeds a global random generator for good: the CLI, the Prefect
flow entry and the tests call `apply_environment_defaults` once; code that must draw from torch's global
generator (dropout and weight initialisation take no generator argument) does so inside `seeded`, which
restores the global state when it ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Offline by default: weights come from the installed package or a local path (export HF_HUB_OFFLINE=0
# to use hub names); no library sends usage data.
ENVIRONMENT_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # Prefect's client (SDK) telemetry and its first-run notice; honoured by other tools too
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}


def apply_environment_defaults(project_root: Path | None = None) -> None:
    """Set the defaults a user has not set. With a project root, Prefect keeps its home, database and
    results in the project's .prefect/ (this must happen before `import prefect`)."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if project_root is not None:
        home = (Path(project_root) / ".prefect").resolve()
        os.environ.setdefault("PREFECT_HOME", str(home))
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # ...but the flow's and tasks' own lines (stage N of 8, tune: trial i of N; printed with log_prints) show
        for logger in ("FLOW_RUNS", "TASK_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{logger}_LEVEL", "INFO")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generators seeded with `seed` inside the block and restored after it."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


LOCK_FILE = ".metanlp.lock"


class ProjectBusy(ValueError):
    """Another metanlp process holds the project: its stages, outputs and registrations are not shared."""


@contextmanager
def project_lock(root: Path, holder: str, wait_seconds: float = 0.0) -> Iterator[None]:
    """Hold the project (one `metanlp run`, stage or promotion at a time): an advisory lock on
    ROOT/.metanlp.lock, released when the block ends or the process dies. Waits up to `wait_seconds`, then
    refuses with who holds it."""
    import fcntl
    import time

    path = Path(root) / LOCK_FILE
    handle = path.open("a+", encoding="utf-8")
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                owner = handle.read().strip() or "another metanlp process"
                handle.close()
                raise ProjectBusy(f"{Path(root).resolve()}: {owner} is using this project; nothing was started; "
                                  f"wait for it to finish (the lock is {path})") from None
            time.sleep(0.2)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    handle.flush()
    try:
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
