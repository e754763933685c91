"""Run the README's loading snippets as written, pointed at a test run and image."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def run_snippet(marker: str, replacements: dict[str, str]) -> dict:
    """Execute the python block after ``<!-- marker -->``; return its namespace."""
    pattern = rf"<!-- {re.escape(marker)} -->\s*```python\n(.*?)```"
    code = re.search(pattern, README.read_text(), re.S).group(1)
    for old, new in replacements.items():
        assert old in code, f"{old!r} not in the README snippet {marker}"
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, f"README.md ({marker})", "exec"), namespace)
    return namespace
