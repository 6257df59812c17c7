"""The app as a real server for tests: ``python app.py`` in a subprocess on a free port, with
a temporary models folder holding the tiny offline SDXL pipeline (tests/families.py) as a
local model, and a temporary outputs folder. Driven through ``gradio_client`` and a browser."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-sdxl"                     # the local folder's name inside the models directory
# A fast, valid job for the tiny pipeline (32 px: 4x4 latents; 2 steps).
TINY_JOB = {"model": MODEL, "width": 32, "height": 32, "steps": 2, "seed": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """``python app.py`` on a free port; ``url``, ``pid``, ``rss()``, ``log()``, ``stop()``."""

    def __init__(self, root: Path, tiny_sdxl: Path, *, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.models = root / "models"
        self.outputs = root / "outputs"
        self.models.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_sdxl, self.models / MODEL)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = root / "server.log"
        extra_env = env
        env = {**os.environ, "LOWVRAM_MODELS_DIR": str(self.models), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               # One compute thread: on a shared 2-core machine, OpenMP threads that spin-wait
               # for a busy core make tiny runs a hundred times slower.
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.update(extra_env or {})
        env.pop("GRADIO_SERVER_NAME", None)
        env.pop("GRADIO_SERVER_PORT", None)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--model", MODEL,
             "--outputs", str(self.outputs), "-v", *extra_args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)  # polling for the server to listen
        raise TimeoutError(f"the app did not start within {timeout} s:\n{self.log()}")

    def rss(self) -> int:
        """The server process's resident set, bytes."""
        return psutil.Process(self.pid).memory_info().rss

    def log(self, tail: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition()`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
