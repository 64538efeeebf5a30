"""Journal-friendly logging and the sd_notify protocol over a real Unix socket."""

from __future__ import annotations

import io
import logging
import logging.config
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from campaignd.logs import JournalFormatter, log_config
from campaignd.systemd import Notifier, watchdog_interval


def _emit(config: dict[str, object], level: int, message: str) -> str:
    stream = io.StringIO()
    config["handlers"]["stderr"]["stream"] = stream  # type: ignore[index]
    logging.config.dictConfig(config)
    logging.getLogger("campaignd.test").log(level, message)
    return stream.getvalue()


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
    ],
)
def test_journal_lines_carry_their_priority_and_no_timestamp(level: int, prefix: str) -> None:
    line = _emit(log_config("DEBUG", journal=True), level, "sent cold/01-intro to a@example.com")
    assert line == f"{prefix}campaignd.test: sent cold/01-intro to a@example.com\n"


def test_terminal_lines_have_a_readable_timestamp() -> None:
    line = _emit(log_config("INFO", journal=False), logging.INFO, "hello")
    date, time, level, rest = line.split(maxsplit=3)
    assert len(date) == 10 and date[4] == "-" and len(time) == 8 and time[2] == ":"
    assert level == "INFO" and rest == "campaignd.test: hello\n"


def test_level_filters_debug() -> None:
    assert _emit(log_config("INFO", journal=True), logging.DEBUG, "noise") == ""


def test_every_line_of_a_multi_line_message_is_prefixed() -> None:
    record = logging.LogRecord("campaignd", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert JournalFormatter("%(message)s").format(record) == "<3>a\n<3>b"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(2)
        yield sock


def test_notifier_speaks_the_protocol(notify_socket: socket.socket, tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "notify"))
    notifier.ready("started")
    notifier.status("sent 3")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    got = [notify_socket.recv(4096).decode() for _ in range(5)]
    assert got[0] == "READY=1\nSTATUS=started"
    assert got[1] == "STATUS=sent 3"
    assert got[2] == "WATCHDOG=1"
    assert got[3].startswith("RELOADING=1\nMONOTONIC_USEC=") and got[3].split("=")[-1].isdigit()
    assert got[4] == "STOPPING=1"


def test_notifier_without_a_socket_does_nothing() -> None:
    notifier = Notifier("")
    assert not notifier.enabled
    notifier.ready()  # no error


def test_abstract_socket_names_are_supported() -> None:
    name = f"campaignd-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier("@" + name).ready()
        assert sock.recv(100) == b"READY=1"


def test_watchdog_interval_is_half_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "180000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 90.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() is None
