"""Profile mtop and climber with py-spy during one load:
``python -m bench.profile [download|upload|parallel|setup|idle] [--transport tls|quic]``.

Starts the origin, ``twistd mtop`` and one climber as `bench.run` does,
then runs ``py-spy record`` on both processes while the load runs (bounded
by ``--seconds``) and writes ``mtop-<load>.svg`` and ``climber-<load>.svg``
(flame graphs; ``--format speedscope`` or ``raw`` for others) in ``--out``.
py-spy is not a dependency: ``.venv/bin/pip install py-spy``.

``--perf`` samples with Linux ``perf record`` instead (Debian's package
``linux-perf``) and prints, for each process, where its CPU went by
shared object: the Python interpreter, OpenSSL (inside ``cryptography``'s
``_rust`` module), libc (malloc), the kernel; ``perf report -i
<out>/<name>-<load>.perf`` shows the rest.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path as FsPath

from bench import client, procs
from bench.client import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("load", choices=("download", "upload", "parallel", "setup", "idle"), nargs="?", default="download")
    parser.add_argument("--transport", choices=("tls", "quic"), default="tls")
    parser.add_argument("--front", choices=("socks5", "http"), default="socks5")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--format", default="flamegraph", help="py-spy output format (flamegraph, speedscope, raw)")
    parser.add_argument("--out", default="bench/results/profile")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--perf", action="store_true", help="sample with Linux perf and print the CPU by shared object")
    args = parser.parse_args(argv)
    if args.perf:
        spy = shutil.which("perf") or ""
        missing = "perf is not installed: apt-get install linux-perf"
    else:
        spy = shutil.which("py-spy") or str(FsPath(sys.executable).parent / "py-spy")
        missing = "py-spy is not installed: .venv/bin/pip install py-spy"
    if not spy or not FsPath(spy).exists():
        print(f"bench.profile: {missing}", file=sys.stderr)
        return 2
    out = FsPath(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs.raise_nofile_limit()
    ws = procs.Workspace()
    processes = procs.Processes()
    spies: list[subprocess.Popen] = []
    try:
        ws.prepare()
        _, origin = procs.start_origin(processes, ws)
        mtop = procs.start_mtop(processes, ws, args.transport)
        climber = procs.start_climber(processes, ws, mtop, args.transport)
        path = Path(args.front, ("127.0.0.1", climber.socks5 if args.front == "socks5" else climber.http))
        echo = ("127.0.0.1", origin["echo"])
        for sock in client.open_idle(path, echo, 4, 2, 30):
            sock.close()
        ext = {"flamegraph": "svg", "speedscope": "json"}.get(args.format, "txt")
        label = f"{args.transport}-{args.load}"
        for name, pid in (("mtop", mtop.process.pid), ("climber", climber.process.pid)):
            if args.perf:
                spies.append(subprocess.Popen(
                    [spy, "record", "-F", "2000", "-p", str(pid), "-o", str(out / f"{name}-{label}.perf"),
                     "--", "sleep", str(int(args.seconds) + 1)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
                continue
            spies.append(subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration", str(int(args.seconds) + 1),
                 "--format", args.format, "--output", str(out / f"{name}-{label}.{ext}"),
                 # py-spy reads native stacks only while the process is
                 # stopped; otherwise it samples without stopping it.
                 *(["--native"] if args.native else ["--nonblocking"])],
                stdout=subprocess.DEVNULL,
            ))
        time.sleep(0.5)
        if args.load in ("download", "upload"):
            service = "source" if args.load == "download" else "sink"
            moved, elapsed = client.transfer(path, ("127.0.0.1", origin[service]), args.load, 1 << 40, args.seconds)
            print(f"{label}: {moved / elapsed / 1e6:.1f} MB/s while profiled")
        elif args.load == "parallel":
            moved, elapsed = client.parallel_download(path, ("127.0.0.1", origin["source"]), 8, 1 << 40, args.seconds)
            print(f"{label}: 8 tunnels, {moved / elapsed / 1e6:.1f} MB/s together while profiled")
        elif args.load == "setup":
            result = client.setup_rate(path, echo, 1_000_000, 16, args.seconds)
            print(f"{label}: {result.rate:.1f} tunnels/s, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms while profiled")
        else:
            opened = client.open_idle(path, echo, 2000, 16, args.seconds)
            print(f"{label}: {len(opened)} idle tunnels opened while profiled")
            for sock in opened:
                sock.close()
        for spy_process in spies:
            spy_process.wait(timeout=60)
        if args.perf:
            for name in ("mtop", "climber"):
                print(f"{name}: CPU by shared object")
                print(perf_by_object(spy, out / f"{name}-{label}.perf"))
        print(f"profiles in {out}/")
    finally:
        for spy_process in spies:
            if spy_process.poll() is None:
                spy_process.terminate()
        processes.stop_all()
        ws.cleanup()
    return 0


def perf_by_object(perf: str, data: FsPath, top: int = 6) -> str:
    """The ``top`` shared objects of a ``perf record`` file by share of the
    samples, one per line."""
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--sort", "dso", "--stdio", "-g", "none"],
        capture_output=True, text=True, check=False,
    ).stdout
    rows = [line.split(None, 1) for line in report.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(f"  {share:>7}  {name.strip()}" for share, name in rows[:top])


if __name__ == "__main__":
    sys.exit(main())
