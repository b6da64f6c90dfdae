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


def test_debian_version_is_the_package_version():
    """debian/changelog's top entry names the version mtop says it is."""
    import mtop

    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"mtop ({mtop.__version__}) "), first


def test_units_run_twistd_from_the_bundled_environment_hardened():
    for unit, user in (("mtop", "mtop"), ("climber", "climber")):
        text = (ROOT / "etc" / "systemd" / f"{unit}.service").read_text()
        lines = set(text.splitlines())
        assert (
            f"ExecStart=/opt/venvs/mtop/bin/twistd --nodaemon --pidfile= --logfile=- {unit} "
            f"--config /etc/{unit}/{unit}.yaml"
        ) in lines
        for line in (f"User={user}", "NoNewPrivileges=yes", "ProtectSystem=strict", f"StateDirectory={unit}",
                     "AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"):
            assert line in lines, (unit, line)
        assert any(line.startswith("LimitNOFILE=") for line in lines)


def test_the_admin_unit_runs_the_admin_api_unprivileged():
    text = (ROOT / "etc" / "systemd" / "mtop-admin.service").read_text()
    lines = set(text.splitlines())
    assert "ExecStart=/opt/venvs/mtop/bin/twistd --nodaemon --pidfile= --logfile=- mtop-admin --config /etc/mtop/mtop.yaml" in lines
    for line in ("User=mtop", "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet="):
        assert line in lines, line
    assert "etc/systemd/mtop-admin.service lib/systemd/system/" in (ROOT / "debian" / "mtop.install").read_text()
