"""The distribution's metadata: what a real (non-editable) install holds."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package():
    """``packages =`` is explicit (``twisted.plugins`` has no ``__init__.py``
    and must not be found as a package of its own), so a new subpackage
    left out of it is missing from wheels and the Debian package."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("mtop", "climber")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), "add these to packages = in setup.cfg"
    assert "twisted.plugins" in listed
