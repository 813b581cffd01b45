"""Escaping text for markdown tables (which GitHub also renders raw HTML in)."""

from __future__ import annotations

import html
import math


def md_escape(value) -> str:
    """Table-cell safe: no HTML (GitHub renders raw tags), no pipes, no newlines."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = html.escape(str(value), quote=False)
    return text.replace("|", "\\|").replace("\n", " ")
