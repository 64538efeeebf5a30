"""The one exception hierarchy of campaignd.

Every message is written for the operator: the CLI prints it as it is, without a
traceback, and exits non-zero. Imports nothing from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


class CampaigndError(Exception):
    """campaignd stopped on an unexpected error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or self.__class__.__name__)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file: where it is and why it is wrong.

    :param source: the file (config, template, CSV) the problem is in.
    :param where: a config key (``sequences.cold.steps[2].delay``) or ``line 12``.
    :param reason: what is wrong, in words an operator can act on.
    """

    source: str
    where: str
    reason: str

    def __str__(self) -> str:
        if self.where:
            return f"{self.source}: {self.where}: {self.reason}"
        return f"{self.source}: {self.reason}"


class ProblemsError(CampaigndError):
    """Input that carries one or more located problems."""

    headline = "problems found"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = [f"{len(problems)} {self.headline}:"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


class ConfigError(ProblemsError):
    """The configuration is invalid."""

    headline = "configuration problem(s)"


class TemplateError(ProblemsError):
    """A template is broken."""

    headline = "template problem(s)"


class DatabaseError(CampaigndError):
    """The database cannot be used."""


class DatabaseNotAtHead(DatabaseError):
    """The database schema is not at the latest revision."""


class AlreadyRunning(CampaigndError):
    """Another campaignd daemon already uses this database."""


class UnknownLead(CampaigndError):
    """No lead with that email address."""


class ImportFileError(CampaigndError):
    """The lead file cannot be read at all."""


class DeliveryError(CampaigndError):
    """A message could not be handed to its channel."""


class PrintError(CampaigndError):
    """A print batch could not be made."""


class ExportBusy(CampaigndError):
    """Another print batch export is running."""
