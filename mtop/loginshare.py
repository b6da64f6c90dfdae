"""Verified logins shared by the workers of one server.

With ``server.workers: N`` each worker is a whole server with its own
login cache, so without sharing every worker runs scrypt once for every
user that logs in through it, and a worker started again (after a crash)
starts cold.  The supervisor creates one `LoginShare` (anonymous shared
memory, ``memfd_create``, never a file) and hands it to every worker it
starts; a worker that has checked a password with scrypt records there
that *this password was verified against this stored hash*, and the other
workers take that instead of checking again, as long as the row they read
still holds the same hash (`mtop.auth.Authenticator`).

What is kept is what each worker's own cache keeps: HMACs under a key
that lives in the same memory (chosen by the supervisor at start), never a
password or a hash.  Each record carries a MAC over its fields, so a
record torn by two workers writing the same slot at once reads as absent:
no lock is needed.  A slot is chosen by the user's name; two users sharing
one slot take turns (it is a cache: a miss costs one scrypt).

Linux only (``os.memfd_create``); elsewhere, or when the memory cannot be
had, workers run as before, each on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import struct
import time

MAGIC = b"MTOPLS1\0"
KEY_SIZE = 32
HEADER = struct.Struct("<8s32sI")
HEADER_SIZE = 64
#: name digest, password token, stored-hash token, verified (Unix time).
RECORD = struct.Struct("<16s32s32sd")
MAC_SIZE = 16
SLOT_SIZE = 128
#: 16,384 slots of 128 bytes: 2 MiB, shared.
SLOTS = 16384

#: The environment variable that tells a worker which descriptor it is.
SHARE_FD_ENV = "MTOP_LOGIN_SHARE_FD"


class LoginShare:
    """The shared table (see the module docstring)."""

    def __init__(self, fd: int):
        size = HEADER_SIZE + SLOTS * SLOT_SIZE
        if os.fstat(fd).st_size < size:
            raise ValueError("the shared login table is too small")
        self.fd = fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        magic, key, slots = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or slots != SLOTS:
            self._map.close()
            raise ValueError("not a shared login table")
        #: The key of every HMAC in the table (and of the workers' tokens).
        self.key = bytes(key)

    @classmethod
    def create(cls) -> LoginShare:
        """A new table with a new key, in memory that child processes can
        inherit (``fd``)."""
        fd = os.memfd_create("mtop-logins", 0)
        try:
            os.ftruncate(fd, HEADER_SIZE + SLOTS * SLOT_SIZE)
            os.pwrite(fd, HEADER.pack(MAGIC, os.urandom(KEY_SIZE), SLOTS), 0)
            os.set_inheritable(fd, True)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def inherited(cls) -> LoginShare | None:
        """The table the supervisor handed this worker, if any."""
        value = os.environ.get(SHARE_FD_ENV, "")
        if not value.isdigit():
            return None
        return cls(int(value))

    def _name(self, username: str) -> bytes:
        return hmac.digest(self.key, b"name\0" + username.encode("utf-8"), "sha256")[:16]

    def _offset(self, name: bytes) -> int:
        return HEADER_SIZE + (int.from_bytes(name[:4], "little") % SLOTS) * SLOT_SIZE

    def _mac(self, record: bytes) -> bytes:
        return hashlib.blake2b(record, key=self.key, digest_size=MAC_SIZE).digest()

    def put(self, username: str, token: bytes, stored: bytes, verified: float | None = None) -> None:
        """Record that ``token`` (the password's HMAC) was verified against
        ``stored`` (the row hash's HMAC) for ``username``."""
        name = self._name(username)
        record = RECORD.pack(name, token, stored, time.time() if verified is None else verified)
        offset = self._offset(name)
        self._map[offset : offset + RECORD.size + MAC_SIZE] = record + self._mac(record)

    def confirms(self, username: str, token: bytes, stored: bytes, max_age: float) -> bool:
        """Whether a worker verified ``token`` against ``stored`` for
        ``username`` within ``max_age`` seconds."""
        name = self._name(username)
        offset = self._offset(name)
        raw = self._map[offset : offset + RECORD.size + MAC_SIZE]
        record, mac = raw[: RECORD.size], raw[RECORD.size :]
        if not hmac.compare_digest(mac, self._mac(record)):
            return False  # empty, or torn by a write in progress
        seen_name, seen_token, seen_stored, verified = RECORD.unpack(record)
        return (
            hmac.compare_digest(seen_name, name)
            and hmac.compare_digest(seen_token, token)
            and hmac.compare_digest(seen_stored, stored)
            and 0 <= time.time() - verified <= max_age
        )

    def close(self) -> None:
        self._map.close()
