"""The unsubscribe endpoint: a small public HTTP server the daemon runs beside the dispatcher.

Owns the aiohttp application and the :class:`UnsubscribeEndpoint` service:

- ``POST /u/<token>`` unsubscribes at once and answers 200. Mail providers send it with
  ``List-Unsubscribe=One-Click`` (RFC 8058); the confirmation page's button sends it too.
- ``GET /u/<token>`` shows a plain confirmation page with a button and changes nothing:
  link scanners and previews follow links.
- ``GET /health`` tells the operator's monitoring whether the daemon is alive.

The same paths are also served under the path of ``unsubscribe.base_url``
(``/campaignd/u/<token>``), so a reverse proxy may forward with or without its prefix.

It is a public surface and is built like one: bounded request lines, headers and
bodies; no stack traces and no lead data in any answer beyond a masked address; a rate
limit per client address, which is taken from ``X-Forwarded-For`` only when the peer is
a trusted proxy; a forged token changes nothing and costs its sender more of the limit
than a good one. Database work runs in threads and in batches (many requests, one
transaction), so the endpoint keeps answering while a dispatch pass is busy and a burst
of unsubscribes never starves the dispatcher.

Sees the daemon only through :class:`ServiceContext`; imports nothing of the CLI, the
daemon or the dispatcher.
"""

from __future__ import annotations

import asyncio
import errno
import html
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs

from aiohttp import web

from campaignd.config import Settings
from campaignd.exceptions import CampaigndError
from campaignd.services import ServiceContext
from campaignd.store import Store
from campaignd.store.optout import OptOut, OptOutQueries, OptOutTarget
from campaignd.unsubscribe import load_keys, token_lead_id, verify_token

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
"""Largest request body taken: a one-click POST is a few hundred bytes."""
MAX_LINE = 4096
"""Longest request line or header line; a token URL is well under 200 characters."""
MAX_HEADERS = 64
KEEPALIVE = 15.0
SHUTDOWN_TIMEOUT = 5.0
"""How long a stop waits for requests in progress (their opt-outs are recorded first)."""
REFUSED_COST = 10
"""A refused token costs this many requests of its client's rate limit: guessing is slow."""
MAX_CLIENTS = 100_000
"""Clients the rate limiter remembers; the least recently seen are forgotten first."""
WRITE_RETRY = 10.0
"""Seconds to keep retrying a failing write before answering 503 (try again later)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- pure helpers --------------------------------------------------------------------------


def mask_address(email: str) -> str:
    """``maria.gonzalez@lakeview-dental.example`` as ``m***@l***.example``.

    Enough for the reader to recognise their own address, too little for anyone else
    holding the link to learn it.
    """
    local, _, domain = email.partition("@")
    host, dot, tld = domain.rpartition(".")
    if not dot:
        host, tld = domain, ""
    return f"{local[:1]}***@{host[:1]}***" + (f".{tld}" if tld else "")


def _ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The address a request came from.

    That is the peer, unless the peer is a trusted proxy: then it is the right-most
    address in ``X-Forwarded-For`` that is not itself a trusted proxy. Only the proxy's
    own entries can be believed; what a client wrote to the left of them is ignored.

    :param peer: the address of the TCP peer.
    :param forwarded_for: every ``X-Forwarded-For`` header of the request, in order.
    :param trusted: the networks of trusted proxies.
    """
    addr = _ip(peer)
    if addr is None:
        return peer or "unknown"
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    while hops and any(addr in net for net in trusted):
        hop = _ip(hops.pop())
        if hop is None:
            break
        addr = hop
    return str(addr)


