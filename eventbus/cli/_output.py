"""What the ``eventbus`` command prints: lines, tables (with rich when installed), JSON documents, progress bars,
and the short forms of ages and counts people read at a glance."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from .._driver import redact_secrets

__all__ = ["Output", "Progress", "age", "count", "error", "first_line", "since"]


class Output:
    """Prints lines, tables (with rich when installed) and JSON documents."""

    def __init__(self, *, as_json: bool, dsn: str = "") -> None:
        self.as_json = as_json
        self.dsn = dsn  # its password (and any DSN password) never reaches the output
        self._console: Any = None
        self._rich_checked = False

    def line(self, text: str = "") -> None:
        print(redact_secrets(text, self.dsn), flush=True)

    def json(self, document: Any, *, compact: bool = False) -> None:
        encoded = msgspec.json.encode(document)
        text = (encoded if compact else msgspec.json.format(encoded, indent=2)).decode()
        print(redact_secrets(text, self.dsn), flush=True)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None) -> None:
        cells = [["" if value is None else redact_secrets(str(value), self.dsn) for value in row] for row in rows]
        widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
        console = self._rich()
        # rich only when the table fits: cells stay whole (people copy ids) and only the last column wraps.
        if console is not None and sum(widths[:-1]) + min(widths[-1], 20) + 3 * len(columns) <= console.width:
            from rich import box
            from rich.table import Table
            from rich.text import Text

            table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
            for name, width in zip(columns[:-1], widths, strict=False):
                table.add_column(name, no_wrap=True, min_width=width)
            table.add_column(columns[-1], overflow="fold", ratio=1)
            for row in cells:
                table.add_row(*(Text(value) for value in row))  # Text: no markup from stored data
            console.print(table)
            return
        if title:
            self.line(title)
        self.line("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        self.line("  ".join("-" * w for w in widths))
        for row in cells:
            self.line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())

    def _rich(self) -> Any:
        """A rich console for a terminal, else None: piped output stays plain, one row per line."""
        if not self._rich_checked:
            self._rich_checked = True
            if not sys.stdout.isatty():
                return None
            try:
                from rich.console import Console
            except ImportError:
                print("(tip: pip install 'eventbus[cli]' for nicer tables)", file=sys.stderr)
            else:
                self._console = Console(highlight=False)
        return self._console



def age(seconds: float | None) -> str:
    """A duration in words a person reads at a glance: ``4.2 s``, ``3 min 10 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def since(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return age((datetime.now(UTC) - moment).total_seconds()) + " ago"


def first_line(text: str | None, width: int = 60) -> str:
    lines = (text or "").strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[: width - 1] + "…"



class Progress:
    """A progress bar on a terminal (rich), else nothing; counts what a long operation has done."""

    def __init__(self, out: Output, label: str, total: int | None) -> None:
        self._bar: Any = None
        self._task: Any = None
        self.done = 0
        if out.as_json or not sys.stderr.isatty():
            return
        try:
            from rich.progress import Progress
        except ImportError:
            return
        self._bar = Progress(transient=True)
        self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)


def error(out: Output | None, message: str, *, code: int, kind: str) -> None:
    """Report a failed command: one line on standard error, or with ``--json`` a JSON document on standard output
    (``{"error": {"message", "type", "exit_code"}}``), so that a script reading the output can parse it too."""
    if out is not None and out.as_json:
        out.json({"error": {"message": message, "type": kind, "exit_code": code}}, compact=True)
    else:
        print(f"eventbus: error: {message}", file=sys.stderr)
