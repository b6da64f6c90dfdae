"""The benchmark run: ``python -m bench`` (``make bench``).

Starts on loopback an origin, the plain relay, two ``twistd mtop`` (one
serving TLS, on twistd's default reactor as the shipped config runs; one
serving QUIC, on the asyncio reactor it installs for it) and two ``twistd
climber`` (one through each; SOCKS5 and HTTP front ends each), then
measures, each ``--repeat`` times (interleaved, so a change in the
machine's load hits every path alike), and reports medians:

* one tunnel's download and upload MB/s, through SOCKS5 and HTTP CONNECT,
  over TLS and over QUIC, against direct (client to origin) and the relay;
* 8 parallel downloads, aggregate MB/s;
* setup rate: 1,000 connections, 16 at a time, each with one 32-byte echo
  round trip; per second, with p50/p99 latency;
* the same one-tunnel transfers and setup rate over WebSocket (``wss``);
* RSS per idle tunnel of mtop and climber at 2,000 idle tunnels (fresh
  processes each time).

Every figure is also shown as a ratio to the direct baseline of the same
run.  ``--json`` writes everything, ``--png`` draws the ratios (needs
matplotlib, which is optional).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bench import client, procs
from bench.client import Path

MiB = 1 << 20


@dataclass
class Context:
    args: argparse.Namespace
    ws: procs.Workspace
    processes: procs.Processes
    origin: dict[str, int]
    relay_port: int = 0
    #: The server of each transport (``tls`` also serves route ``mtop``).
    servers: dict[str, procs.Mtop] = field(default_factory=dict)
    climbers: dict[str, procs.Climber] = field(default_factory=dict)

    def target(self, service: str) -> tuple[str, int]:
        return ("127.0.0.1", self.origin[service])

    def cpu(self, route: str) -> dict[str, float]:
        """CPU seconds so far of the processes a route goes through."""
        if route == "mtop":
            return {"mtop": client.cpu_seconds(self.servers["tls"].process.pid)}
        if route not in self.climbers:
            return {}
        return {
            "mtop": client.cpu_seconds(self.servers[route].process.pid),
            "climber": client.cpu_seconds(self.climbers[route].process.pid),
        }

    def path(self, route: str, front: str = "socks5") -> Path:
        if route == "direct":
            return Path("direct")
        if route == "relay":
            return Path("socks5", ("127.0.0.1", self.relay_port))
        if route == "mtop":
            login = client.MtopLogin(str(self.ws.dir / "certs" / "ca.crt"), procs.USER, self.ws.password)
            return Path("mtop", ("127.0.0.1", self.servers["tls"].port), login)
        climber = self.climbers[route]
        return Path(front, ("127.0.0.1", climber.socks5 if front == "socks5" else climber.http))


@dataclass(frozen=True)
class Measurement:
    """One figure.  ``run`` returns {metric: value}; ``baseline`` names the
    measurement its ratios are taken against."""

    name: str
    description: str
    run: Callable[[Context], dict[str, float]]
    units: dict[str, str]
    baseline: str | None = None
    needs: tuple[str, ...] = ()  # long-lived processes: "relay", "tls", "quic", "wss"


def _transfer(route: str, front: str, direction: str) -> Callable[[Context], dict[str, float]]:
    def run(ctx: Context) -> dict[str, float]:
        service = "source" if direction == "download" else "sink"
        before = ctx.cpu(route)
        moved, elapsed = client.transfer(ctx.path(route, front), ctx.target(service), direction, ctx.args.size, ctx.args.seconds)
        return {"MB/s": moved / elapsed / 1e6, **_cpu_per(ctx, route, before, moved / 1e9, "s/GB")}

    return run


def _cpu_per(ctx: Context, route: str, before: dict[str, float], amount: float, unit: str) -> dict[str, float]:
    """CPU time each process of ``route`` spent since ``before``, per
    ``amount`` (GB moved, thousands of tunnels): a figure the machine's
    other load disturbs much less than a rate."""
    after = ctx.cpu(route)
    return {f"{name} CPU {unit}": (after[name] - before[name]) / amount for name in before}


def _parallel(route: str) -> Callable[[Context], dict[str, float]]:
    def run(ctx: Context) -> dict[str, float]:
        before = ctx.cpu(route)
        moved, elapsed = client.parallel_download(ctx.path(route), ctx.target("source"), ctx.args.streams, ctx.args.size, ctx.args.seconds)
        return {"MB/s": moved / elapsed / 1e6, **_cpu_per(ctx, route, before, moved / 1e9, "s/GB")}

    return run


def _setup(route: str) -> Callable[[Context], dict[str, float]]:
    def run(ctx: Context) -> dict[str, float]:
        before = ctx.cpu(route)
        result = client.setup_rate(ctx.path(route), ctx.target("echo"), ctx.args.tunnels, ctx.args.concurrency, ctx.args.setup_seconds)
        if result.failed:
            print(f"  ({result.failed} of {result.done + result.failed} connections failed)", file=sys.stderr)
        return {
            "per s": result.rate, "p50 ms": result.p50_ms, "p99 ms": result.p99_ms,
            **_cpu_per(ctx, route, before, result.done / 1000, "ms/tunnel"),
        }

    return run


def _idle_rss(route: str, used: bool = False) -> Callable[[Context], dict[str, float]]:
    """Fresh mtop and climber, warmed up; VmRSS before and after opening
    ``--idle`` tunnels to the echo; KiB per tunnel.  With ``used``, a
    tenth as many tunnels each echo ``--used-bytes`` first (8 at a time),
    then all rest for ``--used-rest`` seconds before the reading: what a
    tunnel that has carried traffic keeps once it is idle."""

    def run(ctx: Context) -> dict[str, float]:
        mtop = procs.start_mtop(ctx.processes, ctx.ws, route)
        climber = procs.start_climber(ctx.processes, ctx.ws, mtop, route)
        try:
            path = Path("socks5", ("127.0.0.1", climber.socks5))
            # Warm up: lazily built things (thread pool, auth cache, TLS
            # session, QUIC connection) exist before the first reading.
            warm = client.open_idle(path, ctx.target("echo"), 32, 16, 30)
            for sock in warm:
                sock.close()
            time.sleep(1.0)
            before = client.rss_kib(mtop.process.pid), client.rss_kib(climber.process.pid)
            wanted = max(ctx.args.idle // 10, 1) if used else ctx.args.idle
            opened = client.open_idle(path, ctx.target("echo"), wanted, ctx.args.concurrency, 120)
            try:
                if used:
                    echoed = client.echo_each(opened, ctx.args.used_bytes, 8, ctx.args.setup_seconds)
                    if echoed < len(opened):
                        print(f"  (only {echoed} of {len(opened)} tunnels echoed {ctx.args.used_bytes} bytes)", file=sys.stderr)
                time.sleep(ctx.args.used_rest if used else 1.0)
                after = client.rss_kib(mtop.process.pid), client.rss_kib(climber.process.pid)
            finally:
                for sock in opened:
                    sock.close()
            if len(opened) < wanted:
                print(f"  (only {len(opened)} of {wanted} idle tunnels opened)", file=sys.stderr)
            n = max(len(opened), 1)
            return {
                "mtop KiB": (after[0] - before[0]) / n,
                "climber KiB": (after[1] - before[1]) / n,
                "tunnels": float(len(opened)),
            }
        finally:
            ctx.processes.stop(climber.process)
            ctx.processes.stop(mtop.process)

    return run


def _units(route: str, main: str, cpu_unit: str) -> dict[str, str]:
    units = {main: main}
    if route in ("tls", "quic", "wss", "mtop"):
        units[f"mtop CPU {cpu_unit}"] = cpu_unit
    if route in ("tls", "quic", "wss"):
        units[f"climber CPU {cpu_unit}"] = cpu_unit
    return units


def _measurements() -> list[Measurement]:
    items: list[Measurement] = []
    routes = (("direct", "direct"), ("relay", "plain relay (SOCKS5)"), ("tls", "TLS tunnel"), ("quic", "QUIC tunnel"))
    for direction in ("download", "upload"):
        for route, label in routes:
            fronts = ("socks5", "http") if route in ("tls", "quic") else ("socks5",)
            for front in fronts:
                name = f"{route}-{direction}" if front == "socks5" else f"{route}-http-{direction}"
                via = " via HTTP CONNECT" if front == "http" else (" via SOCKS5" if route in ("tls", "quic") else "")
                items.append(
                    Measurement(
                        name, f"one {label}{via}, {direction}", _transfer(route, front, direction), _units(route, "MB/s", "s/GB"),
                        None if route == "direct" else f"direct-{direction}",
                        () if route == "direct" else (route,),
                    )
                )
    # WebSocket over TLS (climber's type: wss straight to a wss listener):
    # one tunnel each way and the setup rate.
    wss_label = "WebSocket (wss) tunnel"
    for direction in ("download", "upload"):
        items.append(
            Measurement(
                f"wss-{direction}", f"one {wss_label} via SOCKS5, {direction}", _transfer("wss", "socks5", direction),
                _units("wss", "MB/s", "s/GB"), f"direct-{direction}", ("wss",),
            )
        )
    items.append(
        Measurement(
            "wss-setup", f"setup + 32-byte echo, {wss_label}", _setup("wss"),
            {**_units("wss", "per s", "ms/tunnel"), "p50 ms": "ms", "p99 ms": "ms"}, "direct-setup", ("wss",),
        )
    )
    # The server alone: a client speaking MTop over TLS itself, no climber.
    server_only = ("mtop", "MTop client straight to mtop (TLS, no climber)")
    items.append(
        Measurement(
            "mtop-download", f"one {server_only[1]}, download", _transfer("mtop", "mtop", "download"),
            _units("mtop", "MB/s", "s/GB"), "direct-download", ("mtop",),
        )
    )
    for route, label in (*routes, server_only):
        items.append(
            Measurement(
                f"{route}-parallel8", f"8 x {label}, download aggregate", _parallel(route), _units(route, "MB/s", "s/GB"),
                None if route == "direct" else "direct-parallel8", () if route == "direct" else (route,),
            )
        )
    for route, label in (*routes, server_only):
        items.append(
            Measurement(
                f"{route}-setup", f"setup + 32-byte echo, {label}", _setup(route),
                {**_units(route, "per s", "ms/tunnel"), "p50 ms": "ms", "p99 ms": "ms"},
                None if route == "direct" else "direct-setup", () if route == "direct" else (route,),
            )
        )
    for route in ("tls", "quic"):
        items.append(
            Measurement(
                f"{route}-idle-rss", f"RSS per idle {route.upper()} tunnel", _idle_rss(route),
                {"mtop KiB": "KiB", "climber KiB": "KiB", "tunnels": ""},
            )
        )
    for route in ("tls", "quic"):
        items.append(
            Measurement(
                f"{route}-used-idle-rss", f"RSS per idle {route.upper()} tunnel that has echoed --used-bytes",
                _idle_rss(route, used=True), {"mtop KiB": "KiB", "climber KiB": "KiB", "tunnels": ""},
            )
        )
    return items


MEASUREMENTS = _measurements()
BY_NAME = {m.name: m for m in MEASUREMENTS}

#: The issue's targets: (measurement, metric, "ratio" or "value", op, bound).
TARGETS = [
    ("tls-download", "MB/s", "ratio", ">=", 0.17),
    ("tls-upload", "MB/s", "ratio", ">=", 0.17),
    ("tls-parallel8", "MB/s", "ratio", ">=", 0.17),
    ("tls-setup", "per s", "ratio", ">=", 0.25),
    ("tls-setup", "p99 ms", "ratio", "<=", 3.0),
    ("tls-setup", "mtop CPU ms/tunnel", "value", "<=", 0.6),
    ("tls-setup", "climber CPU ms/tunnel", "value", "<=", 0.6),
    ("quic-download", "MB/s", "ratio", ">=", 0.04),
    ("quic-upload", "MB/s", "ratio", ">=", 0.04),
    ("quic-setup", "per s", "ratio", ">=", 0.25),
    ("tls-idle-rss", "mtop KiB", "value", "<=", 16.0),
    ("quic-idle-rss", "mtop KiB", "value", "<=", 10.0),
]


def select(patterns: list[str] | None) -> list[Measurement]:
    """The measurements matching ``patterns`` (globs or exact names), with
    the baselines they need, in the canonical order."""
    if not patterns:
        return list(MEASUREMENTS)
    wanted = set()
    for pattern in patterns:
        matched = [m.name for m in MEASUREMENTS if fnmatch.fnmatchcase(m.name, pattern)]
        if not matched:
            raise SystemExit(f"bench: --only {pattern!r} matches nothing; names: {', '.join(BY_NAME)}")
        wanted.update(matched)
    for name in list(wanted):
        baseline = BY_NAME[name].baseline
        if baseline:
            wanted.add(baseline)
    return [m for m in MEASUREMENTS if m.name in wanted]


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "loadavg_at_start": os.getloadavg(),
    }


def warm_up(ctx: Context) -> None:
    """One tunnel through each front end (full handshake, scrypt, QUIC
    connection), so the first measurement is not the one paying them."""
    paths = [ctx.path(route, front) for route in ctx.climbers for front in ("socks5", "http")]
    if "tls" in ctx.servers:
        paths.append(ctx.path("mtop"))
    for path in paths:
        with path.open(ctx.target("echo")) as sock:
            client.echo_once(sock, b"warm-up" * 4)


def run(args: argparse.Namespace) -> dict[str, Any]:
    host = machine()  # before the run loads the machine
    chosen = select(args.only)
    needs = {n for m in chosen for n in m.needs}
    limit = procs.raise_nofile_limit()
    if any(m.name.endswith("idle-rss") for m in chosen) and limit < 2 * args.idle + 200:
        print(f"bench: RLIMIT_NOFILE is {limit}; {args.idle} idle tunnels may not all open", file=sys.stderr)
    ws = procs.Workspace(
        keep=args.keep, quic_packet_size=args.quic_packet_size, workers=args.workers, quic_backend=args.quic_backend
    )
    processes = procs.Processes()
    results: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in m.units} for m in chosen}
    started = time.time()
    try:
        ws.prepare()
        _, origin = procs.start_origin(processes, ws)
        ctx = Context(args, ws, processes, origin)
        if "relay" in needs:
            _, ctx.relay_port = procs.start_relay(processes, ws)
        for transport in ("tls", "quic", "wss"):
            if transport in needs or (transport == "tls" and "mtop" in needs):
                ctx.servers[transport] = procs.start_mtop(processes, ws, transport)
            if transport in needs:
                ctx.climbers[transport] = procs.start_climber(processes, ws, ctx.servers[transport], transport)
        warm_up(ctx)
        for repeat in range(args.repeat):
            for m in chosen:
                print(f"[{repeat + 1}/{args.repeat}] {m.name} ...", end="", flush=True, file=sys.stderr)
                t0 = time.monotonic()
                values = m.run(ctx)
                for key, value in values.items():
                    results[m.name][key].append(value)
                shown = ", ".join(f"{v:.3g} {k}" for k, v in values.items())
                print(f" {shown} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
                time.sleep(args.pause)
    finally:
        processes.stop_all()
        ws.cleanup()
    return report(args, chosen, results, started, host)


def report(
    args: argparse.Namespace, chosen: list[Measurement], results: dict, started: float, host: dict[str, Any]
) -> dict[str, Any]:
    medians = {name: {k: statistics.median(v) for k, v in metrics.items() if v} for name, metrics in results.items()}
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": {**host, "loadavg_at_end": os.getloadavg()},
        "settings": {
            k: getattr(args, k)
            for k in ("repeat", "size", "seconds", "streams", "tunnels", "concurrency", "idle", "used_bytes", "used_rest",
                      "quic_packet_size", "workers", "quic_backend")
        },
        "results": {},
        "targets": [],
    }
    for m in chosen:
        entry = {}
        for key, values in results[m.name].items():
            if not values:
                continue
            item = {"median": medians[m.name][key], "values": values, "unit": m.units[key]}
            base = results.get(m.baseline or "", {}).get(key)
            if base and len(base) == len(values) and all(base):
                # Each run against the baseline of the same repeat (measured
                # seconds apart), then the median: the machine's load drifts
                # between repeats far more than within one.
                item["ratios"] = [v / b for v, b in zip(values, base)]
                item["ratio"] = statistics.median(item["ratios"])
            entry[key] = item
        out["results"][m.name] = {"description": m.description, "baseline": m.baseline, "metrics": entry}
    for name, key, kind, op, bound in TARGETS:
        item = out["results"].get(name, {}).get("metrics", {}).get(key)
        if item is None or (kind == "ratio" and "ratio" not in item):
            continue
        value = item["ratio"] if kind == "ratio" else item["median"]
        met = value >= bound if op == ">=" else value <= bound
        out["targets"].append({"measurement": name, "metric": key, "kind": kind, "op": op, "bound": bound, "value": value, "met": met})
    return out


def _figure(value: float) -> str:
    """One decimal, or two below 10 (CPU milliseconds per tunnel, where
    a tenth is a sixth of the figure)."""
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def table(out: dict[str, Any]) -> str:
    rows = [("measurement", "metric", "median", "ratio", "runs", "target")]
    targets = {(t["measurement"], t["metric"]): t for t in out["targets"]}
    for name, entry in out["results"].items():
        for key, item in entry["metrics"].items():
            if key == "tunnels":
                continue
            ratio = f"{item['ratio']:.3f}" if "ratio" in item else ""
            runs = " ".join(_figure(v) for v in item["values"])
            t = targets.get((name, key))
            goal = ""
            if t:
                what = "ratio" if t["kind"] == "ratio" else item["unit"]
                goal = f"{what} {t['op']} {t['bound']:g}: {'met' if t['met'] else 'NOT met'}"
            rows.append((name, f"{key}", _figure(item["median"]), ratio, runs, goal))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (
        f"MTop benchmark {out['date']}, {out['machine']['cpus']} CPUs ({out['machine']['cpu']}), "
        f"Python {out['machine']['python']}, {out['settings']['repeat']} runs each; median, and median of the ratios "
        "of each run to the direct run of the same repeat"
    )
    return head + "\n" + "\n".join(lines)


def draw(out: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench: --png needs matplotlib, which is not installed (it is optional): "
            ".venv/bin/pip install matplotlib (or pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return
    labels, ratios = [], []
    for name, entry in out["results"].items():
        for key, item in entry["metrics"].items():
            if "ratio" in item:
                labels.append(f"{name} {key}")
                ratios.append(item["ratio"])
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.5))
    ax.barh(labels[::-1], ratios[::-1])
    # The ratio targets, as a red tick on their bars.
    for t in out["targets"]:
        label = f"{t['measurement']} {t['metric']}"
        if t["kind"] == "ratio" and label in labels:
            row = len(labels) - 1 - labels.index(label)
            ax.plot([t["bound"]] * 2, [row - 0.4, row + 0.4], color="red", linewidth=2)
    ax.set_xscale("log")
    ax.set_xlabel("ratio to direct (same run), log scale; red: target")
    ax.set_title(f"MTop benchmark {out['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"bench: chart written to {path}", file=sys.stderr)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=lambda s: [p for p in s.split(",") if p], action="extend",
                        help="comma-separated measurement names or globs (e.g. tls-download, 'tls-*'); "
                        "the baselines they need are added")
    parser.add_argument("--list", action="store_true", help="list the measurements and exit")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the median is reported (3)")
    parser.add_argument("--json", metavar="FILE", help="write all figures, runs and settings as JSON")
    parser.add_argument("--png", metavar="FILE", help="draw the ratios (needs matplotlib)")
    parser.add_argument("--size", type=int, default=4096 * MiB, help="bytes per transfer at most (4 GiB)")
    parser.add_argument("--seconds", type=float, default=2.5, help="seconds per transfer at most (2.5)")
    parser.add_argument("--streams", type=int, default=8, help="parallel tunnels (8)")
    parser.add_argument("--tunnels", type=int, default=1000, help="connections per setup-rate run (1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections opened at once (16)")
    parser.add_argument("--setup-seconds", type=float, default=60.0, help="seconds per setup-rate run at most (60)")
    parser.add_argument("--idle", type=int, default=2000, help="idle tunnels for the RSS figure (2000)")
    parser.add_argument("--used-bytes", type=int, default=MiB,
                        help="bytes each tunnel echoes before the used-idle RSS reading (1 MiB)")
    parser.add_argument("--used-rest", type=float, default=15.0,
                        help="seconds the used tunnels rest before that reading (15)")
    parser.add_argument("--quic-packet-size", type=int, default=1350, help="QUIC packet size, both ends (1350, the default)")
    parser.add_argument(
        "--quic-backend", choices=("auto", "qh3", "aioquic"), default="auto",
        help="QUIC library, both ends (quic.backend; auto: qh3 when installed)",
    )
    parser.add_argument("--workers", type=int, default=1, help="mtop's server.workers (1); CPU and RSS figures add up its workers")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between measurements (0.5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        for m in MEASUREMENTS:
            print(f"{m.name:22} {m.description}")
        return 0

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        out = run(args)
    except KeyboardInterrupt:
        print("\nbench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(table(out))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"bench: results written to {args.json}", file=sys.stderr)
    if args.png:
        draw(out, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
