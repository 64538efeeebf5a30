"""Rendering: the Jinja environment, and turning a step's templates into a message for one lead.

Owns where templates live (``<templates>/<name>.subject.j2``, ``.html.j2`` and
``.txt.j2`` for an email step; ``<name>.letter.html.j2`` for direct mail), the sample
leads beside them (``sample.toml`` in each folder), the sandboxed, strict environment
they run in (undefined variables are errors, HTML is autoescaped, plain text and
subjects are not, and nothing a template does can change the data it is given), the
context templates see, CSS inlining (never fetching anything remote), the ``.ics``
invitation a step about an event carries, and checking every referenced template before
anything is sent, each problem with the template file, the line and the reason.

Speed comes from rendering each template once per *shape* rather than once per lead. A
shape is what a template produces when every value that differs between leads (the
lead's fields, the unsubscribe links) is left as a numbered slot: the first render of a
step is traced, recording each question the template asked about the lead (is this field
set? is it empty?) and where each lead value went. Every later lead that gives the same
answers gets the same text with its own values in the slots, and for HTML the CSS is
inlined once per shape instead of once per message. Anything a template does with a
lead value other than print it or test it (a filter, a comparison, a loop, a macro)
makes that template render through Jinja for every lead: the same text, more slowly.
HTML leaves here as ASCII, characters beyond it as numeric character references.

Imports no database, SMTP or scheduler module, and never reads the clock.
"""

from __future__ import annotations

import functools
import html as html_lib
import logging
import re
import tomllib
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

import css_inline
import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from campaignd.calendar import Invitation
from campaignd.config import Channel, Settings, Step, Tier
from campaignd.exceptions import Problem, TemplateError
from campaignd.unsubscribe import Links

logger = logging.getLogger(__name__)

EMAIL_PARTS = ("subject", "html", "txt")
MAIL_PARTS = ("letter.html",)
SAMPLE_FILE = "sample.toml"
LEAD_FIELDS = (
    "id",
    "email",
    "first_name",
    "last_name",
    "company",
    "phone",
    "address_line1",
    "address_line2",
    "city",
    "region",
    "postal_code",
    "country",
    "timezone",
    "tier",
    "touch_count",
)
MAX_SHAPES = 64
"""Per template and step; past this, leads that match none render through Jinja."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


# -- what a render produces ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file that goes with a message.

    :param filename: the name the recipient sees.
    :param content_type: its media type with parameters (``text/calendar; method=PUBLISH``).
    :param content: its bytes as of the moment the message is made; an invitation
        carries that moment as its ``DTSTAMP``.
    """

    filename: str
    content_type: str
    content: Callable[[datetime], bytes]


@dataclass(frozen=True, slots=True)
class Rendered:
    """One step rendered for one lead.

    ``html`` has its CSS inlined (for a direct-mail letter it is the page as written).
    ``text`` is the marketer's plain-text part, or one made from the HTML when the step
    has none (``text_generated``).
    """

    subject: str
    html: str
    text: str
    attachments: tuple[Attachment, ...] = ()
    text_generated: bool = False


class RenderError(Exception):
    """A message cannot be made for one lead (for example a custom field it lacks)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


SAMPLE_LEAD: dict[str, Any] = {
    "id": 0,
    "email": "jane.sample@example.com",
    "first_name": "Jane",
    "last_name": "Sample",
    "name": "Jane Sample",
    "company": "Sample & Co",
    "phone": "+1 555 0100",
    "address_line1": "1 Sample Street",
    "address_line2": "",
    "city": "Springfield",
    "region": "IL",
    "postal_code": "62701",
    "country": "US",
    "timezone": "America/Chicago",
    "tier": "cold",
    "touch_count": 0,
    "custom": {},
}
"""The lead every sample starts from; a folder's ``sample.toml`` overrides its fields."""


def lead_context(lead: Any) -> dict[str, Any]:
    """The ``lead`` a template sees: contact fields, ``name`` and ``custom`` fields."""
    ctx = {f: getattr(lead, f) for f in LEAD_FIELDS}
    ctx["name"] = f"{lead.first_name} {lead.last_name}".strip()
    ctx["custom"] = dict(lead.custom or {})
    return ctx


class LetterCheck(Protocol):
    """A check of a rendered direct-mail letter, run by ``templates check`` for each
    ``mail`` step and sample lead (for example that it fits the print layout).

    :param step: the step; ``source`` is the template file the letter came from.
    :returns: the problems found, each naming its file.
    """

    def __call__(
        self, *, step: Step, tier: str, lead: Mapping[str, Any], html: str, source: str
    ) -> list[Problem]: ...


# -- the environment -----------------------------------------------------------------------

_DICT_ATTRS = frozenset(dir(dict))
# Filters and tests that treat a lead value as an opaque thing that exists: using them
# keeps a template traceable. Everything else looks inside the value.
_OPAQUE_FILTERS = frozenset({"default", "d"})
_OPAQUE_TESTS = frozenset({"defined", "undefined"})


class _Untraceable(Exception):
    """The template did something with a lead value that a shape cannot replay."""


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox templates run in, with the hooks that tracing relies on.

    Immutable: a template cannot call ``update``, ``append`` or any other method that
    changes a dict or list it is given, so one lead's render cannot leak into another's.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict:
            # A key wins over a method of the same name: lead.custom.update is the custom
            # field "update", not dict.update. (Jinja looks for the attribute first.) It is
            # also the common case, answered without a failed attribute lookup.
            if attribute in obj:
                return obj[attribute]
        elif kind is _Traced:
            return obj.attr(attribute, self)
        elif kind is _Sym:
            raise _Untraceable
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        kind = type(obj)
        if kind is _Traced:
            return obj.item(argument, self)
        if kind is _Sym or type(argument) in _TRACED:
            raise _Untraceable
        return super().getitem(obj, argument)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if (
            type(obj) in _TRACED
            or any(type(a) in _TRACED for a in args)
            or any(type(v) in _TRACED for v in kwargs.values())
        ):
            raise _Untraceable
        return super().call(context, obj, *args, **kwargs)


