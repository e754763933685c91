"""Run the documentation's snippets as written: the loading snippets (pointed at a test run and
image) and every block marked runnable."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def snippet(marker: str, language: str = "python") -> str:
    """The code block right after ``<!-- marker -->`` in the README or a docs page."""
    pattern = rf"<!-- {re.escape(marker)} -->\s*```{language}\n(.*?)```"
    for page in PAGES:
        found = re.search(pattern, page.read_text(), re.S)
        if found:
            return found.group(1)
    raise AssertionError(f"no block marked {marker!r} in the README or docs/")


def runnable_blocks() -> list[tuple[str, str]]:
    """(page, bash code) of every block marked ``<!-- runnable -->``."""
    pattern = r"<!-- runnable -->\s*```bash\n(.*?)```"
    return [(str(page.relative_to(ROOT)), code)
            for page in PAGES for code in re.findall(pattern, page.read_text(), re.S)]


def run_snippet(marker: str, replacements: dict[str, str]) -> dict:
    """Execute the python block after ``<!-- marker -->``; return its namespace."""
    code = snippet(marker)
    for old, new in replacements.items():
        assert old in code, f"{old!r} not in the snippet {marker}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, f"snippet {marker}", "exec"), namespace)
    return namespace
