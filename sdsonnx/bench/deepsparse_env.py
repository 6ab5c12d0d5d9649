"""The DeepSparse 1.8.0 virtual environment: find it, create it, and run the worker in it.

DeepSparse 1.8.0 needs numpy<2 and onnx<1.15, so it lives in its own venv (default `.venv-deepsparse` at the
repository root, or $SDSONNX_DEEPSPARSE_PYTHON naming its python). One-liner that creates it:

    python3.11 -m venv .venv-deepsparse && .venv-deepsparse/bin/pip install deepsparse==1.8.0 onnxruntime

(also `make deepsparse` or `sdsonnx bench --setup-deepsparse`). DeepSparse's Community licence allows
evaluation, development and testing only.
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)

VENV_NAME = ".venv-deepsparse"
PACKAGES = ("deepsparse==1.8.0", "onnxruntime")
ENV_VAR = "SDSONNX_DEEPSPARSE_PYTHON"
WORKER_TIMEOUT_S = 3600.0  # one worker run (compile + time one case); a hung worker is killed after this
PROBE_TIMEOUT_S = 300.0  # `import deepsparse` in the venv
TIMED_OUT = 124  # WorkerRun.returncode of a worker killed at its timeout
WORKER = Path(__file__).with_name("deepsparse_worker.py")
SETUP_HINT = (f"python3.11 -m venv {VENV_NAME} && {VENV_NAME}/bin/pip install {' '.join(PACKAGES)}"
              "  (or: sdsonnx bench --setup-deepsparse, or: make deepsparse)")


class DeepSparseUnavailable(InputError, RuntimeError):
    """No usable DeepSparse venv."""


@dataclass(frozen=True)
class WorkerRun:
    """Outcome of one worker process: exit code and the tail of its stderr."""

    returncode: int
    stderr_tail: str

    @property
    def crashed(self) -> bool:
        return self.returncode not in (0, 3)

    @property
    def timed_out(self) -> bool:
        return self.returncode == TIMED_OUT


def default_venv() -> Path:
    """<repository root>/.venv-deepsparse when sdsonnx runs from a checkout, else ./.venv-deepsparse."""
    root = Path(__file__).resolve().parents[2]
    return root / VENV_NAME if (root / "pyproject.toml").is_file() else Path.cwd() / VENV_NAME


def worker_env() -> dict[str, str]:
    """Environment for the DeepSparse process: no analytics lookup, no inherited PYTHONPATH of the core venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["NM_DISABLE_ANALYTICS"] = "1"
    return env


def find_deepsparse_python(venv: Path | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> Path:
    """Python of a venv where `import deepsparse` works; raises DeepSparseUnavailable with the set-up one-liner
    (also when the probe does not finish within timeout_s)."""
    configured = os.environ.get(ENV_VAR)
    python = Path(configured) if configured else (venv or default_venv()) / "bin" / "python"
    if not python.exists():
        raise DeepSparseUnavailable(f"DeepSparse not found ({python} missing). Create its venv: {SETUP_HINT}")
    try:
        probe = subprocess.run([str(python), "-c", "import deepsparse, numpy; print(deepsparse.__version__, numpy.__version__)"],
                               capture_output=True, text=True, env=worker_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeepSparseUnavailable(f"{python} did not finish `import deepsparse` within {timeout_s:.0f} s. "
                                    f"Recreate its venv: {SETUP_HINT}") from None
    if probe.returncode != 0 or len(probe.stdout.split()) < 2:
        tail = probe.stderr.strip().splitlines()[-1:] or ["?"]
        raise DeepSparseUnavailable(f"{python} cannot import deepsparse ({tail[0]}). Recreate its venv: {SETUP_HINT}")
    version, numpy_version = probe.stdout.split()[-2:]
    if int(numpy_version.split(".")[0]) >= 2:
        raise DeepSparseUnavailable(f"{python} has numpy {numpy_version}: DeepSparse 1.8.0 returns wrong numbers "
                                    f"under numpy 2. Recreate its venv: {SETUP_HINT}")
    log.debug("DeepSparse %s at %s", version, python)
    return python


def setup_deepsparse(venv: Path | None = None, base_python: str = "python3.11") -> Path:
    """Create the DeepSparse venv (if missing) and install deepsparse 1.8.0 + onnxruntime; returns its python."""
    venv = venv or default_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        log.info("creating %s with %s", venv, base_python)
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    log.info("installing %s into %s (about 30 s, ~470 MB)", " ".join(PACKAGES), venv)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True, env=worker_env())
    return find_deepsparse_python(venv)


def run_worker(python: Path, job: Path, result: Path, timeout_s: float = WORKER_TIMEOUT_S) -> WorkerRun:
    """Run deepsparse_worker.py JOB RESULT in the DeepSparse venv; a native crash is returned, never raised.

    A worker still running after timeout_s is killed (subprocess.run kills it) and returned with exit TIMED_OUT."""
    try:
        proc = subprocess.run([str(python), str(WORKER), str(job), str(result)], capture_output=True, text=True,
                              env=worker_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return WorkerRun(TIMED_OUT, f"timed out after {timeout_s:g} s")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith("[")]
    for line in lines:
        if line.startswith("compiled"):
            log.info("deepsparse: %s", line)
    keep = [ln for ln in lines if "Assertion at" in ln] + lines[-15:]
    return WorkerRun(proc.returncode, "\n".join(keep))


def crash_summary(run: WorkerRun) -> str:
    """One line for a crashed worker: the native assertion if there is one, else the last stderr line."""
    for line in run.stderr_tail.splitlines():
        if "Assertion at" in line or "Error" in line:
            return f"DeepSparse worker died (exit {run.returncode}): {line.strip()}"
    last = run.stderr_tail.splitlines()[-1:] or [""]
    return f"DeepSparse worker died (exit {run.returncode}): {last[0].strip()}"
