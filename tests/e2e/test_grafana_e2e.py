"""etc/grafana/mtop.json: a valid dashboard whose every query names
metrics that a running mtop and climber really serve (scraped here, with
a tunnel's traffic so that counters have samples)."""

from __future__ import annotations

import json
import re

from conftest import ROOT
from peers import echo
from test_climber_e2e import socks5_request
from test_hardening_e2e import scrape, start_server  # noqa: F401 (a fixture)

DASHBOARD = ROOT / "etc" / "grafana" / "mtop.json"


def test_the_dashboard_queries_metrics_that_exist(start_server, make_climber, make_target):  # noqa: F811
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    server = start_server('metrics:\n  listen: "127.0.0.1:0"\n  per_user: true\n' + 'acl:\n  allow: ["127.0.0.0/8"]\n')
    server_port = int(server.wait_for(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+)", 10).group(1))
    climber = make_climber([server], http=False, metrics={"listen": "127.0.0.1:0"})
    climber_port = int(climber.wait_for(r"Prometheus metrics listening on 127\.0\.0\.1:(\d+)", 10).group(1))
    target = make_target(echo)
    sock, reply = socks5_request(climber.socks5_port, "127.0.0.1", target.port)
    assert reply[1] == 0
    sock.sendall(b"x" * 100)
    sock.recv(100)
    sock.close()
    server.wait_for(r"tunnel \S+: client=", 10)  # a finished tunnel: outcome counters have a sample
    climber.wait_for(r"socks5 tunnel \S+: ", 10)
    served = {re.sub(r"\{.*", "", name) for name in {**scrape(server_port), **scrape(climber_port)}}
    wanted = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target_query in panel["targets"]:
            wanted |= set(re.findall(r"(?<![$\w])((?:mtop|climber)_[a-z_]+)\b", target_query["expr"]))
    for variable in dashboard["templating"]["list"]:
        wanted |= set(re.findall(r"(?<![$\w])((?:mtop|climber)_[a-z_]+)\b", variable.get("query", "") if isinstance(variable.get("query"), str) else ""))
    missing = sorted(name for name in wanted if name not in served)
    assert not missing, f"the dashboard queries metrics nobody serves: {missing}"
    assert len(wanted) >= 12
