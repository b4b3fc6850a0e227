"""docs/config.md names every field of configs/rl.py (nested ones by dotted name), so the doc cannot fall behind."""

import os

from configs import rl

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")
# Each environment's constructor arguments: documented with the environments (docs/tasks.md), not field by field.
PER_ENVIRONMENT = "env."


def _fields(d, prefix=""):
    for key, value in d.items():
        if hasattr(value, "items"):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_config_field_has_a_row():
    with open(DOC) as f:
        doc = f.read()
    fields = [f for f in _fields(rl.get_config()) if f == "env.name" or not f.startswith(PER_ENVIRONMENT)]
    missing = [f for f in fields if f"`{f}`" not in doc]
    assert not missing, f"docs/config.md has no row for: {', '.join(missing)}"
