"""A login burst from one address, as a separate process (so its TLS work
does not share the server's reactor in the tests that time others' logins).

    python tests/burst.py PORT CA SOURCE TOTAL CONCURRENCY SECONDS

Sends wrong passwords (each different; every other one for user ``bob``,
the rest for users that do not exist) over TLS 1.3 to 127.0.0.1:PORT from
SOURCE, CONCURRENCY at a time, until TOTAL attempts were made or SECONDS
passed; prints one JSON line: attempts made, and how many got a reply.
Stays on loopback: PORT is on 127.0.0.1, SOURCE must be a 127.0.0.0/8
address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])

from mtop import wire  # noqa: E402


async def attempt(port: int, context: ssl.SSLContext, source: str, i: int) -> bool:
    message = wire.encode_auth(wire.AuthRequest("bob" if i % 2 else f"nobody{i}", f"guess-{i}", "127.0.0.1", 9))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost", local_addr=(source, 0)
        )
    except (OSError, ssl.SSLError):
        return False
    try:
        writer.write(message)
        data = await asyncio.wait_for(reader.read(16), 15)
        return bool(data)
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        return False
    finally:
        writer.transport.abort()


async def burst(port: int, ca: str, source: str, total: int, concurrency: int, seconds: float) -> dict:
    if not ipaddress.ip_address(source).is_loopback:
        raise SystemExit("burst.py sends only from loopback addresses")
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["mtop"])
    deadline = time.monotonic() + seconds
    counts = {"attempts": 0, "replied": 0}

    async def worker() -> None:
        while counts["attempts"] < total and time.monotonic() < deadline:
            i = counts["attempts"]
            counts["attempts"] += 1
            if await attempt(port, context, source, i):
                counts["replied"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def main() -> None:
    port, ca, source, total, concurrency, seconds = sys.argv[1:7]
    result = asyncio.run(burst(int(port), ca, source, int(total), int(concurrency), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