@jinja2.pass_context
def _finalize(context: Any, value: Any) -> Any:
    kind = type(value)
    if kind is _Sym:
        return value._rec.slot(value._path, bool(context.eval_ctx.autoescape))
    if kind is _Traced:
        raise _Untraceable
    return value


def _guard(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps Jinja's pass_context/pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if any(type(a) in _TRACED for a in args) or any(type(v) in _TRACED for v in kwargs.values()):
            raise _Untraceable
        return func(*args, **kwargs)

    return guarded


def make_environment(root: Path) -> jinja2.Environment:
    """The sandboxed, strict environment for the templates under ``root``."""
    env = _Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        undefined=jinja2.StrictUndefined,
        # Escape HTML, never plain text or subjects.
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
        finalize=_finalize,
    )
    filters = cast(dict[str, Callable[..., Any]], env.filters)
    tests = cast(dict[str, Callable[..., Any]], env.tests)
    env.filters = {k: v if k in _OPAQUE_FILTERS else _guard(v) for k, v in filters.items()}
    env.tests = {k: v if k in _OPAQUE_TESTS else _guard(v) for k, v in tests.items()}
    # Random filler text has no place in a sent message, and would make a shape's
    # text differ from a fresh render.
    env.globals.pop("lipsum", None)
    return env


# -- tracing: the values that differ between leads ------------------------------------------

_PRESENT, _TRUTHY = 0, 1
_MISSING: Any = object()
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK = re.compile("\ue000(\\d+)\ue001")

KeyPath = tuple[str, ...]
"""Where a lead value comes from: ``("lead", "custom", "industry")``, ``("unsubscribe_url",)``."""


class _Recorder:
    """What one traced render asked about the lead, and where lead values went."""

    __slots__ = ("checks", "slots")

    def __init__(self) -> None:
        self.checks: dict[tuple[KeyPath, int], bool] = {}
        self.slots: list[tuple[KeyPath, bool]] = []

    def observe(self, path: KeyPath, kind: int, answer: bool) -> None:
        self.checks.setdefault((path, kind), answer)

    def slot(self, path: KeyPath, escaped: bool) -> str:
        self.slots.append((path, escaped))
        return f"{_OPEN}{len(self.slots) - 1}{_CLOSE}"


def _refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise _Untraceable


class _Sym:
    """A lead value during a traced render: it can be printed and tested, nothing else."""

    __slots__ = ("_path", "_rec", "_value")

    def __init__(self, rec: _Recorder, path: KeyPath, value: Any) -> None:
        self._rec, self._path, self._value = rec, path, value

    def __bool__(self) -> bool:
        answer = bool(self._value)
        self._rec.observe(self._path, _TRUTHY, answer)
        return answer

    def __getattr__(self, name: str) -> Any:
        raise _Untraceable

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = __str__ = __repr__ = __format__ = __len__ = __iter__ = _refuse
    __contains__ = __getitem__ = __call__ = _refuse


class _Traced:
    """A mapping of lead values (the lead, its custom fields) during a traced render."""

    __slots__ = ("_data", "_path", "_rec")

    def __init__(self, rec: _Recorder, path: KeyPath, data: dict[str, Any]) -> None:
        self._rec, self._path, self._data = rec, path, data

    def attr(self, name: str, env: jinja2.Environment) -> Any:
        return self._lookup(name, env)

    def item(self, key: Any, env: jinja2.Environment) -> Any:
        if type(key) is not str:
            raise _Untraceable
        return self._lookup(key, env)

    def _lookup(self, key: str, env: jinja2.Environment) -> Any:
        path = (*self._path, key)
        if key in self._data:
            self._rec.observe(path, _PRESENT, True)
            return _wrap(self._rec, path, self._data[key])
        if key in _DICT_ATTRS:
            # Jinja finds the mapping's method: a read-only one can be called (a shape
            # cannot replay that); one that changes the mapping is refused as undefined.
            method = env.getattr(self._data, key)
            if not isinstance(method, jinja2.Undefined):
                raise _Untraceable
            self._rec.observe(path, _PRESENT, False)
            return method
        self._rec.observe(path, _PRESENT, False)
        return env.undefined(hint=f"{'.'.join(path)} is not set for this lead", obj=self._data, name=key)

    def __bool__(self) -> bool:
        answer = bool(self._data)
        self._rec.observe(self._path, _TRUTHY, answer)
        return answer

    def __getattr__(self, name: str) -> Any:
        raise _Untraceable

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = __str__ = __repr__ = __format__ = __len__ = __iter__ = _refuse
    __contains__ = __getitem__ = __call__ = _refuse


_TRACED = frozenset({_Sym, _Traced})


def _wrap(rec: _Recorder, path: KeyPath, value: Any) -> Any:
    return _Traced(rec, path, value) if type(value) is dict else _Sym(rec, path, value)


def _traceable(env: jinja2.Environment, name: str, seen: set[str] | None = None) -> bool:
    """Whether ``name`` (and the layouts it extends) only print and test lead values.

    Macros, includes, ``{% set %}`` blocks, ``{% filter %}`` blocks and ``self``/``caller``
    can capture rendered text and use it again, out of sight of the tracing hooks, so
    templates that use them render through Jinja for every lead.
    """
    seen = set() if seen is None else seen
    if name in seen:
        return True
    seen.add(name)
    assert env.loader is not None
    source, filename, _ = env.loader.get_source(env, name)
    ast = env.parse(source, name, filename)
    capturing = (
        nodes.Macro,
        nodes.CallBlock,
        nodes.FilterBlock,
        nodes.AssignBlock,
        nodes.Include,
        nodes.Import,
        nodes.FromImport,
    )
    if any(True for _ in ast.find_all(capturing)):
        return False
    # super() may only be printed as it is: {{ super() }}.
    printed_super = {
        id(child.node)
        for out in ast.find_all(nodes.Output)
        for child in out.nodes
        if isinstance(child, nodes.Call) and isinstance(child.node, nodes.Name) and child.node.name == "super"
    }
    for ref in ast.find_all(nodes.Name):
        if ref.name in ("self", "caller", "varargs", "kwargs"):
            return False
        if ref.name == "super" and id(ref) not in printed_super:
            return False
    for ext in ast.find_all(nodes.Extends):
        if not isinstance(ext.template, nodes.Const) or not isinstance(ext.template.value, str):
            return False
        if not _traceable(env, ext.template.value, seen):
            return False
    return True


