"""The shipped systemd unit: verified and hardened, checked with systemd-analyze itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import REPO

UNIT = REPO / "systemd" / "campaignd.service"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(
    ANALYZE is None and not os.environ.get("CI"), reason="systemd-analyze is not installed"
)


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at this environment's campaignd.
    binary = Path(sys.executable).parent / "campaignd"
    assert binary.exists()
    unit = tmp_path / "campaignd.service"
    unit.write_text(UNIT.read_text().replace("/opt/campaignd/bin/campaignd", str(binary)))
    done = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    done = subprocess.run(
        [str(ANALYZE), "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for campaignd.service: ([0-9.]+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout
    assert match.group(2) == "OK"


def test_unit_runs_migrations_first_and_notifies() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert re.search(r"^ExecStartPre=.*campaignd db upgrade$", text, re.M)
    assert re.search(r"^ExecStart=.*campaignd run$", text, re.M)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in text
    assert "EnvironmentFile=-/etc/campaignd/campaignd.env" in text
