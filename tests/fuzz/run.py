"""The long fuzz run: every parser property of ``tests/fuzz`` with many
examples, and the atheris harness when atheris is installed.

    python tests/fuzz/run.py --examples 100000       # one pass, N examples per property
    python tests/fuzz/run.py --minutes 30            # passes with fresh seeds until the time is up
    python tests/fuzz/run.py --minutes 10 -k socks5  # only some properties
    python tests/fuzz/run.py --minutes 10 --atheris 0.5  # half the time in the atheris harness

``make fuzz FUZZ_MINUTES=30`` runs the second form.  Each pass is a pytest
run of ``tests/fuzz`` with ``MTOP_FUZZ_EXAMPLES`` set and a new
``--hypothesis-seed``; the first failure stops the run with pytest's report
(the falsifying example is also saved in ``.hypothesis/``, so a plain
``pytest tests/fuzz`` replays it).  A pass that takes far longer than the
previous ones predicted is reported as a possible hang.  The exit status is
non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _pytest(examples: int, seed: int, keyword: str | None, timeout: float | None) -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE),
               f"--hypothesis-seed={seed}", "--hypothesis-show-statistics" if examples >= 10000 else "-q"]
    if keyword:
        command += ["-k", keyword]
    env = dict(os.environ, MTOP_FUZZ_EXAMPLES=str(examples))
    print(f"fuzz: {examples} examples per property, seed {seed}", flush=True)
    try:
        return subprocess.run(command, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"fuzz: the pass took over {timeout:.0f}s, far longer than predicted: a possible hang "
              f"(rerun with --examples {examples} and seed {seed} to see where)", flush=True)
        return 3


def _atheris(seconds: float) -> int:
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris); hypothesis properties only", flush=True)
        return 0
    corpus = ROOT / ".hypothesis" / "atheris-corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "atheris_harness.py"), f"-max_total_time={max(1, int(seconds))}",
               "-rss_limit_mb=1024", "-timeout=10", f"-artifact_prefix={corpus.parent}/atheris-", str(corpus)]
    print(f"fuzz: atheris harness for {seconds:.0f}s (corpus {corpus}; a crash is saved beside it)", flush=True)
    return subprocess.run(command, cwd=ROOT, timeout=seconds + 120).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--examples", type=int, help="one pass with this many examples per property")
    budget.add_argument("--minutes", type=float, help="passes with fresh seeds until this time is up (default 10)")
    parser.add_argument("-k", dest="keyword", help="only the properties matching this pytest -k expression")
    parser.add_argument("--seed", type=int, help="seed of the first pass (default: random)")
    parser.add_argument("--atheris", type=float, default=0.0, metavar="SHARE",
                        help="share of --minutes spent in the atheris harness (0-1, default 0)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seed = args.seed if args.seed is not None else rng.randrange(2**32)

    if args.examples:
        return _pytest(args.examples, seed, args.keyword, None)

    total = (args.minutes or 10.0) * 60
    started = time.monotonic()
    status = 0
    if args.atheris > 0:
        status = _atheris(total * min(args.atheris, 1.0))
        if status:
            return status
    examples, passes, done = 200, 0, 0
    while True:
        left = total - (time.monotonic() - started)
        if left <= 5:
            break
        began = time.monotonic()
        status = _pytest(examples, seed, args.keyword, timeout=max(300.0, left * 3))
        took = time.monotonic() - began
        if status:
            break
        passes += 1
        done += examples
        left = total - (time.monotonic() - started)
        # Size the next pass to what is left, at this pass's rate (at most 4x).
        rate = examples / max(took, 1.0)
        examples = max(50, min(examples * 4, int(rate * left * 0.9)))
        seed = rng.randrange(2**32)
    elapsed = (time.monotonic() - started) / 60
    verdict = "OK" if status == 0 else f"FAILED (exit status {status})"
    print(f"fuzz: {verdict}: {passes} passes, {done} examples per property in {elapsed:.1f} min", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