# -- shapes ----------------------------------------------------------------------------------

_TEXT, _ATTR, _RAW, _COMMENT = 0, 1, 2, 3
_UNSAFE_RAW = re.compile("[&<>\"'\x00]")
_RAW_ELEMENTS = ("style", "script", "xmp", "iframe", "noembed", "noframes", "plaintext", "noscript")
_SERIAL_TOKEN = re.compile(
    r"<!--.*?-->|<![^>]*>|<(/?)([A-Za-z][^\s/>]*)(?:[^>\"]|\"[^\"]*\")*>",
    re.S,
)
_PROBES: tuple[str, ...] = ("", " \n", 'Zoë & <b>"O\'Brien"</b>\xa0&amp; >', "a\r\nb\rc", "\t x \n", "x")


_HTML_SPACE = "\t\n\x0c\r "


def _inert(text: str) -> bool:
    """Whether the HTML parser and serializer used for inlining leave ``text`` as it is:
    none of ``& < > "``, CR, NUL or a no-break space. (Faster than a regular expression:
    each test is a memchr.)"""
    return not (
        "&" in text
        or "<" in text
        or ">" in text
        or '"' in text
        or "\r" in text
        or "\x00" in text
        or "\xa0" in text
    )


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class _Pieces:
    """Text with numbered slots, filled by joining its pieces with the slots' values."""

    __slots__ = ("holes", "pieces", "slots")

    def __init__(self, text: str) -> None:
        parts = _MARK.split(text)
        self.pieces: list[str] = []
        holes: list[tuple[int, int]] = []
        for i, part in enumerate(parts):
            if i % 2:
                holes.append((len(self.pieces), int(part)))
                self.pieces.append("")
            elif part:
                self.pieces.append(part)
        self.holes = tuple(holes)
        self.slots = tuple(slot for _, slot in holes)

    def fill(self, values: Sequence[Any]) -> str:
        pieces = self.pieces.copy()
        for index, slot in self.holes:
            pieces[index] = values[slot]
        return "".join(pieces)


# Not C1 controls: HTML reads &#128; to &#159; as Windows-1252 characters. They stay as
# they are (and the page then goes as base64).
_NON_ASCII = re.compile("[^\x00-\x9f]")
_NON_ASCII_BUT_MARKS = re.compile("[^\x00-\x9f\ue000\ue001]")
_C1 = re.compile("[\x80-\x9f]")
_RAW_SPAN = re.compile(
    r"<(style|script|xmp|iframe|noembed|noframes|plaintext|noscript)\b[^>]*>.*?</\1\s*>", re.S | re.I
)


def _charref(found: re.Match[str]) -> str:
    return f"&#{ord(found.group())};"


def ascii_html(page: str) -> str:
    """``page`` with every character beyond ASCII as a numeric character reference
    (``&#8212;``), which every HTML reader decodes, so the page travels as 7-bit text.

    Inside ``<style>`` and ``<script>`` references are not decoded: what is there stays
    as it is (and the message then goes as base64).
    """
    return _ascii(page, _NON_ASCII)


def _ascii(page: str, pattern: re.Pattern[str]) -> str:
    if page.isascii():
        return page
    out, pos = [], 0
    for span in _RAW_SPAN.finditer(page):
        out.append(pattern.sub(_charref, page[pos : span.start()]))
        out.append(span.group())
        pos = span.end()
    out.append(pattern.sub(_charref, page[pos:]))
    return "".join(out)


def _charrefs(text: str) -> str:
    """``text`` as :func:`ascii_html` writes text outside style and script."""
    if text.isascii():
        return text
    if _C1.search(text):
        return _NON_ASCII.sub(_charref, text)
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _convert(value: Any, escaped: bool, context: int) -> str | None:
    """``value`` as the CSS inliner writes it where the slot lies (made ASCII as
    :func:`ascii_html` does), or None when only the inliner can tell (markup in an
    unescaped value, a NUL character)."""
    raw = value if type(value) is str else str(value)
    if not escaped and _UNSAFE_RAW.search(raw):
        return None
    if context >= _RAW:
        raw = _newlines(str(escape(raw)) if escaped else raw)
        return raw if context == _RAW else _charrefs(raw)
    if not _inert(raw):
        if "\x00" in raw:
            return None
        raw = _newlines(raw).replace("&", "&amp;").replace("\xa0", "&nbsp;")
        if context == _TEXT:
            raw = raw.replace("<", "&lt;").replace(">", "&gt;")
        else:
            raw = raw.replace('"', "&quot;")
    return _charrefs(raw)


@dataclass(slots=True)
class _PartShape:
    """One part (subject, HTML, text) of a shape."""

    text: _Pieces
    """The render, over the shape's slot values as Jinja prints them."""
    inlined: _Pieces | None = None
    """For an HTML email: the CSS-inlined page, over the values as the inliner writes them."""
    contexts: tuple[tuple[int, int], ...] = ()
    """Per slot of ``inlined``: in text, in an attribute value, in raw text, in a comment."""
    blank_safe: bool = True
    """Whether ``inlined`` holds for values of nothing but white space too (in a table,
    the parser moves text that is not blank, and keeps text that is)."""


