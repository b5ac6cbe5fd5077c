"""The code blocks of README.md and docs/ that claim to run: each follows a line ``<!-- runs -->``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^<!-- runs -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[str]:
    """The runnable Python blocks of ``path``, in order."""
    return _BLOCK.findall(path.read_text(encoding="utf-8"))
