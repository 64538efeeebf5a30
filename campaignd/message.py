"""Message: the exact bytes that go to the SMTP server for one touch.

Owns the MIME structure (``multipart/alternative``: plain text, then HTML), every header
(From with display name, To, Reply-To, Subject, Date, a Message-ID on the sender's
domain, RFC 8058 one-click unsubscribe), and folding anything a lead could use to inject
a header. Pure: no I/O, and the date is passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from campaignd.config import Sender
from campaignd.render import Rendered
from campaignd.unsubscribe import Links

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Fold long headers only past RFC 5322's hard limit: the default 78 would turn the long
# words of List-Unsubscribe (URLs with a token) into RFC 2047 encoded words, which no
# mail client can follow.
POLICY = SMTP.clone(max_line_length=998)


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str
    recipient: str
    message_id: str


def safe_header_text(value: str) -> str:
    """Fold CR, LF, NUL and other control characters to single spaces."""
    return _CONTROL.sub(" ", value).strip()


def message_id(*, touch_id: int, lead_id: int, sender: Sender) -> str:
    """A stable Message-ID per touch: a resend after ``touches retry`` keeps the same one,
    so receiving servers can recognise it."""
    domain = sender.from_address.rpartition("@")[2] or "localhost"
    return f"<campaignd.{touch_id}.{lead_id}@{domain}>"


def _address(name: str, addr: str) -> Address:
    local, _, domain = addr.rpartition("@")
    return Address(display_name=safe_header_text(name), username=local, domain=domain)


def build_email(
    rendered: Rendered,
    *,
    sender: Sender,
    to_name: str,
    to_address: str,
    msg_id: str,
    date: datetime,
    links: Links,
    step_label: str,
) -> bytes:
    """The complete message as bytes, ready for ``DATA``."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _address(sender.from_name, sender.from_address)
    msg["To"] = _address(to_name, to_address)
    if sender.reply_to:
        msg["Reply-To"] = _address(sender.from_name, sender.reply_to)
    msg["Subject"] = safe_header_text(rendered.subject)
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = msg_id
    msg["List-Unsubscribe"] = links.header()
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["X-Campaignd-Step"] = safe_header_text(step_label)
    msg.set_content(rendered.text, subtype="plain", charset="utf-8")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8")
    return msg.as_bytes(policy=POLICY)
