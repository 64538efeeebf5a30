"""Running campaignd as a real process and watching what it logs."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class Daemon:
    """``campaignd run`` in a child process; stderr is collected line by line."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGND_")}
        full_env.pop("JOURNAL_STREAM", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "campaignd", "--config", str(config), "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))

    def _pump(self) -> None:
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def wait_for(self, text: str, timeout: float = 30.0, *, count: int = 1) -> str:
        """Wait until ``count`` log lines contain ``text``; returns the last of them."""
        deadline = time.monotonic() + timeout
        while True:
            self._pump()
            hits = [line for line in self.lines if text in line]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None:
                time.sleep(0.2)
                self._pump()
                hits = [line for line in self.lines if text in line]
                if len(hits) >= count:
                    return hits[count - 1]
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {text!r}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        self._pump()
        return "\n".join(self.lines)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._close()
        return code

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the daemon to exit by itself."""
        code = self.proc.wait(timeout)
        self._close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._pump()
