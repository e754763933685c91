"""Objects named ``"module:attribute"``, imported when first asked for: registries stay cheap to import."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(ref: str) -> Any:
    """The attribute named by ``ref`` (``"package.module:name"``), importing its module."""
    module_name, attribute = ref.split(":")
    return getattr(importlib.import_module(module_name), attribute)
