"""Client list lookups and loading: ``python -m bench.clientlist``.

Builds ``--networks`` random IPv4 and IPv6 networks (seeded), writes them
as a list file in Spamhaus DROP's format and times:

* loading that file (`mtop.clientlist.load_client_lists`);
* ``--lookups`` lookups of random addresses (IPv4, IPv6, IPv4-mapped) with
  `ClientLists.refused`: with no lists (the fast path), with the networks as
  a deny list, and as allow and deny lists together;

against baselines of the same run: an empty call, and parsing the address
with ``socket.inet_pton`` (what every lookup has to do) and with
`ipaddress`; and, for the record, the other layout considered, a dict of
networks per prefix length (longest first).  Prints ns per lookup, the
median of ``--repeat`` runs.  Measures, never asserts.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from mtop.clientlist import ClientLists, load_client_lists, parse_network


def random_networks(rng: random.Random, count: int) -> list[str]:
    """Mostly IPv4 (as public block lists are), prefix lengths spread as in
    them: IPv4 /16 to /32 (most /24), IPv6 /19 to /128."""
    networks = []
    for _ in range(count):
        if rng.random() < 0.8:
            prefix = rng.choice((16, 18, 20, 21, 22, 23, 24, 24, 24, 24, 24, 24, 28, 29, 32, 32, 32))
            networks.append(f"{ipaddress.IPv4Network((rng.getrandbits(32), prefix), strict=False)}")
        else:
            prefix = rng.choice((19, 29, 32, 32, 48, 48, 56, 64, 64, 128))
            value = (0x2 << 124) | rng.getrandbits(125)  # 2000::/3, as real ones
            networks.append(f"{ipaddress.IPv6Network((value, prefix), strict=False)}")
    return networks


def random_hosts(rng: random.Random, count: int, networks: list[str]) -> list[str]:
    """Addresses as Twisted gives them: half inside a listed network, half
    anywhere; a tenth of the IPv4 ones IPv4-mapped."""
    hosts = []
    for _ in range(count):
        if rng.random() < 0.5:
            net = ipaddress.ip_network(rng.choice(networks))
            address = ipaddress.ip_address(int(net.network_address) + rng.randrange(net.num_addresses))
        elif rng.random() < 0.8:
            address = ipaddress.IPv4Address(rng.getrandbits(32))
        else:
            address = ipaddress.IPv6Address((0x2 << 124) | rng.getrandbits(125))
        text = str(address)
        if address.version == 4 and rng.random() < 0.1:
            text = f"::ffff:{text}"
        hosts.append(text)
    return hosts


class PrefixDicts:
    """The alternative layout: per family, a dict per prefix length
    (network int -> denied), probed longest prefix first."""

    def __init__(self, deny: list[str]):
        self.tables: dict[int, dict[int, dict[int, bool]]] = {32: {}, 128: {}}
        for text in deny:
            bits, value, prefix = parse_network(text)
            self.tables[bits].setdefault(prefix, {})[value >> (bits - prefix)] = True
        self.order = {bits: sorted(t.items(), reverse=True) for bits, t in self.tables.items()}

    def refused(self, host: str) -> bool:
        if ":" in host:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
            bits = 128
            if value >> 32 == 0xFFFF:
                value, bits = value & 0xFFFFFFFF, 32
        else:
            value, bits = int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big"), 32
        for prefix, table in self.order[bits]:
            if value >> (bits - prefix) in table:
                return True
        return False


def time_lookups(checks: dict[str, Callable[[str], object]], hosts: list[str], repeat: int) -> dict[str, float]:
    """Median ns per call of each check over ``hosts``; the runs are
    interleaved, so a change in the machine's load hits every check alike."""
    runs: dict[str, list[float]] = {name: [] for name in checks}
    for _ in range(repeat):
        for name, check in checks.items():
            started = time.perf_counter_ns()
            for host in hosts:
                check(host)
            runs[name].append((time.perf_counter_ns() - started) / len(hosts))
    return {name: statistics.median(times) for name, times in runs.items()}


def _inet_pton(host: str) -> int:
    if ":" in host:
        return int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
    return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clientlist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=200_000, help="addresses looked up per run (at most 10,000,000)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    lookups = max(1, min(args.lookups, 10_000_000))
    rng = random.Random(args.seed)
    networks = random_networks(rng, args.networks)
    hosts = random_hosts(rng, lookups, networks)
    print(f"{len(networks):,} networks ({sum(':' in n for n in networks):,} IPv6), {len(hosts):,} lookups, median of {args.repeat} runs")

    with tempfile.TemporaryDirectory(prefix="mtop-bench-clientlist-") as tmp:
        path = Path(tmp) / "drop.txt"
        path.write_text(
            "; random networks in Spamhaus DROP's format\n" + "".join(f"{net} ; SBL{i}\n" for i, net in enumerate(networks))
        )
        loads = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            deny = load_client_lists(deny=[str(path)])
            loads.append(time.perf_counter() - started)
    print(f"load a {len(networks):,}-line list file: {statistics.median(loads) * 1000:.0f} ms (min {min(loads) * 1000:.0f} ms)")
    half = len(networks) // 2
    both = ClientLists(allow=networks[:half], deny=networks[half:])
    nothing = ClientLists()
    refused = sum(map(deny.refused, hosts))
    print(f"deny list refuses {refused:,} of the {len(hosts):,} addresses")

    checks = {
        "empty call (baseline)": lambda host: None,
        "inet_pton parse (baseline)": _inet_pton,
        "ipaddress parse": ipaddress.ip_address,
        "no lists (fast path)": nothing.refused,
        f"deny list, {len(networks):,} networks": deny.refused,
        f"allow+deny lists, {half:,} + {len(networks) - half:,}": both.refused,
        f"(alternative: dicts per prefix, {len(networks):,})": PrefixDicts(networks).refused,
    }
    figures = time_lookups(checks, hosts, args.repeat)
    parse = figures["inet_pton parse (baseline)"]
    width = max(map(len, figures))
    print(f"{'':{width}}  ns/lookup  x inet_pton parse")
    for name, ns in figures.items():
        print(f"{name:{width}}  {ns:9.0f}  {ns / parse:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
