"""The process supervisor behind ``make run``: starts the demo's web page,
server and climber, and stops all three together.

Run as ``python -m mtop.demo --state .state --web-port 8000`` once the
Makefile has written the demo's configs into the state directory.  The first
SIGINT (Ctrl-C, which the terminal sends to the whole foreground process
group), SIGTERM (what make sends its running recipe when make itself gets
SIGTERM) or SIGHUP stops every child: SIGINT to each after a SIGINT,
SIGTERM otherwise, and SIGKILL to what is left after `STOP_TIMEOUT` seconds
(at once on a second signal).  The supervisor then ends by the signal it
got, so make and shells see an interrupted run.  A child that ends by itself
(a port in use, say) stops the others, with one line saying which child
ended and how; the exit status is then 1.

Each child runs in a process group of its own, so that the supervisor alone
decides when and how it is signalled: a Ctrl-C reaching both the children and
the supervisor would stop each twistd twice (and twice is a traceback).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

#: Seconds the children get to stop before they are killed.
STOP_TIMEOUT = 10.0

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Child:
    """One process of the demo: what to run and, once started, its process."""

    name: str
    argv: list[str]
    #: True: the child's output goes to the terminal; False: to /dev/null.
    show_output: bool = True
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        output = None if self.show_output else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            # A group of its own: see the module docstring.
            process_group=0,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL the child's whole process group (the child and anything
        it started that is still there)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


def demo_children(state: Path, web_port: int, twistd: str | None = None) -> list[Child]:
    """The demo's three processes, in the order they start: the one-page web
    server on 127.0.0.1:``web_port``, the server and climber with the
    configs ``make run`` wrote into ``state``."""
    twistd = twistd or str(Path(sys.executable).parent / "twistd")
    return [
        Child(
            "the demo web page (python -m http.server)",
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(state / "www"),
             str(web_port)],
            show_output=False,
        ),
        Child(
            "the server (twistd mtop)",
            [twistd, "--nodaemon", "--pidfile=", "mtop", "--config", str(state / "mtop.yaml")],
        ),
        Child(
            "climber (twistd climber)",
            [twistd, "--nodaemon", "--pidfile=", "climber", "--config",
             str(state / "climber.yaml")],
        ),
    ]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Supervisor:
    """Starts `children`, waits for a stop signal or for a child to end,
    then stops them all (see the module docstring)."""

    def __init__(self, children: list[Child], stop_timeout: float = STOP_TIMEOUT, err: TextIO | None = None):
        self.children = children
        self.stop_timeout = stop_timeout
        self.err = err if err is not None else sys.stderr
        self.signals: list[int] = []
        self._wakeup_r = -1

    # Signals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives (SIGCHLD included) or ``timeout``."""
        select.select([self._wakeup_r], [], [], max(timeout, 0))
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def _install_handlers(self) -> None:
        self._wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        # The C-level handler writes to this pipe, so a signal that arrives
        # between a check and the select still wakes the select.
        signal.set_wakeup_fd(wakeup_w)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        # A Python handler for SIGCHLD, only so that a child's end writes to
        # the wakeup pipe.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        # The children are not in the terminal's foreground process group;
        # with `stty tostop` their writes to the terminal would stop them.
        # An ignored SIGTTOU is inherited across exec and lets them write.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)

    # The run

    def run(self) -> int:
        """Run the demo until a stop signal or a child's end.  Returns the
        exit status (1: a child ended by itself), or the stop signal's
        number negated."""
        self._install_handlers()
        for child in self.children:
            if self.signals:
                break
            try:
                child.start()
            except OSError as e:
                print(f"make run: cannot start {child.name}: {e}; stopping the demo.", file=self.err, flush=True)
                self.stop_all()
                return 1
        ended: Child | None = None
        while not self.signals and ended is None:
            ended = next((c for c in self.children if c.process is not None and not c.running()), None)
            if ended is None:
                self._wait(1.0)
        if ended is not None and not self.signals:
            print(
                f"make run: {ended.name} ended ({describe_exit(ended.process.returncode)}); stopping the demo.",
                file=self.err,
                flush=True,
            )
        # Ctrl-C is passed on as SIGINT, so the children's logs say what
        # happened; anything else as SIGTERM.
        self.stop_all(signal.SIGINT if self.signals[:1] == [signal.SIGINT] else signal.SIGTERM)
        if self.signals:
            return -self.signals[0]
        return 1

    def stop_all(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to every running child (the last started first),
        wait up to `stop_timeout` (less if another stop signal arrives), then
        SIGKILL what is left, and the children's process groups."""
        seen = len(self.signals)
        for child in reversed(self.children):
            child.signal(signum)
        deadline = time.monotonic() + self.stop_timeout
        while any(c.running() for c in self.children):
            left = deadline - time.monotonic()
            if left <= 0 or len(self.signals) > seen:
                break
            self._wait(min(left, 0.5))
        for child in self.children:
            if child.running():
                print(f"make run: {child.name} did not stop; killed.", file=self.err, flush=True)
            child.kill_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtop.demo",
        description="Run make run's demo (web page, server, climber) until Ctrl-C or SIGTERM stops all three.",
    )
    parser.add_argument("--state", type=Path, default=Path(".state"), help="the directory make run wrote")
    parser.add_argument("--web-port", type=int, default=8000, help="the demo web page's port on 127.0.0.1")
    parser.add_argument("--twistd", help="the twistd to run (default: the one beside this Python)")
    parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    supervisor = Supervisor(demo_children(args.state, args.web_port, args.twistd), args.stop_timeout)
    status = supervisor.run()
    if status < 0:
        # End by the same signal, as an interrupted program should: make
        # and shells then know the run was interrupted, not that it failed.
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(-status, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main())
