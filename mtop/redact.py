"""Taking passwords out of text meant for people: error messages and logs.

`redact` masks the password part of the connection strings and links an
operator writes into configs and command lines, wherever they appear in a
sentence: URL userinfo (``mtop://alice:PASS@host``, ``postgres://u:PASS@h``,
``mysql://u:PASS@h``), the Go MySQL driver's ``user:PASS@tcp(host)/db``, and
libpq's ``password=PASS`` keyword.  `shown` is ``repr`` with a size bound, for
echoing a config value of any shape (YAML aliases can make a small file hold
a structure whose full ``repr`` is gigabytes).
"""

from __future__ import annotations

import re
import reprlib

MASK = "***"

# scheme://user:PASS@ -- the password runs to the last @ of the word.
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"]*:)[^\s'\"]*@")
# user:PASS@tcp(...) / user:PASS@unix(...) / user:PASS@/db (Go MySQL driver).
_GO_DSN = re.compile(r"(?<![^\s'\"(=])([^\s:/@'\"]*:)[^\s'\"]*@(?=(?:[a-z0-9]+\()|/)")
# libpq keyword/value: password=PASS or password='PA SS'.
_KEYWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s'\"]*)", re.I)
# A query parameter password=... in a URL (libpq accepts ?password=).
_QUERY = re.compile(r"([?&]password=)[^&\s'\"]*", re.I)


def redact(text: str) -> str:
    """``text`` with every recognisable password replaced by ``***``."""
    text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _GO_DSN.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    return _KEYWORD.sub(lambda m: m.group(1) + MASK, text)


_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxtuple = _repr.maxlist = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 6
_repr.maxdict = 6
_repr.maxstring = 200
_repr.maxother = 200
_repr.maxlong = 60


def shown(value: object) -> str:
    """A bounded ``repr`` of ``value`` (at most a few hundred characters,
    whatever its size or depth)."""
    return _repr.repr(value)
