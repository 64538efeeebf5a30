"""The SMTP channel against a real SMTP server: what each answer of the relay means."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from aiosmtplib import SMTPResponseException

from campaignd.channels import Outcome, Outgoing
from campaignd.config import Smtp
from campaignd.mailer import SmtpChannel, envelope_address, wire_data
from campaignd.pipelining import Pipelined
from tests.smtp import SmtpServer


@pytest.fixture(params=[True, False], ids=["pipelining", "one-command-at-a-time"])
def smtpd(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """The relay, once offering PIPELINING (MAIL, RCPT and DATA go together) and once not."""
    with SmtpServer(pipelining=request.param) as server:
        yield server


def channel(server: SmtpServer, **settings: object) -> SmtpChannel:
    values: dict[str, object] = {"host": "127.0.0.1", "port": server.port, "tls": "none", "timeout": "2s"}
    values.update(settings)
    return SmtpChannel(settings=Smtp.model_validate(values))


def message(n: int, recipient: str | None = None) -> Outgoing:
    to = recipient or f"lead{n}@example.com"
    data = (
        f"From: a@harborhome.example\r\nTo: {to}\r\nSubject: {n}\r\nMessage-ID: <{n}@x>\r\n\r\nbody {n}\r\n"
    )
    return Outgoing(n, "hello@harborhome.example", to, data.encode(), f"<{n}@x>")


async def send_all(ch: SmtpChannel, messages: list[Outgoing], workers: int = 1) -> list[Outcome]:
    queue = list(messages)
    results: dict[int, Outcome] = {}

    async def work() -> None:
        while queue:
            msg = queue.pop(0)
            results[msg.touch_id] = (await ch.send(msg)).outcome

    await ch.open()
    try:
        await asyncio.gather(*(work() for _ in range(workers)))
    finally:
        await ch.close()
    return [results[m.touch_id] for m in messages]


async def test_messages_go_over_a_few_reused_connections(smtpd: SmtpServer) -> None:
    outcomes = await send_all(channel(smtpd, connections=3), [message(n) for n in range(30)], workers=3)
    assert outcomes == [Outcome.SENT] * 30
    assert sorted(r.recipients[0] for r in smtpd.received) == sorted(
        f"lead{n}@example.com" for n in range(30)
    )
    assert smtpd.connections <= 3


async def test_a_hard_bounce_is_permanent_and_the_connection_goes_on(smtpd: SmtpServer) -> None:
    smtpd.faults.rcpt["gone@example.com"] = "550 5.1.1 no such user"
    outcomes = await send_all(channel(smtpd), [message(1), message(2, "gone@example.com"), message(3)])
    assert outcomes == [Outcome.SENT, Outcome.PERMANENT, Outcome.SENT]
    assert smtpd.connections == 1


@pytest.mark.parametrize(
    ("stage", "answer", "expected"),
    [
        ("rcpt", "452 4.5.3 too many recipients", Outcome.TEMPORARY),
        ("rcpt", "450 4.2.1 rate limited, slow down", Outcome.TEMPORARY),
        ("mail", "451 4.3.0 try again later", Outcome.TEMPORARY),
        ("mail", "553 5.7.1 sender not allowed", Outcome.REJECTED),
        ("data", "451 4.3.0 local error", Outcome.TEMPORARY),
        ("data", "554 5.7.1 message rejected as spam", Outcome.REJECTED),
        ("data", "550 5.1.1 mailbox unknown", Outcome.PERMANENT),
        ("data", "552 5.2.1 mailbox disabled", Outcome.PERMANENT),
    ],
)
async def test_each_refusal_is_classified(
    smtpd: SmtpServer, stage: str, answer: str, expected: Outcome
) -> None:
    getattr(smtpd.faults, f"next_{stage}").append(answer)
    outcomes = await send_all(channel(smtpd), [message(1), message(2)])
    assert outcomes == [expected, Outcome.SENT]
    assert [r.recipients[0] for r in smtpd.received] == ["lead2@example.com"]


async def test_a_421_closes_the_link_and_the_next_message_reconnects(smtpd: SmtpServer) -> None:
    smtpd.faults.next_mail.append("421 4.3.2 service shutting down")
    outcomes = await send_all(channel(smtpd), [message(1), message(2)])
    assert outcomes == [Outcome.TEMPORARY, Outcome.SENT]
    assert smtpd.connections == 2


async def test_a_link_dropped_before_the_data_is_temporary(smtpd: SmtpServer) -> None:
    smtpd.faults.next_rcpt.append("drop")
    outcomes = await send_all(channel(smtpd), [message(1), message(2)])
    assert outcomes == [Outcome.TEMPORARY, Outcome.SENT]
    assert [r.recipients[0] for r in smtpd.received] == ["lead2@example.com"]


async def test_a_link_dropped_after_the_data_is_unknown(smtpd: SmtpServer) -> None:
    smtpd.faults.drop_after_data = 1
    outcomes = await send_all(channel(smtpd), [message(1), message(2)])
    # The server took message 1 but never said so: it must not be retried automatically.
    assert outcomes == [Outcome.UNKNOWN, Outcome.SENT]
    assert len(smtpd.received) == 2


async def test_a_relay_that_stalls_past_the_timeout_leaves_the_message_unknown(smtpd: SmtpServer) -> None:
    smtpd.faults.stall_data = 3
    [outcome] = await send_all(channel(smtpd, timeout="1s"), [message(1)])
    assert outcome == Outcome.UNKNOWN


async def test_a_relay_that_stalls_before_the_data_leaves_the_message_to_retry(smtpd: SmtpServer) -> None:
    smtpd.faults.stall_rcpt = 3
    started = time.monotonic()
    ch = channel(smtpd, timeout="1s")
    delivery = await ch.send(message(1))
    await ch.close()
    assert delivery.outcome == Outcome.TEMPORARY
    assert "did not answer within 1s" in delivery.detail
    assert time.monotonic() - started < 2.5
    assert smtpd.received == []


async def test_the_timeout_bounds_the_whole_exchange_not_each_command(smtpd: SmtpServer) -> None:
    # Each answer comes within the timeout, but all of them together do not.
    smtpd.faults.stall_rcpt = 0.7
    smtpd.faults.stall_data = 0.7
    [outcome] = await send_all(channel(smtpd, timeout="1s"), [message(1)])
    assert outcome == Outcome.UNKNOWN


async def test_a_relay_that_is_down_is_unavailable(smtpd: SmtpServer) -> None:
    port = smtpd.port
    smtpd.stop()
    ch = SmtpChannel(settings=Smtp(host="127.0.0.1", port=port, tls="none", timeout=timedelta(seconds=2)))
    [outcome] = await send_all(ch, [message(1)])
    assert outcome == Outcome.UNAVAILABLE


async def test_a_connection_dropped_while_idle_is_replaced_without_losing_the_message(
    smtpd: SmtpServer,
) -> None:
    ch = channel(smtpd)
    await ch.open()
    assert (await ch.send(message(1))).outcome == Outcome.SENT
    # The relay restarts between two messages: the pooled connection is dead.
    smtpd.stop()
    smtpd.start()
    assert (await ch.send(message(2))).outcome == Outcome.SENT
    await ch.close()
    assert [r.recipients[0] for r in smtpd.received] == ["lead1@example.com", "lead2@example.com"]


async def test_the_rate_limit_spaces_messages(smtpd: SmtpServer) -> None:
    started = time.monotonic()
    outcomes = await send_all(
        channel(smtpd, rate=20, connections=2), [message(n) for n in range(11)], workers=2
    )
    assert outcomes == [Outcome.SENT] * 11
    # 11 messages at 20 per second cannot leave in less than 10 intervals of 50 ms.
    assert time.monotonic() - started >= 0.5


async def test_an_internationalised_domain_goes_out_in_its_ascii_form(smtpd: SmtpServer) -> None:
    assert envelope_address("zoe@exämple.de") == ("zoe@xn--exmple-cua.de", False)
    outcomes = await send_all(channel(smtpd), [message(1, "zoe@exämple.de")])
    assert outcomes == [Outcome.SENT]
    assert smtpd.received[0].recipients == ("zoe@xn--exmple-cua.de",)


async def test_a_non_ascii_mailbox_needs_smtputf8(smtpd: SmtpServer) -> None:
    assert envelope_address("zoë@example.com") == ("zoë@example.com", True)
    outcomes = await send_all(channel(smtpd), [message(1, "zoë@example.com")])
    assert outcomes == [Outcome.REJECTED]


async def test_a_non_ascii_mailbox_goes_out_when_the_relay_offers_smtputf8() -> None:
    # The first message on a fresh connection: the extensions are known before it leaves.
    with SmtpServer(smtputf8=True) as server:
        outcomes = await send_all(channel(server), [message(1, "zoë@example.com"), message(2)])
        assert outcomes == [Outcome.SENT, Outcome.SENT]
        assert server.received[0].recipients == ("zoë@example.com",)
        assert "SMTPUTF8" in [option.upper() for option in server.received[0].mail_options]


async def test_the_message_arrives_byte_for_byte_whatever_its_lines(smtpd: SmtpServer) -> None:
    dotted = b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nlast line"
    bare_lf = b"Subject: lf\n\nunix line\nends\r\nmixed\rold mac\n"
    plain = Outgoing(1, "hello@harborhome.example", "a@example.com", dotted, "<1@x>")
    unix = Outgoing(2, "hello@harborhome.example", "b@example.com", bare_lf, "<2@x>")
    assert await send_all(channel(smtpd), [plain, unix]) == [Outcome.SENT, Outcome.SENT]
    by_rcpt = {r.recipients[0]: r.data for r in smtpd.received}
    assert by_rcpt["a@example.com"] == dotted + b"\r\n"
    assert by_rcpt["b@example.com"] == b"Subject: lf\r\n\r\nunix line\r\nends\r\nmixed\r\nold mac\r\n"


async def test_an_address_that_needs_quoting_goes_through_aiosmtplibs_parsing(smtpd: SmtpServer) -> None:
    outcomes = await send_all(channel(smtpd), [message(1, '"john doe"@example.com')])
    assert outcomes == [Outcome.SENT]
    assert smtpd.received[0].recipients == ('"john doe"@example.com',)


async def test_an_address_that_would_smuggle_a_command_is_refused_and_the_link_goes_on(
    smtpd: SmtpServer,
) -> None:
    outcomes = await send_all(channel(smtpd), [message(1, "a\r\nRSET@example.com"), message(2)])
    assert outcomes == [Outcome.REJECTED, Outcome.SENT]
    assert [r.recipients for r in smtpd.received] == [("lead2@example.com",)]
    assert smtpd.connections == 1


def test_the_wire_form_of_a_message() -> None:
    assert wire_data(b"a\r\nb\r\n") == b"a\r\nb\r\n.\r\n"
    assert wire_data(b"a\r\nb") == b"a\r\nb\r\n.\r\n"
    assert wire_data(b".a\r\n.\r\nb.\r\n") == b"..a\r\n..\r\nb.\r\n.\r\n"
    assert wire_data(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n.\r\n"
    assert wire_data(b"") == b"\r\n.\r\n"
    # Told the lines are CRLF already, it does not look: only dots and the end are done.
    assert wire_data(b".a\r\nb", crlf=True) == b"..a\r\nb\r\n.\r\n"


async def test_with_pipelining_the_envelope_and_data_command_go_in_one_write() -> None:
    # A relay that answers nothing until it has MAIL, RCPT and DATA together: a client
    # that waited for each answer would wait for ever (and time out).
    batches: list[bytes] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 strict.test ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-strict.test\r\n250 PIPELINING\r\n")
        pending = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            pending += chunk
            if pending.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                break
            if pending.startswith(b"MAIL") and pending.endswith(b"DATA\r\n"):
                batches.append(pending)
                pending = b""
                writer.write(b"250 sender ok\r\n250 recipient ok\r\n354 go ahead\r\n")
            elif pending.endswith(b"\r\n.\r\n"):
                pending = b""
                writer.write(b"250 2.0.0 queued\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ch = SmtpChannel(
            settings=Smtp.model_validate({"host": "127.0.0.1", "port": port, "tls": "none", "timeout": "2s"})
        )
        outcomes = await send_all(ch, [message(n) for n in range(3)])
    finally:
        server.close()
        await server.wait_closed()
    assert outcomes == [Outcome.SENT] * 3
    assert [batch.count(b"\r\n") for batch in batches] == [3, 3, 3]
    assert batches[0] == b"MAIL FROM:<hello@harborhome.example>\r\nRCPT TO:<lead0@example.com>\r\nDATA\r\n"


async def test_a_reply_split_across_reads_or_joined_in_one_is_read_in_order() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    pipe = Pipelined(transport)  # type: ignore[arg-type]
    try:
        pipe.data_received(b"250-first line\r\n25")
        pipe.data_received(b"0 second line\r\n354 go\r\n221")
        assert await pipe.reply() == (250, "first line\nsecond line")
        assert await pipe.reply() == (354, "go")
        pipe.data_received(b" bye\r\n")
        assert await pipe.reply() == (221, "bye")
        pipe.data_received(b"not a reply\r\n")
        with pytest.raises(SMTPResponseException, match="malformed"):
            await pipe.reply()
        assert not pipe.usable
    finally:
        pipe.close()
        server.close()
        await server.wait_closed()
