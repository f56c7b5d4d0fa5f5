"""Code the README shows, run as the README shows it (a reader copies it: it must work)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

README = Path(__file__).parents[1] / "README.md"


def readme_function(name: str) -> Callable[..., Any]:
    """The function ``name`` defined in one of the README's ```python blocks."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if f"def {name}(" in b)
    namespace: dict[str, Any] = {}
    exec(compile(code, f"README.md ({name})", "exec"), namespace)  # noqa: S102 - the README's own snippet
    return namespace[name]  # type: ignore[no-any-return]
