"""What an operator meets at start, through real ``twistd`` processes: a
bad config or a missing SQLite database is one line on stderr and a
non-zero exit status (no usage text), ``--version`` names our version, and
a config's warnings are logged before anything binds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TWISTD, ClimberProcess, ServerProcess, climber_server_entry, subprocess_env
from mtop import __version__
from test_listen_failure_e2e import server_config


def twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
    )


def server_data(setup, **server: object) -> dict:
    """The e2e setup's minimal mtop.yaml (as `test_listen_failure_e2e` uses)."""
    return server_config(setup, **server)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """The run failed with ``expected`` as the one line it printed (to stderr)."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout
    assert result.stderr.splitlines() == [expected], result.stderr


@pytest.mark.parametrize("plugin", ["mtop", "climber"])
def test_a_bad_config_is_one_line_without_the_usage(run_twistd, tmp_path, plugin):
    config = tmp_path / f"{plugin}.yaml"
    config.write_text("server:\n  listen: 29643\n" if plugin == "mtop" else "socks5: {listen: 1080}\n")
    result = run_twistd(plugin, config, tmp_path)
    if plugin == "mtop":
        # The certificate is checked first; then the bare port.
        assert_one_line(result, f"twistd mtop: {config}: server.crt is required: the path of a PEM file")
    else:
        assert_one_line(
            result,
            f"twistd climber: {config}: socks5.listen: 1080 is a port without an address; write '0.0.0.0:1080' "
            "to listen on all interfaces or '127.0.0.1:1080' for this machine only",
        )


def test_a_bare_port_and_a_misspelled_key_stop_the_server(e2e_setup, run_twistd, tmp_path):
    config = write(tmp_path / "mtop.yaml", server_data(e2e_setup, listen=29643))
    result = run_twistd("mtop", config, tmp_path)
    assert_one_line(
        result,
        f"twistd mtop: {config}: server.listen: 29643 is a port without an address; write ':29643' to listen on "
        "all interfaces or '127.0.0.1:29643' for this machine only",
    )
    data = server_data(e2e_setup)
    data["server"]["lsten"] = data["server"].pop("listen")
    config = write(tmp_path / "mtop.yaml", data)
    result = run_twistd("mtop", config, tmp_path)
    assert_one_line(result, f"twistd mtop: {config}: server.lsten: unknown key; did you mean server.listen?")


def test_a_missing_sqlite_database_stops_the_server(e2e_setup, run_twistd, tmp_path):
    data = server_data(e2e_setup)
    data["db"]["dsn"] = "users.db"
    config = write(tmp_path / "mtop.yaml", data)
    result = run_twistd("mtop", config, tmp_path)
    assert_one_line(
        result,
        f"twistd mtop: {config}: db.dsn: the SQLite database {tmp_path / 'users.db'} does not exist; "
        f"create it with: mtopctl -c {config} db init",
    )


@pytest.mark.parametrize("plugin", ["mtop", "climber"])
def test_version(tmp_path, plugin):
    result = twistd(plugin, "--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{plugin} {__version__} (Twisted "), result.stdout
    assert "Python " in result.stdout and len(result.stdout.splitlines()) == 1


def _before(process, first: str, then: str) -> None:
    log = process.log().splitlines()
    (a,) = [i for i, line in enumerate(log) if first in line]
    (b,) = [i for i, line in enumerate(log) if then in line]
    assert a < b, process.describe()


def test_config_warnings_come_before_the_server_binds(e2e_setup, tmp_path):
    data = server_data(e2e_setup)
    data["colour"] = "blue"
    process = ServerProcess("warnings", write(tmp_path / "mtop.yaml", data), tmp_path)
    try:
        process.start()
        _before(process, "unknown key colour ignored", "MTop TLS listening on")
    finally:
        process.stop()


def test_config_warnings_come_before_climber_binds(e2e_setup, tmp_path):
    data = {
        "log": {"level": "info"},
        "socks5": {"listen": "127.0.0.1:0"},
        "colour": "blue",
        "servers": [climber_server_entry(9, e2e_setup)],
    }
    process = ClimberProcess("warnings", write(tmp_path / "climber.yaml", data), tmp_path)
    try:
        process.start()
        _before(process, "unknown key colour ignored", "SOCKS5 proxy listening on")
    finally:
        process.stop()
