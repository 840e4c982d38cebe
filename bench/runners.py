"""Run quantizers as child processes with a timeout, an RSS limit and a peak-RSS measurement.

Every configuration (onnxq, onnxruntime.quantization, NNCF) runs in its own process so a
crash, a hang or an out-of-memory run becomes a row that says so, never an omission.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ONNXQ = REPO / ".venv" / "bin" / "onnxq"
NNCF_PYTHON = REPO / "bench" / ".venv-nncf" / "bin" / "python"
EXPORT_PYTHON = REPO / "bench" / ".venv-export" / "bin" / "python"


@dataclass
class ChildResult:
    """Outcome of one child process."""

    status: str  # ok | failed | timeout | oom
    returncode: int | None
    wall_s: float
    peak_rss_mb: float
    log_tail: str

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return asdict(self)


def _rss_mb(pid: int) -> tuple[float, float]:
    """Current and peak (VmHWM) resident set size of ``pid`` in MB (0 when it is gone)."""
    now = peak = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak


def run_child(cmd: list[str], *, log: Path, timeout_s: float, rss_limit_mb: float,
              env: dict[str, str] | None = None, cwd: Path = REPO) -> ChildResult:
    """Run ``cmd``; kill it past ``timeout_s`` or above ``rss_limit_mb``; measure its peak RSS.

    Peak RSS is the child's VmHWM (high-water mark since its exec), polled every 20 ms; the
    kernel's ``ru_maxrss`` is not used because Linux seeds it with the parent's RSS at fork.
    stdout and stderr go to ``log``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reason: list[str] = []
    peak = [0.0]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=True)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if time.perf_counter() - start > timeout_s:
                reason.append("timeout")
            now, hwm = _rss_mb(proc.pid)
            peak[0] = max(peak[0], hwm)
            if now > rss_limit_mb:
                reason.append("oom")
            if reason:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return
            stop.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status = os.waitpid(proc.pid, 0)
    stop.set()
    watcher.join()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # keep Popen from waiting again
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    if reason:
        state = reason[0]
    elif code == -signal.SIGKILL:
        state = "oom"  # killed by the kernel's OOM killer
    else:
        state = "ok" if code == 0 else "failed"
    return ChildResult(state, code, round(wall, 3), round(peak[0], 1), tail)


def onnxq_cmd(*args: str | Path) -> list[str]:
    """The onnxq CLI of the project venv with ``args``."""
    return [str(ONNXQ), *map(str, args)]


def peer_cmd(*args: str | Path) -> list[str]:
    """A bench.peers child (onnxruntime.quantization) in this interpreter."""
    return [sys.executable, "-m", "bench.peers", *map(str, args)]


def nncf_cmd(*args: str | Path) -> list[str]:
    """The NNCF child script in bench/.venv-nncf."""
    return [str(NNCF_PYTHON), str(REPO / "bench" / "nncf_child.py"), *map(str, args)]


def export_cmd(*args: str | Path, script: str = "export_child.py") -> list[str]:
    """A torch export / tokenizer child script in bench/.venv-export (raises when that venv is missing)."""
    if not EXPORT_PYTHON.exists():
        raise RuntimeError("bench/.venv-export is missing (make bench-deps creates it)")
    return [str(EXPORT_PYTHON), str(REPO / "bench" / script), *map(str, args)]


def nbits_cmd(*args: str | Path) -> tuple[list[str], dict[str, str]]:
    """bench.nbits_child (onnxruntime's matmul_nbits_quantizer) in bench/.venv-export's interpreter (its HQQ
    needs torch) with this venv's onnxruntime on the path; returns the command and its environment."""
    if not EXPORT_PYTHON.exists():
        raise RuntimeError("bench/.venv-export is missing (make bench-deps creates it)")
    import sysconfig

    path = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    return [str(EXPORT_PYTHON), "-m", "bench.nbits_child", *map(str, args)], {**os.environ, "PYTHONPATH": path}
