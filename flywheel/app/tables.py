"""Plain-text tables for the CLI: operators read these at a terminal."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from flywheel.registry import VersionRecord


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, header first."""
    table = [tuple(header)] + [tuple(str(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


@dataclass(frozen=True)
class Column:
    """One column of a registry listing: its header and how a version record fills it."""
    header: str
    cell: Callable[["VersionRecord"], str]


def utc_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def figure(value, digits: int = 4) -> str:
    """A training or gate figure with fixed digits; "-" where it was not measured."""
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def figure_column(header: str, name: str, digits: int = 4) -> Column:
    """The column of the figure ``name`` of every version's manifest."""
    return Column(header, lambda record: figure(record.figures.get(name), digits))


STATUS = Column("status", lambda record: record.status)
PARENT = Column("parent", lambda record: "-" if record.parent is None else f"v{record.parent}")
CREATED = Column("created (UTC)", lambda record: utc_time(record.created_at))


def format_registry_table(records: Sequence["VersionRecord"], current: int, columns: Sequence[Column], *,
                          base_model_row: bool = False) -> str:
    """A registry's versions, one row each: the version (the ``current`` one starred), then
    ``columns``. ``base_model_row`` puts version 0 first, the base model, which has no record."""
    def version(number: int) -> str:
        return f"v{number}" + (" *" if number == current else "")

    rows = [(version(0), *("base" if column is STATUS else "-" for column in columns))] if base_model_row else []
    rows += [(version(r.version), *(column.cell(r) for column in columns)) for r in records]
    return format_table(("version", *(column.header for column in columns)), rows)


def plain_text(doc: str) -> str:
    """A docstring as terminal text (a command's ``--help``): the reST/Markdown code marks removed."""
    return doc.replace("``", "").replace("`", "'")
