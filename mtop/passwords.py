"""Password hashes stored in ``mtop_user.password``.

Two formats share the column and are told apart by shape:

* **legacy** (the original implementation): lowercase hex SHA-256 of the
  UTF-8 bytes of ``salt + "@" + password``, with the salt in its own column.
* **scrypt** (what our tools write): ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>``
  with unpadded standard base64 salt and hash.  The ``salt`` column still gets
  a random value so the original's schema constraints hold.

An empty stored password never authenticates.  All comparisons are
constant-time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
import string

SCRYPT_PREFIX = "$scrypt$"
#: N = 2**14, r = 8, p = 1: 16 MiB and tens of milliseconds per check.
DEFAULT_LOG2_N = 14
DEFAULT_R = 8
DEFAULT_P = 1
_MAX_LOG2_N = 20
_SALT_ALPHABET = string.ascii_letters + string.digits


def legacy_hash(salt: str, password: str) -> str:
    """The original implementation's hash."""
    return hashlib.sha256(f"{salt}@{password}".encode("utf-8")).hexdigest()


def new_salt(length: int = 16) -> str:
    """A random salt for the ``salt`` column (printable, fits VARCHAR(32))."""
    return "".join(secrets.choice(_SALT_ALPHABET) for _ in range(length))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def scrypt_hash(
    password: str,
    log2_n: int = DEFAULT_LOG2_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    salt: bytes | None = None,
) -> str:
    """A new scrypt hash of ``password`` in our stored format."""
    salt = os.urandom(16) if salt is None else salt
    digest = _scrypt(password, salt, log2_n, r, p)
    return f"{SCRYPT_PREFIX}ln={log2_n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r + (1 << 20),
        dklen=32,
    )


def _parse_scrypt(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    try:
        params, salt_text, hash_text = stored[len(SCRYPT_PREFIX) :].split("$")
        fields = dict(item.split("=", 1) for item in params.split(","))
        log2_n, r, p = int(fields["ln"]), int(fields["r"]), int(fields["p"])
        salt, digest = _unb64(salt_text), _unb64(hash_text)
    except (ValueError, KeyError):
        return None
    if not (1 <= log2_n <= _MAX_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16):
        return None
    if not digest:
        return None
    return log2_n, r, p, salt, digest


def is_expensive(stored: str) -> bool:
    """Whether checking against ``stored`` is worth a thread."""
    return stored.startswith(SCRYPT_PREFIX)


def verify(stored: str, salt: str, password: str) -> bool:
    """Whether ``password`` matches the stored hash (and its row's salt).

    An empty or unrecognised stored value never matches.  Runs in constant
    time with respect to the stored value's content.
    """
    if not stored:
        return False
    if stored.startswith(SCRYPT_PREFIX):
        parsed = _parse_scrypt(stored)
        if parsed is None:
            return False
        log2_n, r, p, raw_salt, digest = parsed
        candidate = _scrypt(password, raw_salt, log2_n, r, p)
        return hmac.compare_digest(candidate, digest)
    candidate = legacy_hash(salt, password)
    return hmac.compare_digest(candidate.encode("ascii"), stored.lower().encode("utf-8", "replace"))


@functools.cache
def dummy_hash() -> str:
    """A hash checked against when a user does not exist, so that an unknown
    user costs the same as a wrong password for a user with a default
    (scrypt) hash."""
    return scrypt_hash(secrets.token_hex(16))