@dataclass(slots=True)
class _Shape:
    """One way a step comes out, valid for every lead that answers ``checks`` alike."""

    paths: tuple[tuple[str, tuple[str, ...]], ...]
    """The lead values it depends on: a root (``lead``, ``unsubscribe_url``) and keys."""
    checks: tuple[tuple[int, int, bool], ...]
    """(path, question, answer): whether the value is present, whether it is true."""
    slot_paths: tuple[int, ...]
    escaped: tuple[bool, ...]
    parts: dict[str, _PartShape]
    lookup: Callable[[Mapping[str, Any]], list[Any] | None] = field(init=False)
    """The values of ``paths`` for a lead, or None if the lead does not fit the shape."""

    def __post_init__(self) -> None:
        self.lookup = _compile_lookup(self.paths, self.checks)

    def printed(self, got: Sequence[Any], slots: Iterable[int]) -> list[Any]:
        """The value of each of ``slots`` as Jinja prints it (the others empty)."""
        paths, escaped = self.slot_paths, self.escaped
        values: list[Any] = [""] * len(paths)
        for slot in slots:
            value = got[paths[slot]]
            values[slot] = escape(value) if escaped[slot] else value if type(value) is str else str(value)
        return values

    def inlined(self, part: _PartShape, got: Sequence[Any]) -> str | None:
        """The part's inlined page for these values, or None when only the inliner can tell."""
        assert part.inlined is not None
        paths, escaped = self.slot_paths, self.escaped
        values: list[Any] = [""] * len(paths)
        for slot, context in part.contexts:
            raw = got[paths[slot]]
            if not part.blank_safe and not str(raw).strip(_HTML_SPACE):
                return None
            if type(raw) is str and context <= _ATTR and raw.isascii() and _inert(raw):
                values[slot] = raw  # the common case: nothing for the inliner to change
                continue
            value = _convert(raw, escaped[slot], context)
            if value is None:
                return None
            values[slot] = value
        return part.inlined.fill(values)


def _compile_lookup(
    paths: Sequence[tuple[str, tuple[str, ...]]], checks: Sequence[tuple[int, int, bool]]
) -> Callable[[Mapping[str, Any]], list[Any] | None]:
    """A function that finds a shape's values in a lead and answers its checks.

    Made as Python source and compiled, as Jinja does with templates: it runs for every
    message, and a loop over paths costs several times as much. Keys are written with
    repr(), so any key is a plain string literal.
    """
    lines = ["def lookup(roots):"]
    names: dict[tuple[str, ...], str] = {}

    def value_of(path: tuple[str, ...]) -> str:
        if path not in names:
            name = names[path] = f"v{len(names)}"
            if len(path) == 1:
                lines.append(f"    {name} = roots[{path[0]!r}]")
            else:
                parent = value_of(path[:-1])
                lines.append(
                    f"    {name} = {parent}.get({path[-1]!r}, _M) if type({parent}) is _dict else _M"
                )
        return names[path]

    found = [value_of((root, *keys)) for root, keys in paths]
    for i, kind, answer in checks:
        value = found[i]
        if kind == _PRESENT:
            lines.append(f"    if {value} is {'' if answer else 'not '}_M: return None")
        else:
            lines.append(f"    if {value} is _M or {'not ' if answer else ''}{value}: return None")
    lines.append(f"    return [{', '.join(found)}]")
    namespace: dict[str, Any] = {"_M": _MISSING, "_dict": dict}
    exec(compile("\n".join(lines), "<campaignd shape>", "exec"), namespace)  # noqa: S102 - our own source
    return cast(Callable[[Mapping[str, Any]], "list[Any] | None"], namespace["lookup"])


def _contexts(page: str, positions: Sequence[int]) -> list[int] | None:
    """Where each position of a serialized page lies; None if one is inside a tag's name
    or an attribute's name, which no value may fill."""
    spans: list[tuple[int, int, int]] = []  # start, end, kind
    raw_from: int | None = None
    raw_name = ""
    for m in _SERIAL_TOKEN.finditer(page):
        if raw_from is not None:
            if not (m.group(1) and m.group(2).lower() == raw_name):
                continue
            spans.append((raw_from, m.start(), _RAW))
            raw_from = None
        if m.group(0).startswith("<!--"):
            spans.append((m.start(), m.end(), _COMMENT))
            continue
        spans.append((m.start(), m.end(), -1))
        name = (m.group(2) or "").lower()
        if not m.group(1) and name in _RAW_ELEMENTS:
            raw_from, raw_name = m.end(), name
    starts = [s for s, _, _ in spans]
    out: list[int] = []
    for pos in positions:
        i = bisect_right(starts, pos) - 1
        if i < 0 or pos >= spans[i][1]:
            out.append(_TEXT)
            continue
        start, _, kind = spans[i]
        if kind >= _RAW:
            out.append(kind)
        elif page.count('"', start, pos) % 2 == 1:
            out.append(_ATTR)
        else:
            return None
    return out


@dataclass(slots=True)
class _Part:
    """One template file as one step uses it."""

    name: str
    template: jinja2.Template
    inline: bool
    """An HTML email part: CSS is inlined."""
    traceable: bool


@dataclass(slots=True)
class _StepParts:
    """Everything a step needs that does not depend on the lead, and its shapes."""

    constants: dict[str, Any]
    parts: dict[str, _Part]
    text_missing: bool
    attachments: tuple[Attachment, ...]
    shapes: list[_Shape] = field(default_factory=list)


# -- the renderer -----------------------------------------------------------------------------


