"""MTop benchmarks: ``make bench`` or ``python -m bench`` (see `bench.run`).

Everything runs on loopback in one run: an origin (`bench.origin`), the
baselines (direct, and the plain relay of `bench.relay`), ``twistd mtop``
and ``twistd climber`` from temporary configs (`bench.procs`), and blocking
socket clients (`bench.client`).  Figures are ratios to the direct
baseline measured in the same run.  Never part of the test suite.
"""
