"""A coverage-guided (libFuzzer, via atheris) harness for every parser.

    python tests/fuzz/atheris_harness.py -max_total_time=300 [CORPUS_DIR]

The first input byte picks the parser, the rest is its input.  Each parser
must return or raise its typed error; byte parsers must also agree with
themselves when the input is split in two.  Anything else is a crash that
libFuzzer reports (and saves as ``crash-*``).  ``tests/fuzz/run.py
--atheris SHARE`` runs it as part of the long fuzz run.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    import yaml

    from climber import http_codec as http
    from climber import socks5_codec as socks
    from climber.config import load_climber_config, load_climber_data
    from mtop import dsn, proxyproto, wire
    from mtop.config import ConfigError, load_config, load_config_data, parse_listen
    from mtop.urls import URLError, make_url, parse_url

_TMP = tempfile.mkdtemp(prefix="mtop-atheris-")
_YAML = os.path.join(_TMP, "fuzz.yaml")


def _verdict(parse, data, errors):
    try:
        result = parse(data)
    except errors as e:
        return ("error", type(e), getattr(e, "status", None))
    return ("none",) if result is None else ("ok", result)


def _incremental(parse, errors, data: bytes, cut: int) -> None:
    whole = _verdict(parse, data, errors)
    first = _verdict(parse, data[:cut], errors)
    if first[0] != "none" and first != whole:
        raise AssertionError(f"{parse.__name__}: {first} for the first {cut} bytes, {whole} for all {len(data)}")


_BYTE_PARSERS = [
    (wire.parse_auth, wire.WireError),
    (wire.parse_reply, wire.BadReply),
    (socks.parse_greeting, socks.SocksError),
    (socks.parse_userpass, socks.SocksError),
    (socks.parse_request, socks.SocksError),
    (socks.parse_method_choice, socks.SocksError),
    (socks.parse_reply, socks.SocksError),
    (http.parse_request_head, http.HTTPError),
    (http.parse_response_head, http.HTTPError),
    (proxyproto.parse_header, proxyproto.ProxyHeaderError),
]


def _chunked(data: bytes, cut: int) -> None:
    def feed(pieces):
        framer = http.ChunkedBody(400)
        taken = 0
        try:
            for piece in pieces:
                taken += framer.feed(piece)
                if framer.done:
                    break
        except http.HTTPError as e:
            return ("error", e.status)
        return (framer.done, taken)

    if feed([data]) != feed([data[:cut], data[cut:]]):
        raise AssertionError("ChunkedBody: split input framed differently")


def _text_parsers(text: str, choice: int) -> None:
    if choice == 0:
        try:
            link = parse_url(text)
        except URLError:
            return
        assert parse_url(make_url(link)) == link
    elif choice == 1:
        try:
            dsn.parse_mysql_dsn(text)
        except dsn.DSNError:
            pass
        dsn.describe_dsn("mysql", text)
    elif choice == 2:
        try:
            dsn.check_postgres_dsn(text)
        except dsn.DSNError:
            pass
        dsn.describe_dsn("postgres", text)
    elif choice == 3:
        for default in (None, 80):
            try:
                http.parse_authority(text, default)
            except http.HTTPError:
                pass
        try:
            http.split_absolute_uri(text)
        except http.HTTPError:
            pass
    elif choice == 4:
        try:
            parse_listen(text)
        except ConfigError:
            pass


def _yaml(raw: bytes) -> None:
    with open(_YAML, "wb") as f:
        f.write(raw)
    for load in (lambda p: load_config(p, check_files=False), load_climber_config):
        try:
            load(_YAML)
        except ConfigError:
            pass
    # The same document, when it parses, straight into the data loaders.
    try:
        document = yaml.safe_load(raw)
    except Exception:
        return
    for load in (lambda d: load_config_data(d, None, check_files=False), load_climber_data):
        try:
            load(document)
        except ConfigError:
            pass


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    selector, cut_byte, body = data[0], data[1], data[2:]
    cut = cut_byte * len(body) // 255
    n_bytes = len(_BYTE_PARSERS)
    which = selector % (n_bytes + 3)
    if which < n_bytes:
        parse, errors = _BYTE_PARSERS[which]
        _incremental(parse, errors, body, cut)
    elif which == n_bytes:
        _chunked(body, cut)
    elif which == n_bytes + 1:
        _text_parsers(body.decode("utf-8", "surrogateescape"), cut_byte % 5)
    else:
        _yaml(body)


def main() -> None:
    sys.setrecursionlimit(3000)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