class Renderer:
    """Renders the configured templates.

    One renderer serves one configuration: a reload makes a new one. Not meant for use
    from several threads at once.

    :param settings: the configuration (templates folder, sender, campaign data, events).
    :param letter_checks: extra checks of direct-mail letters, run by :meth:`check`.
    :param shapes: reuse renders across leads (see the module's description); False
        renders every lead through Jinja and inlines its CSS, as a reference for tests
        and benchmarks.
    """

    def __init__(
        self, *, settings: Settings, letter_checks: Sequence[LetterCheck] = (), shapes: bool = True
    ) -> None:
        self.settings = settings
        self.use_shapes = shapes
        self.root = settings.templates
        self.env = make_environment(self.root)
        self.letter_checks = tuple(letter_checks)
        # Never fetch a stylesheet while rendering; keep @media rules for small screens.
        self.inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_at_rules=True)
        self._steps: dict[tuple[str, str, Channel], _StepParts] = {}
        self._invitations: dict[str, Invitation] = {}
        sender = settings.sender
        self._sender = {
            "name": sender.from_name,
            "from_name": sender.from_name,
            "from_address": sender.from_address,
            "reply_to": sender.reply_to or sender.from_address,
            "postal_address": sender.postal_address,
        }
        self._campaign = _plain(settings.campaign)

    # -- public API ------------------------------------------------------------------------

    def template(self, name: str) -> jinja2.Template:
        """A compiled template (cached by the environment)."""
        return self.env.get_template(name)

    def parts_for(self, step: Step) -> tuple[str, ...]:
        return MAIL_PARTS if step.channel == Channel.MAIL else EMAIL_PARTS

    def invitation(self, name: str) -> Invitation:
        """The calendar invitation for the event called ``name`` under ``[events]``."""
        found = self._invitations.get(name)
        if found is None:
            event = self.settings.events.get(name)
            if event is None:
                raise KeyError(name)
            found = self._invitations[name] = Invitation(
                name=name,
                event=event,
                zone=event.timezone or self.settings.timezone,
                organizer=self.settings.sender,
            )
        return found

    def render(self, *, lead: Mapping[str, Any], tier: str, step: Step, index: int, links: Links) -> Rendered:
        """Render ``step`` for ``lead``; raises :class:`RenderError` naming file and line."""
        prepared = self._prepare(str(tier), step, index)
        roots = {
            "lead": lead if type(lead) is dict else dict(lead),
            "unsubscribe_url": links.url,
            "unsubscribe_mailto": links.mailto,
        }
        out = self._render_parts(prepared, roots)
        if step.channel == Channel.MAIL:
            return Rendered(subject="", html=out["letter.html"], text="")
        subject = out["subject"].strip()
        subject = " ".join((subject if subject.isprintable() else _CONTROL.sub(" ", subject)).split())
        html = out["html"]
        text = html_to_text(html) if prepared.text_missing else out["txt"]
        return Rendered(
            subject=subject,
            html=html,
            text=text,
            attachments=prepared.attachments,
            text_generated=prepared.text_missing,
        )

    def render_template(
        self, name: str, context: Mapping[str, Any], *, inline_css: bool | None = None
    ) -> str:
        """Render any template of the tree (a digest, a print layout) with ``context``, in
        the same sandbox; an ``.html.j2`` template has its CSS inlined unless told not to."""
        try:
            out = self.template(name).render(dict(context))
        except jinja2.TemplateNotFound as exc:
            raise RenderError(
                Problem(str(self.root / name), "", f"template not found ({exc.name})")
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(_syntax_problem(self.root, exc)) from None
        except Exception as exc:
            raise RenderError(_runtime_problem(self.root, name, exc)) from None
        if inline_css is None:
            inline_css = name.endswith(".html.j2")
        return self.inline_css(out, source=name) if inline_css else out

    def inline_css(self, html: str, *, source: str = "") -> str:
        """``html`` with the rules of its ``<style>`` blocks moved into ``style`` attributes,
        and its characters beyond ASCII as character references (see :func:`ascii_html`)."""
        return ascii_html(self._inline(html, source))

    def _inline(self, html: str, source: str) -> str:
        try:
            return str(self.inliner.inline(html))
        except (css_inline.InlineError, ValueError) as exc:
            raise RenderError(
                Problem(
                    str(self.root / source) if source else "template", "", f"cannot inline the CSS: {exc}"
                )
            ) from None

    def shape_count(self, tier: str, step_id: str, part: str | None = None) -> int:
        """How many shapes an email step has so far, or how many of them hold ``part``
        (``subject``, ``html``, ``txt``); for tests and benchmarks."""
        found = self._steps.get((tier, step_id, Channel.EMAIL))
        if found is None:
            return 0
        return sum(1 for shape in found.shapes if part is None or part in shape.parts)

    def sample_leads(self, template: str, *, tier: str) -> list[dict[str, Any]]:
        """The sample leads for ``template`` (from the nearest ``sample.toml``); raises
        :class:`TemplateError` when that file is broken."""
        leads, problems = self._samples(template, tier)
        if problems:
            raise TemplateError(problems)
        return leads

    # -- preparing a step ------------------------------------------------------------------

    def _prepare(self, tier: str, step: Step, index: int) -> _StepParts:
        # The channel too: a direct-mail step may also be sent as an email (to a lead
        # without a postal address), from the same id and template.
        key = (tier, step.id, step.channel)
        found = self._steps.get(key)
        if found is not None:
            return found
        constants: dict[str, Any] = {
            "sender": self._sender,
            "campaign": self._campaign,
            "postal_address": self.settings.sender.postal_address,
            "step": {"id": step.id, "tier": tier, "number": index + 1, "channel": step.channel.value},
            "events": {name: self.invitation(name).context() for name in self.settings.events},
        }
        attachments: tuple[Attachment, ...] = ()
        if step.event is not None:
            if step.event not in self.settings.events:
                raise RenderError(self._unknown_event(tier, index, step))
            invitation = self.invitation(step.event)
            constants["event"] = constants["events"][step.event]
            if step.channel == Channel.EMAIL:
                attachments = (
                    Attachment(
                        filename=invitation.filename,
                        content_type="text/calendar; method=PUBLISH",
                        content=invitation.ics,
                    ),
                )
        parts: dict[str, _Part] = {}
        text_missing = False
        for part in self.parts_for(step):
            name = f"{step.template}.{part}.j2"
            if part == "txt" and not (self.root / name).is_file():
                text_missing = True
                continue
            parts[part] = self._part(name, inline=part == "html")
        prepared = _StepParts(constants, parts, text_missing, attachments)
        self._steps[key] = prepared
        return prepared

    def _part(self, name: str, *, inline: bool) -> _Part:
        try:
            template = self.template(name)
            traceable = _traceable(self.env, name)
        except jinja2.TemplateNotFound as exc:
            missing = str(self.root / (exc.name or name))
            raise RenderError(Problem(missing, "", "template not found")) from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(_syntax_problem(self.root, exc)) from None
        return _Part(name=name, template=template, inline=inline, traceable=traceable)

    def _unknown_event(self, tier: str, index: int, step: Step) -> Problem:
        where = f"sequences.{tier}.steps[{index}].event"
        return Problem(
            str(self.settings.config_path or "config"),
            where,
            f"no event named {step.event!r}: describe it under [events.{step.event}]",
        )

    # -- rendering -------------------------------------------------------------------------

    def _render_parts(self, prepared: _StepParts, roots: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        shapes = prepared.shapes
        for index, shape in enumerate(shapes):
            got = shape.lookup(roots)
            if got is not None:
                if index:  # the shapes most leads fit drift to the front
                    shapes[index - 1], shapes[index] = shape, shapes[index - 1]
                for name, part_shape in shape.parts.items():
                    out[name] = self._fill(prepared.parts[name], shape, part_shape, got)
                break
        else:
            traceable = any(p.traceable for p in prepared.parts.values())
            if self.use_shapes and traceable and len(prepared.shapes) < MAX_SHAPES:
                out = self._trace(prepared, roots)
        if len(out) < len(prepared.parts):
            context = {**prepared.constants, **roots}
            for name, part in prepared.parts.items():
                if name not in out:
                    text = self._jinja(part, context)
                    out[name] = self.inline_css(text, source=part.name) if part.inline else text
        return out

    def _fill(self, part: _Part, shape: _Shape, part_shape: _PartShape, got: list[Any]) -> str:
        if part_shape.inlined is not None:
            page = shape.inlined(part_shape, got)
            if page is not None:
                return page
        text = part_shape.text.fill(shape.printed(got, part_shape.text.slots))
        return self.inline_css(text, source=part.name) if part.inline else text

    def _jinja(self, part: _Part, context: dict[str, Any]) -> str:
        try:
            return part.template.render(context)
        except jinja2.TemplateSyntaxError as exc:  # in a layout it extends
            raise RenderError(_syntax_problem(self.root, exc)) from None
        except jinja2.TemplateNotFound as exc:
            raise RenderError(
                Problem(str(self.root / part.name), "", f"template not found ({exc.name})")
            ) from None
        except Exception as exc:
            raise RenderError(_runtime_problem(self.root, part.name, exc)) from None

    def _trace(self, prepared: _StepParts, roots: dict[str, Any]) -> dict[str, str]:
        """Render the traceable parts with the lead's values traced and keep the shape.

        Returns this lead's text of each part it could trace; the others (all of them
        when tracing fails) are left to Jinja.
        """
        rec = _Recorder()
        context = dict(prepared.constants)
        for key, value in roots.items():
            context[key] = _wrap(rec, (key,), value)
        raw: dict[str, str] = {}
        for name, part in prepared.parts.items():
            if not part.traceable:
                continue
            try:
                raw[name] = part.template.render(context)
            except _Untraceable:
                part.traceable = False
                logger.debug(
                    "%s uses lead values beyond printing and testing them: rendered per lead", part.name
                )
                return {}
            except jinja2.UndefinedError as exc:
                # The same lookup fails without tracing: report it, naming the lead field.
                raise RenderError(_runtime_problem(self.root, part.name, exc)) from None
            except Exception:
                return {}  # rendering without tracing reports it
        slots_seen: list[int] = []
        texts: dict[str, _Pieces] = {}
        for name, text in raw.items():
            texts[name] = _Pieces(text)
            slots_seen += texts[name].slots
            if text.count(_OPEN) != len(texts[name].slots) or text.count(_CLOSE) != len(texts[name].slots):
                slots_seen = []  # a value of the campaign data uses the marks: trace nothing
                break
        if sorted(slots_seen) != list(range(len(rec.slots))):
            for name in raw:
                prepared.parts[name].traceable = False
            return {}
        paths: dict[tuple[str, ...], int] = {}
        for path in [p for (p, _) in rec.checks] + [p for p, _ in rec.slots]:
            paths.setdefault(path, len(paths))
        shape = _Shape(
            paths=tuple((p[0], p[1:]) for p in paths),
            checks=tuple((paths[p], kind, answer) for (p, kind), answer in rec.checks.items()),
            slot_paths=tuple(paths[p] for p, _ in rec.slots),
            escaped=tuple(esc for _, esc in rec.slots),
            parts={name: _PartShape(text=pieces) for name, pieces in texts.items()},
        )
        for name, part_shape in shape.parts.items():
            if prepared.parts[name].inline:
                self._inline_shape(prepared.parts[name], shape, part_shape, raw[name])
        prepared.shapes.append(shape)
        got = shape.lookup(roots)
        assert got is not None, "a lead fits the shape traced from it"
        return {name: self._fill(prepared.parts[name], shape, ps, got) for name, ps in shape.parts.items()}

    def _inline_shape(self, part: _Part, shape: _Shape, part_shape: _PartShape, skeleton: str) -> None:
        """Inline the CSS of a shape's HTML once, and prove on awkward values that filling
        the inlined page gives what inlining each filled render would; when it does not,
        each render of this shape is inlined on its own."""
        page = _ascii(self._inline(skeleton, part.name), _NON_ASCII_BUT_MARKS)
        found = [(m.start(), int(m.group(1))) for m in _MARK.finditer(page)]
        if sorted(n for _, n in found) != sorted(part_shape.text.slots) or page.count(_OPEN) != len(found):
            return
        contexts = _contexts(page, [pos for pos, _ in found])
        if contexts is None:
            return
        candidate = _PartShape(
            text=part_shape.text,
            inlined=_Pieces(page),
            contexts=tuple((n, ctx) for (_, n), ctx in zip(found, contexts, strict=True)),
        )
        for probe in _PROBES:
            got = [probe] * len(shape.paths)
            filled = shape.inlined(candidate, got)
            if filled is None:
                continue  # such values go through the inliner one by one
            printed = shape.printed(got, part_shape.text.slots)
            if filled != self.inline_css(part_shape.text.fill(printed), source=part.name):
                if probe.strip(_HTML_SPACE):
                    return
                candidate.blank_safe = False
        part_shape.inlined, part_shape.contexts = candidate.inlined, candidate.contexts
        part_shape.blank_safe = candidate.blank_safe

    # -- checking --------------------------------------------------------------------------

    def check(
        self,
        *,
        leads: Iterable[Mapping[str, Any]] = (),
        sample_links: Links,
        lead_links: LinkMaker | None = None,
    ) -> list[Problem]:
        """Every problem in the templates that the sequences reference.

        Each referenced part must exist, compile, and render with the folder's sample
        leads (and every lead in ``leads``); every email must carry a subject, and the
        postal address and the unsubscribe link in both its parts.

        :param leads: real leads (as :func:`lead_context` makes them) to render too.
        :param sample_links: the links used for sample leads.
        :param lead_links: the links for a real lead (``sample_links`` when None).
        """
        problems: list[Problem] = []
        steps = [
            (tier, index, step)
            for tier, sequence in self.settings.sequences.items()
            for index, step in enumerate(sequence.steps)
        ]
        if not self.root.is_dir():
            return [Problem(str(self.root), "", "the templates folder does not exist")]
        if any(s.channel == Channel.EMAIL for _, _, s in steps) and not self.settings.sender.postal_address:
            problems.append(
                Problem(
                    str(self.settings.config_path or "config"),
                    "sender.postal_address",
                    "the business's postal address is required in every marketing email",
                )
            )
        ready: list[tuple[Tier, int, Step, list[dict[str, Any]]]] = []
        for tier, index, step in steps:
            step_problems = self._check_files(tier, index, step)
            samples, sample_problems = self._samples(step.template, tier.value)
            step_problems += sample_problems
            problems += step_problems
            if not step_problems:
                ready.append((tier, index, step, samples))
        for tier, index, step, samples in ready:
            for sample in samples:
                problems += self._check_render(tier, index, step, sample, sample_links, letters=True)
        if ready:
            failures: dict[Problem, list[str]] = {}
            for lead in leads:
                links = lead_links(lead) if lead_links is not None else sample_links
                for tier, index, step, _ in ready:
                    for problem in self._check_render(tier, index, step, dict(lead), links, letters=False):
                        failures.setdefault(problem, []).append(str(lead.get("email", "?")))
            for problem, emails in failures.items():
                problems.append(
                    Problem(problem.source, problem.where, f"{problem.reason} ({_some_leads(emails)})")
                )
        return _dedupe(problems)

    def check_or_raise(self, *, sample_links: Links) -> None:
        """Raise :class:`TemplateError` listing every problem :meth:`check` finds."""
        problems = self.check(sample_links=sample_links)
        if problems:
            raise TemplateError(problems)

    def steps_without_text(self) -> list[str]:
        """The email steps with no ``.txt.j2``, whose plain-text part is made from the HTML."""
        out = []
        for sequence in self.settings.sequences.values():
            for step in sequence.steps:
                name = f"{step.template}.txt.j2"
                if step.channel == Channel.EMAIL and not (self.root / name).is_file():
                    out.append(str(self.root / name))
        return sorted(set(out))

    def _check_files(self, tier: Tier, index: int, step: Step) -> list[Problem]:
        problems: list[Problem] = []
        if step.event is not None and step.event not in self.settings.events:
            problems.append(self._unknown_event(tier.value, index, step))
        for part in self.parts_for(step):
            name = f"{step.template}.{part}.j2"
            path = self.root / name
            if not path.is_file():
                if part == "txt":
                    continue  # made from the HTML
                problems.append(
                    Problem(str(path), "", f"missing: step {tier.value}/{step.id} needs this file")
                )
                continue
            try:
                self.template(name)
                _traceable(self.env, name)
            except jinja2.TemplateSyntaxError as exc:
                problems.append(_syntax_problem(self.root, exc))
            except jinja2.TemplateNotFound as exc:
                problems.append(Problem(str(path), "", f"template not found ({exc.name})"))
            else:
                if part == "html":
                    problems += _static_html_problems(path)
        return problems

    def _check_render(
        self,
        tier: Tier,
        index: int,
        step: Step,
        lead: dict[str, Any],
        links: Links,
        *,
        letters: bool,
    ) -> list[Problem]:
        """Render one step for one lead; the letter checks (which lay the page out, a costly
        thing) run for sample leads only."""
        try:
            rendered = self.render(lead=lead, tier=tier.value, step=step, index=index, links=links)
        except RenderError as exc:
            return [exc.problem]
        if step.channel == Channel.MAIL:
            if not letters:
                return []
            source = str(self.root / f"{step.template}.letter.html.j2")
            out: list[Problem] = []
            for check in self.letter_checks:
                out += check(step=step, tier=tier.value, lead=lead, html=rendered.html, source=source)
            return out
        return self._compliance(step, rendered, links)

    def _compliance(self, step: Step, rendered: Rendered, links: Links) -> list[Problem]:
        out: list[Problem] = []
        postal = _words(self.settings.sender.postal_address)
        html_words = _words(_html_text(rendered.html))
        html_hrefs = html_lib.unescape(rendered.html)
        text_source = f"{step.template}.{'html' if rendered.text_generated else 'txt'}.j2"
        for part, source, has_link, words in (
            ("HTML", f"{step.template}.html.j2", links.url in html_hrefs, html_words),
            ("plain-text", text_source, links.url in rendered.text, _words(rendered.text)),
        ):
            path = str(self.root / source)
            if not has_link:
                out.append(
                    Problem(
                        path,
                        "",
                        f"no unsubscribe link in the {part} part: include {{{{ unsubscribe_url }}}} "
                        "(the base layout does this for you)",
                    )
                )
            if postal and not _contains(words, postal):
                out.append(
                    Problem(
                        path,
                        "",
                        f"the sender's postal address is missing from the {part} part: include "
                        "{{ postal_address }} (the base layout does this for you)",
                    )
                )
        if not rendered.subject:
            out.append(Problem(str(self.root / f"{step.template}.subject.j2"), "", "the subject is empty"))
        return out

    def _samples(self, template: str, tier: str) -> tuple[list[dict[str, Any]], list[Problem]]:
        """The sample leads for ``template`` from the nearest ``sample.toml`` in its folder
        or above; the built-in sample lead when there is none."""
        folder = (self.root / template).parent
        path: Path | None = None
        while True:
            if (folder / SAMPLE_FILE).is_file():
                path = folder / SAMPLE_FILE
                break
            if folder == self.root or self.root not in folder.parents:
                break
            folder = folder.parent
        if path is None:
            return [_sample_lead({}, tier)], []
        return _load_samples(path, tier)


LinkMaker = Callable[[Mapping[str, Any]], Links]


# -- sample data --------------------------------------------------------------------------------

_SAMPLE_KEYS = frozenset({*LEAD_FIELDS, "name", "custom"})


def _sample_lead(fields: Mapping[str, Any], tier: str) -> dict[str, Any]:
    lead = {**SAMPLE_LEAD, "tier": tier, **fields}
    lead["custom"] = {**SAMPLE_LEAD.get("custom", {}), **fields.get("custom", {})}
    if "name" not in fields:
        lead["name"] = f"{lead['first_name']} {lead['last_name']}".strip()
    return lead


@functools.lru_cache(maxsize=64)
def _read_samples(path: Path, mtime_ns: int) -> tuple[tuple[dict[str, Any], ...], tuple[Problem, ...]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line 3, column 7)"; put the line where every problem has it.
        text = str(exc)
        found = re.search(r"\(at line (\d+), column \d+\)", text)
        where = f"line {found.group(1)}" if found else ""
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", text)
        return (), (Problem(str(path), where, f"not valid TOML: {reason}"),)
    except OSError as exc:
        return (), (Problem(str(path), "", f"cannot read: {exc.strerror or exc}"),)
    problems: list[Problem] = []
    unknown = sorted(set(data) - {"lead"})
    for key in unknown:
        problems.append(Problem(str(path), key, "unknown setting: sample leads are [[lead]] tables"))
    leads = data.get("lead", [])
    if not isinstance(leads, list) or not all(isinstance(x, dict) for x in leads):
        return (), (*problems, Problem(str(path), "lead", "write each sample lead as a [[lead]] table"))
    out: list[dict[str, Any]] = []
    for i, fields in enumerate(leads):
        bad = sorted(set(fields) - _SAMPLE_KEYS)
        for key in bad:
            problems.append(Problem(str(path), f"lead[{i}].{key}", "unknown lead field (check the spelling)"))
        if "custom" in fields and not isinstance(fields["custom"], dict):
            problems.append(Problem(str(path), f"lead[{i}].custom", "write custom fields as a table"))
        if not bad:
            out.append(_plain(fields))
    return tuple(out), tuple(problems)


def _load_samples(path: Path, tier: str) -> tuple[list[dict[str, Any]], list[Problem]]:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        return [], [Problem(str(path), "", f"cannot read: {exc.strerror or exc}")]
    fields, problems = _read_samples(path, mtime)
    if problems:
        return [], list(problems)
    return [_sample_lead(f, tier) for f in fields] or [_sample_lead({}, tier)], []


def _plain(value: Any) -> Any:
    """A deep copy with plain dicts and lists, which the sandbox reads fastest."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# -- plain text from HTML -----------------------------------------------------------------------


def html_to_text(html: str) -> str:
    """A plain-text part made from an HTML body, links written out, for steps without a
    ``.txt.j2``."""
    from inscriptis import get_text  # type: ignore[import-untyped]
    from inscriptis.css_profiles import CSS_PROFILES  # type: ignore[import-untyped]
    from inscriptis.model.config import ParserConfig  # type: ignore[import-untyped]

    config = ParserConfig(css=CSS_PROFILES["relaxed"], display_links=True)
    lines = [line.rstrip() for line in get_text(html, config).strip("\n").splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


# -- helpers -------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]+>")
_WORD = re.compile(r"\w+")
_HEAD = re.compile(r"<head\b.*?</head>", re.S | re.I)
_STYLESHEET_LINK = re.compile(r"<link\b[^>]*\brel\s*=\s*[\"']?stylesheet", re.I)


def _html_text(html: str) -> str:
    return html_lib.unescape(_TAG.sub(" ", _HEAD.sub(" ", html)))


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _contains(words: list[str], needle: list[str]) -> bool:
    """Whether ``needle`` appears in ``words`` as a run (punctuation and line breaks aside)."""
    if not needle:
        return True
    first, n = needle[0], len(needle)
    return any(words[i : i + n] == needle for i, w in enumerate(words) if w == first)


def _static_html_problems(path: Path) -> list[Problem]:
    problems = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(str(path), "", f"cannot read: {exc}")]
    for number, line in enumerate(lines, 1):
        if _STYLESHEET_LINK.search(line):
            problems.append(
                Problem(
                    str(path),
                    f"line {number}",
                    "a linked stylesheet is never loaded (nothing remote is fetched while "
                    "rendering): put the CSS in a <style> block",
                )
            )
    return problems


def _some_leads(emails: list[str]) -> str:
    shown = ", ".join(emails[:3])
    more = len(emails) - 3
    return (
        f"lead {shown}" if len(emails) == 1 else f"leads {shown}" + (f" and {more} more" if more > 0 else "")
    )


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _syntax_problem(root: Path, exc: jinja2.TemplateSyntaxError) -> Problem:
    source = exc.filename or str(root / (exc.name or "?"))
    kind = "syntax error" if type(exc) is jinja2.TemplateSyntaxError else "error"
    return Problem(source, f"line {exc.lineno}", f"{kind}: {exc.message}")


def _runtime_problem(root: Path, name: str, exc: BaseException) -> Problem:
    """Locate a render-time error in the template that raised it (which may be the base layout)."""
    source, line = str(root / name), 0
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            source, line = filename, tb.tb_lineno
        tb = tb.tb_next
    message = str(exc)
    if isinstance(exc, jinja2.UndefinedError):
        message = f"undefined variable: {message}"
        if "'event' is undefined" in message:
            message += (
                ' (this step names no event: add event = "<name>" to the step and describe '
                "the event under [events.<name>])"
            )
    elif isinstance(exc, jinja2.exceptions.SecurityError):
        message = f"not allowed in a template: {message}"
    elif isinstance(exc, _Untraceable):
        message = "internal error while tracing the template"
    else:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return Problem(source, f"line {line}" if line else "", message)


__all__ = [
    "EMAIL_PARTS",
    "MAIL_PARTS",
    "SAMPLE_LEAD",
    "Attachment",
    "LetterCheck",
    "RenderError",
    "Rendered",
    "Renderer",
    "ascii_html",
    "html_to_text",
    "lead_context",
    "make_environment",
]
