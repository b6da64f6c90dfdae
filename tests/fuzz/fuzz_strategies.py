"""Hypothesis strategies shared by the parser properties (`test_properties`)
and the long fuzz run (`run.py`).

Random bytes alone rarely get past a parser's first checks, so most
strategies start from valid messages built by the encoders and then mutate
them: flip, insert, delete and truncate bytes, splice two messages.
"""

from __future__ import annotations

import ipaddress
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: Examples per property: moderate for ``make test``; the long run
#: (``tests/fuzz/run.py``, ``make fuzz``) raises it with MTOP_FUZZ_EXAMPLES.
EXAMPLES = int(os.environ.get("MTOP_FUZZ_EXAMPLES", "60"))

#: Settings of every property.  No deadline: the machine is shared and a
#: slow example is not a failure; a hang is caught by the run's timeout.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# -- text ---------------------------------------------------------------------

#: Any code point, lone surrogates included (YAML's "\ud800" makes them).
any_char = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_char, max_size=40)
#: Text that looks like what the parsers see: ASCII with their punctuation.
ascii_text = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=40)
_PUNCTUATION = list(":/@[]?#&=%.;, \t\r\n\"'()-_+*!~$")
fragments = st.one_of(
    st.sampled_from(_PUNCTUATION),
    st.sampled_from(["\u00b2", "\uff11", "\u0661", "\ud800", "\x00", "\x7f", "\xff", "\u00e9", "\u212a"]),
    st.text(st.sampled_from("abcXYZ019"), min_size=1, max_size=6),
    st.integers(-2, 70000).map(str),
)
#: Text made of parser-relevant pieces (digits of other scripts, separators).
tricky_text = st.lists(fragments, max_size=12).map("".join)
texts = st.one_of(any_text, ascii_text, tricky_text)

# -- bytes --------------------------------------------------------------------


@st.composite
def mutated(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid message, then up to four random edits."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        if kind in ("flip", "set", "delete") and not data:
            continue
        if kind == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0x0A, 0x0D, 0x20, 0x3A, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(max_size=8))
    return bytes(data)


def wire_input(valid: st.SearchStrategy[bytes], max_size: int = 600) -> st.SearchStrategy[bytes]:
    """Random bytes, or valid messages and mutations of them, possibly with
    bytes after them."""
    return st.one_of(
        st.binary(max_size=max_size),
        valid,
        mutated(valid),
        st.tuples(valid, st.binary(max_size=16)).map(b"".join),
    )


#: Where to split an input when feeding it in pieces.
cuts = st.lists(st.integers(0, 2000), max_size=6)

# -- hosts and ports ----------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda ip: str(ipaddress.IPv6Address(ip)))
domain = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True)
hosts = st.one_of(ipv4, ipv6, domain)
ports = st.integers(0, 65535)
# Text fields of the wire formats: 0-255 UTF-8 bytes.
field_text = st.text(st.characters(codec="utf-8"), max_size=60).filter(lambda t: len(t.encode()) <= 255)
