"""``--setting NAME=V1,V2,...`` for the benchmark scripts: one npmask setting, several values to compare.

NAME is an attribute of :data:`npmask.config.settings` (``python -c "from npmask import config;
print(config.Settings.describe())"`` lists them), e.g. ``conv_chunk_floats=1048576,2097152`` or
``threads=1,2``; the values are Python literals (ast.literal_eval), checked by npmask.config.
"""
from __future__ import annotations

import ast
import contextlib

from npmask import config


def parse_setting(text: str):
    """'NAME=V1,V2' -> ('NAME', [V1, V2]); a clear SystemExit for an unknown name or a bad value."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values:
        raise SystemExit(f"expected NAME=V1,V2,... (NAME a setting of npmask.config), got {text!r}")
    if name not in config.settings.as_dict():
        raise SystemExit(f"npmask.config has no setting {name!r}; the settings are:\n"
                         f"{config.Settings.describe()}")
    try:
        parsed = [ast.literal_eval(v) for v in values.split(",")]
    except (ValueError, SyntaxError) as exc:
        raise SystemExit(f"values must be Python literals, got {values!r}: {exc}")
    try:
        for value in parsed:
            with config.using(**{name: value}):        # checks the value, changes nothing after
                pass
    except (TypeError, ValueError) as exc:
        raise SystemExit(str(exc))
    return name, parsed


@contextlib.contextmanager
def restored(name: str):
    """Context manager: setting ``name`` may be switched inside (``switch``); restored on exit."""
    with config.using(**{name: getattr(config.settings, name)}):
        yield


def switch(name: str, value) -> None:
    """Set npmask setting ``name`` to ``value`` (inside :func:`restored`)."""
    setattr(config.settings, name, value)
