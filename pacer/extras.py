"""Optional dependencies (pyproject's extras): imported where they are used, or an error that says how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency a command needs is not installed; the message names the extra to install."""


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming `extra` (`pip install 'pacer[extra]'`)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(f"{needed_by} needs {module}, which is not installed here ({error}): "
                           f"pip install 'pacer[{extra}]' (in a checkout: pip install -e '.[{extra}]')") from error