def rate_key(client: str) -> str:
    """What the rate limit counts by: the address, or its /64 for IPv6 (one subscriber's share)."""
    addr = _ip(client)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return client


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute, in bursts up to as many.

    Pure: the caller passes the time (monotonic seconds). At most ``max_clients`` clients
    are remembered; the least recently seen are forgotten first, so memory stays bounded
    whatever the number of addresses that call.
    """

    def __init__(self, *, per_minute: int, max_clients: int = MAX_CLIENTS) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` of ``client``'s allowance: 0 when allowed, else the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.pop(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + max(0.0, now - last) * rate)
        wait = 0.0
        if tokens < 1.0:
            wait = (1.0 - tokens) / rate
        else:
            tokens = max(tokens - cost, -float(self.per_minute))
        self._buckets[client] = (tokens, now)  # re-inserted: now the most recently seen
        while len(self._buckets) > self.max_clients:
            del self._buckets[next(iter(self._buckets))]
        return wait

    def charge(self, client: str, now: float, cost: float) -> None:
        """Spend ``cost`` more, allowed or not (a refused token)."""
        if self.per_minute > 0 and client in self._buckets:
            tokens, last = self._buckets[client]
            self._buckets[client] = (max(tokens - cost, -float(self.per_minute)), last)

    def __len__(self) -> int:
        return len(self._buckets)


def request_source(content_type: str, body: bytes) -> str:
    """How an unsubscribe POST arrived, in words kept with the suppression."""
    if content_type == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(body.decode("latin-1"), keep_blank_values=True, max_num_fields=20)
        except ValueError:
            form = {}
        if form.get("source") == ["page"]:
            return "unsubscribe page"
        if "One-Click" in form.get("List-Unsubscribe", []):
            return "one-click (List-Unsubscribe-Post)"
    elif b"List-Unsubscribe" in body and b"One-Click" in body:
        return "one-click (List-Unsubscribe-Post)"
    return "unsubscribe link (POST)"


# -- pages ------------------------------------------------------------------------------------

_STYLE = (
    "body{font:16px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:34rem;"
    "margin:3rem auto;padding:0 1.25rem;color:#1f2328;background:#fff}"
    "h1{font-size:1.5rem;margin:0 0 1rem}"
    "button{font:inherit;padding:.6rem 1.4rem;border:0;border-radius:6px;background:#1a56db;"
    "color:#fff;cursor:pointer}button:focus{outline:3px solid #93b4f5}"
    ".small{color:#57606a;font-size:.9rem}"
)
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_HARDENING = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Server": "campaignd",
}
_ERRORS = {
    400: ("Bad request", "The request could not be understood."),
    404: ("Not found", "There is nothing here."),
    405: ("Not allowed", "This address does not take that kind of request."),
    413: ("Request too large", "The request was larger than this page takes."),
    429: ("Too many requests", "Too many requests came from your network. Please try again in a minute."),
    500: ("Something went wrong", "Your request could not be handled. Please try again in a few minutes."),
    503: (
        "Please try again",
        "Your request could not be recorded just now. Nothing was changed; please try again in a "
        "few minutes.",
    ),
}


def page(title: str, body: str, *, status: int = 200) -> web.Response:
    """A small self-contained HTML page; ``body`` is HTML the caller has escaped."""
    text = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex, nofollow">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><main><h1>{html.escape(title)}</h1>\n{body}\n</main></body></html>\n"
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def error_page(status: int) -> web.Response:
    title, text = _ERRORS.get(status, _ERRORS[500] if status >= 500 else _ERRORS[400])
    return page(title, f"<p>{html.escape(text)}</p>", status=status)


# -- the service -----------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs the database work of many requests as one call in a thread.

    Requests that arrive while a call runs wait for the next one, so a burst costs a few
    transactions instead of one each, and the event loop never waits for the database.

    :param work: takes a list of items and returns one answer per item, in order.
    :param retry_for: keep retrying a failing call this long (the database may be
        restarting) before giving the error to every waiting request.
    """

    MAX_BATCH = 500

    def __init__(self, work: Callable[[list[T]], list[R]], *, name: str, retry_for: float) -> None:
        self._work = work
        self._name = name
        self._retry_for = retry_for
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.MAX_BATCH], self._pending[self.MAX_BATCH :]
            items = [item for item, _ in batch]
            try:
                answers = await self._call(items)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)

    async def _call(self, items: list[T]) -> list[R]:
        deadline = time.monotonic() + self._retry_for
        delay = 0.2
        while True:
            try:
                return await asyncio.to_thread(self._work, items)
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("%s failed (%s); retrying in %.1fs", self._name, _first_line(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


@dataclass(slots=True)
class Stats:
    """What the endpoint did since the daemon started (shown by the health endpoint)."""

    unsubscribed: int = 0
    already: int = 0
    pages: int = 0
    refused: int = 0
    limited: int = 0
    failed: int = 0


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a :class:`CampaigndError` saying why not.

    Bound synchronously so that a taken port stops the daemon's start-up before the
    event loop has run anything else.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CampaigndError(
            f"the unsubscribe endpoint cannot listen on {where}: unknown host ({exc.strerror}); "
            "set [unsubscribe] listen to an address of this machine, such as 127.0.0.1:8025"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    try:
        sock = socket.create_server(sockaddr[:2], family=family, backlog=128)
    except OSError as exc:
        # socket.create_server adds the address to strerror; the message says it once.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = "is another program, or another campaignd, using it?"
        if exc.errno == errno.EACCES:
            hint = "ports below 1024 need privileges; use a higher port behind your reverse proxy"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "that address is not one of this machine's"
        raise CampaigndError(
            f"the unsubscribe endpoint cannot listen on {where}: {reason} ({hint}); "
            'change [unsubscribe] listen, or set it to "" to serve the links elsewhere'
        ) from None
    sock.setblocking(False)
    return sock


def probe_listen(listen: str, *, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the endpoint can be served on ``listen`` (for ``campaignd doctor``).

    The port is free, or a running campaignd already answers on it: both are fine.
    """
    from campaignd.config import Unsubscribe

    host, port = Unsubscribe.parse_listen(listen)
    try:
        bind_listener(host, port).close()
        return True, f"{listen} is free"
    except CampaigndError as exc:
        problem = str(exc)
    url_host = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - probing, not binding
        url_host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"  # noqa: S104
    try:
        with urllib.request.urlopen(f"http://{url_host}:{port}/health", timeout=timeout) as answer:
            data = json.loads(answer.read(4096))
    except urllib.error.HTTPError as exc:  # 503: a campaignd that is up but unhealthy
        with exc:
            try:
                data = json.loads(exc.read(4096))
            except ValueError:
                data = None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and "unsubscribe" in data:
        return True, f"{listen} is served by the running campaignd"
    return False, problem


class UnsubscribeEndpoint:
    """The endpoint as a daemon :class:`~campaignd.services.Service`.

    With ``unsubscribe.listen`` empty it serves nothing, and starts serving when a
    reload sets it. A reload that moves it binds the new address before letting go of
    the old one; if the new one cannot be bound the old one keeps serving.

    :param write_retry: seconds to keep retrying a failing write before answering 503.
    """

    name = "unsubscribe endpoint"

    def __init__(self, *, write_retry: float = WRITE_RETRY) -> None:
        self.stats = Stats()
        self.address: tuple[str, int] | None = None
        """Where it listens now (the real port when the configured one is 0)."""
        self._ctx: ServiceContext | None = None
        self._queries: OptOutQueries | None = None
        self._keys: list[bytes] = []
        self._trusted: tuple[IPNetwork, ...] = ()
        self._limiter = RateLimiter(per_minute=0)
        self._listen: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._reader: Batcher[int, OptOutTarget | None] = Batcher(
            self._read_batch, name="reading unsubscribe links", retry_for=2.0
        )
        self._writer: Batcher[OptOut, bool] = Batcher(
            self._write_batch, name="recording unsubscribes", retry_for=write_retry
        )

    # -- Service ---------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self._configure(ctx, keys=load_keys(ctx.settings))
        listen = ctx.settings.unsubscribe.listen_address
        if listen is None:
            logger.info(
                "unsubscribe endpoint not served by this daemon (unsubscribe.listen is empty); "
                "%s/u/… must reach one that serves it",
                ctx.settings.unsubscribe.base_url,
            )
            return
        await self._serve(bind_listener(*listen), listen)

    async def reload(self, ctx: ServiceContext) -> None:
        try:
            keys = load_keys(ctx.settings)
        except CampaigndError as exc:
            logger.error("unsubscribe endpoint keeps its signing keys: %s", exc)
            keys = self._keys
        self._configure(ctx, keys=keys)
        listen = ctx.settings.unsubscribe.listen_address
        if listen == self._listen:
            return
        if listen is None:
            await self._close_site()
            logger.info("unsubscribe endpoint stopped: unsubscribe.listen is now empty")
            return
        try:
            sock = bind_listener(*listen)
        except CampaigndError as exc:
            where = self._where() if self._site else "nowhere"
            logger.error("%s; the endpoint keeps serving %s", exc, where)
            return
        await self._serve(sock, listen)

    async def stop(self) -> None:
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            # Waits up to SHUTDOWN_TIMEOUT for requests in progress: their opt-outs are recorded.
            await runner.cleanup()
            logger.info("unsubscribe endpoint stopped")

    # -- wiring ----------------------------------------------------------------------------

    def _configure(self, ctx: ServiceContext, *, keys: list[bytes]) -> None:
        settings: Settings = ctx.settings
        self._ctx = ctx
        self._queries = _queries(ctx.store)
        self._keys = keys
        self._trusted = tuple(
            ipaddress.ip_network(p, strict=False) for p in settings.unsubscribe.trusted_proxies
        )
        if self._limiter.per_minute != settings.unsubscribe.rate_limit:
            self._limiter = RateLimiter(per_minute=settings.unsubscribe.rate_limit)

    async def _serve(self, sock: socket.socket, listen: tuple[str, int]) -> None:
        try:
            if self._runner is None:
                self._runner = web.AppRunner(
                    self.app(),
                    handle_signals=False,
                    access_log=None,
                    shutdown_timeout=SHUTDOWN_TIMEOUT,
                    keepalive_timeout=KEEPALIVE,
                    max_line_size=MAX_LINE,
                    max_field_size=MAX_LINE,
                    max_headers=MAX_HEADERS,
                    lingering_time=2.0,
                    auto_decompress=False,
                )
                await self._runner.setup()
            site = web.SockSite(self._runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            raise
        old, self._site, self._listen = self._site, site, listen
        self.address = sock.getsockname()[:2]
        if old is not None:
            await old.stop()
        assert self._ctx is not None
        logger.info(
            "unsubscribe endpoint listening on http://%s (links: %s/u/…)",
            self._where(),
            self._ctx.settings.unsubscribe.base_url,
        )

    async def _close_site(self) -> None:
        site, self._site, self._listen, self.address = self._site, None, None, None
        if site is not None:
            await site.stop()

    def _where(self) -> str:
        if self.address is None:
            return "nowhere"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def app(self) -> web.Application:
        """The aiohttp application (one catch-all route; the paths follow the live config)."""
        application = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        application.router.add_route("*", "/{path:.*}", self._dispatch)
        return application

    # -- database, in batches on threads -----------------------------------------------------

    def _read_batch(self, lead_ids: list[int]) -> list[OptOutTarget | None]:
        assert self._queries is not None
        found = self._queries.optout_targets(lead_ids)
        return [found.get(i) for i in lead_ids]

    def _write_batch(self, optouts: list[OptOut]) -> list[bool]:
        assert self._queries is not None
        return self._queries.record_optouts(optouts)

    # -- requests ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every answer gets the hardening headers; no error shows more than a plain page."""
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            response = error_page(exc.status)
            for name in ("Allow", "Retry-After"):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
        except Exception:
            logger.exception("unsubscribe endpoint: %s request failed", request.method)
            response = error_page(500)
        for name, value in _HARDENING.items():
            if name == "Server":
                response.headers[name] = value  # not aiohttp's, which names its version
            else:
                response.headers.setdefault(name, value)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        client = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), self._trusted)
        key = rate_key(client)
        now = time.monotonic()
        wait = self._limiter.take(key, now)
        if wait:
            self.stats.limited += 1
            if self.stats.limited % 100 == 1:
                logger.warning("unsubscribe endpoint: rate limit reached by %s", client)
            response = error_page(429)
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        route, token = self._route(request.path)
        if route == "unsubscribe":
            if request.method in ("GET", "HEAD"):
                return await self._confirm(token, key, now)
            if request.method == "POST":
                return await self._unsubscribe(request, token, key, now)
            return self._not_allowed("GET, HEAD, POST")
        if route in ("health", "robots"):
            if request.method not in ("GET", "HEAD"):
                return self._not_allowed("GET, HEAD")
            if route == "robots":
                return web.Response(text="User-agent: *\nDisallow: /\n", content_type="text/plain")
            return await self._health()
        self._limiter.charge(key, now, REFUSED_COST - 1)
        return error_page(404)

    def _route(self, path: str) -> tuple[str | None, str]:
        assert self._ctx is not None
        prefix = self._ctx.settings.unsubscribe.base_path
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) :] or "/"
        if path.startswith("/u/"):
            # Plain-text mail clients sometimes take the full stop or bracket after a link
            # into it; no token ends in one of these, so they are dropped.
            token = path[3:].removesuffix("/").rstrip(".,;:!?)>]}'\"")
            return ("unsubscribe", token) if "/" not in token else (None, "")
        if path == "/health":
            return "health", ""
        if path == "/robots.txt":
            return "robots", ""
        return None, ""

    @staticmethod
    def _not_allowed(allow: str) -> web.Response:
        response = error_page(405)
        response.headers["Allow"] = allow
        return response

    async def _target(self, token: str) -> OptOutTarget | None:
        """The lead a token names, if the token is genuine; None for anything forged."""
        lead_id = token_lead_id(token)
        if lead_id is None:
            return None
        target = await self._reader.submit(lead_id)
        if target is None or not verify_token(self._keys, token, target.email):
            return None
        return target

    def _refused(self, key: str, now: float) -> web.Response:
        self.stats.refused += 1
        self._limiter.charge(key, now, REFUSED_COST - 1)
        return page("This link is not valid", self._invalid_text(), status=404)

    def _invalid_text(self) -> str:
        assert self._ctx is not None
        settings = self._ctx.settings
        business = html.escape(settings.sender.from_name)
        mailbox = settings.unsubscribe.mailto or settings.sender.reply_to
        if mailbox:
            m = html.escape(mailbox)
            other = (
                f'write to <a href="mailto:{m}?subject=unsubscribe">{m}</a> from the address you want removed'
            )
        else:
            other = "reply to the email and ask to be removed"
        return (
            "<p>This unsubscribe link is incomplete or has been changed. Please open the complete "
            f"link from the email, or {other}; {business} will stop contacting you.</p>"
        )

    async def _confirm(self, token: str, key: str, now: float) -> web.Response:
        try:
            target = await self._target(token)
        except Exception as exc:
            return self._failed("looking up an unsubscribe link", exc)
        if target is None:
            return self._refused(key, now)
        assert self._ctx is not None
        self.stats.pages += 1
        business = html.escape(self._ctx.settings.sender.from_name)
        masked = html.escape(mask_address(target.email))
        if target.opted_out:
            return page(
                "You are unsubscribed",
                f"<p><strong>{masked}</strong> is unsubscribed: {business} will not contact it again.</p>",
            )
        return page(
            "Unsubscribe",
            f"<p>Stop all email and letters from {business} to <strong>{masked}</strong>?</p>\n"
            '<form method="post">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<input type="hidden" name="source" value="page">'
            '<button type="submit">Unsubscribe</button></form>\n'
            '<p class="small">Nothing changes until you press the button.</p>',
        )

    async def _unsubscribe(self, request: web.Request, token: str, key: str, now: float) -> web.Response:
        body = await request.read()  # at most MAX_BODY: larger raises 413
        try:
            target = await self._target(token)
        except Exception as exc:
            return self._failed("looking up an unsubscribe link", exc)
        if target is None:
            return self._refused(key, now)
        assert self._ctx is not None
        source = request_source(request.content_type, body)
        optout = OptOut(target.lead_id, target.email, at=self._ctx.clock(), detail=source)
        try:
            added = await self._writer.submit(optout)
        except Exception as exc:
            return self._failed(f"recording the unsubscribe of {target.email}", exc)
        if added:
            self.stats.unsubscribed += 1
            logger.info("unsubscribed %s (lead %d, %s)", target.email, target.lead_id, source)
        else:
            self.stats.already += 1
        business = html.escape(self._ctx.settings.sender.from_name)
        masked = html.escape(mask_address(target.email))
        return page(
            "You are unsubscribed",
            f"<p>{business} will send no more email or letters to <strong>{masked}</strong>.</p>\n"
            '<p class="small">A letter that is already printed may still arrive in the next few days.</p>',
        )

    def _failed(self, what: str, exc: Exception) -> web.Response:
        self.stats.failed += 1
        logger.error(
            "unsubscribe endpoint: %s failed, answered 503 (the sender may try again): %s",
            what,
            _first_line(exc),
        )
        response = error_page(503)
        response.headers["Retry-After"] = "60"
        return response

    async def _health(self) -> web.Response:
        assert self._ctx is not None and self._queries is not None
        info: dict[str, Any] = dict(self._ctx.health())
        try:
            await asyncio.wait_for(asyncio.to_thread(self._queries.ping), 5.0)
            info["database"] = "ok"
        except Exception as exc:
            logger.warning("health check: the database did not answer: %s", exc or type(exc).__name__)
            info["database"] = "unreachable"
        info["unsubscribe"] = asdict(self.stats)
        healthy = info.get("status") == "ok" and info["database"] == "ok"
        return web.json_response(info, status=200 if healthy else 503, dumps=_dumps)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _dumps(data: Any) -> str:
    return json.dumps(data, default=str)


def _queries(store: Store) -> OptOutQueries:
    # The endpoint's queries run on the daemon's engine and connection pool.
    if isinstance(store, OptOutQueries):
        return store
    return OptOutQueries(engine=store.engine)
