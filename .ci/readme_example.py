"""Print README.md's first runnable block (the one `.ci/wheel` runs from the installed wheel)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from runnable import ROOT, blocks

print(blocks(ROOT / "README.md")[0], end="")
