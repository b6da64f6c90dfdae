"""What one tunnel costs, counted rather than timed:
``python -m bench.count [--transport tls|quic] [--tunnels N]``.

Starts the origin, ``twistd mtop`` and one climber as `bench.run` does,
opens ``--tunnels`` tunnels (SOCKS5 connect + one 32-byte echo, 16 at a
time) twice, and prints per tunnel, for mtop and for climber:

* Python function calls (twistd's ``--profiler cprofile``: every call,
  builtins included), Deferreds made, and the functions with most calls;
* system calls by name (``strace -c -f`` attached for the second round;
  strace is Debian's package ``strace``).

Counts do not move with the machine's load the way CPU time does, so they
show a change on the per-tunnel path even on a busy machine.  The
``--top`` functions by own time (under the profiler, which inflates
short calls) say where the rest goes.
"""

from __future__ import annotations

import argparse
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path as FsPath

from bench import client, procs
from bench.client import Path

_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def _profiled_twistd(out: FsPath, names: list[str]):
    """A `procs.twistd_command` replacement that runs each twistd under
    cProfile, saving stats to ``out/<n>.prof`` (n in start order)."""
    plain = procs.twistd_command

    def command() -> list[str]:
        names.append(str(out / f"{len(names)}.prof"))
        return [*plain(), "--profiler=cprofile", "--savestats", f"--profile={names[-1]}"]

    return command


def python_calls(stats_path: str, tunnels: int, top: int) -> list[str]:
    stats = pstats.Stats(stats_path)
    calls = sum(entry[1] for entry in stats.stats.values())
    deferreds = sum(
        entry[1] for (path, _, name), entry in stats.stats.items() if name == "__init__" and path.endswith("twisted/internet/defer.py")
    )
    lines = [f"  Python calls per tunnel: {calls / tunnels:.0f}; Deferreds made: {deferreds / tunnels:.1f}"]
    busiest = sorted(stats.stats.items(), key=lambda item: -item[1][1])[:top]
    for (path, line, name), (_, count, own, cumulative, _) in busiest:
        short = path.split("site-packages/")[-1].split("lib/python3")[-1]
        lines.append(f"    {count / tunnels:6.1f} x {short}:{line}({name})")
    return lines


def syscalls(strace_output: str, tunnels: int) -> list[str]:
    counts = []
    for line in FsPath(strace_output).read_text().splitlines():
        match = _STRACE_LINE.match(line)
        if match and match.group(2) != "total":
            counts.append((int(match.group(1)), match.group(2)))
    counts.sort(reverse=True)
    total = sum(n for n, _ in counts)
    shown = ", ".join(f"{name} {n / tunnels:.1f}" for n, name in counts if n / tunnels >= 0.5)
    return [f"  system calls per tunnel: {total / tunnels:.1f} ({shown})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.count", description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("tls", "quic"), default="tls")
    parser.add_argument("--tunnels", type=int, default=2000)
    parser.add_argument("--top", type=int, default=15, help="functions with most calls to list")
    parser.add_argument("--keep", metavar="DIR", help="keep the profiles (mtop 0.prof, climber 1.prof) and strace outputs in DIR")
    args = parser.parse_args(argv)
    strace = shutil.which("strace")
    if strace is None:
        print("bench.count: strace is not installed: apt-get install strace", file=sys.stderr)
        return 2
    out = FsPath(args.keep) if args.keep else FsPath(tempfile.mkdtemp(prefix="mtop-count-"))
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    procs.raise_nofile_limit()
    ws = procs.Workspace()
    processes = procs.Processes()
    plain = procs.twistd_command
    procs.twistd_command = _profiled_twistd(out, names)
    try:
        ws.prepare()
        _, origin = procs.start_origin(processes, ws)
        mtop = procs.start_mtop(processes, ws, args.transport)
        climber = procs.start_climber(processes, ws, mtop, args.transport)
        path = Path("socks5", ("127.0.0.1", climber.socks5))
        echo = ("127.0.0.1", origin["echo"])
        for sock in client.open_idle(path, echo, 4, 2, 30):  # warm up
            sock.close()
        first = client.setup_rate(path, echo, args.tunnels, 16, 120)
        tracers = [
            subprocess.Popen([strace, "-c", "-f", "-o", str(out / f"{name}.strace"), "-p", str(pid)], stderr=subprocess.DEVNULL)
            for name, pid in (("mtop", mtop.process.pid), ("climber", climber.process.pid))
        ]
        time.sleep(1.0)  # attached
        second = client.setup_rate(path, echo, args.tunnels, 16, 120)
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        # The profiles are written when the processes stop.
        processes.stop_all()
        warm = 4
        print(f"{args.transport}: {first.done + second.done} tunnels ({first.failed + second.failed} failed)")
        for name, stats_path in (("mtop", names[0]), ("climber", names[1])):
            print(f"{name}:")
            for line in python_calls(stats_path, first.done + second.done + warm, args.top):
                print(line)
            for line in syscalls(str(out / f"{name}.strace"), second.done):
                print(line)
    finally:
        procs.twistd_command = plain
        processes.stop_all()
        ws.cleanup()
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
