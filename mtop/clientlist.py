"""Client address allow and block lists: which client addresses may connect.

Operators drop whole networks (abusers, scanners: public block lists such
as Spamhaus DROP or FireHOL ipsets) or admit only some (a company's
ranges).  ``clients: {allow: [...], deny: [...]}`` in ``mtop.yaml`` holds
entries, each a network (``203.0.113.0/24``, ``2001:db8::/32``), a single
address, or the path of a list file (relative to the config file's
directory) with one network or address a line; blank lines and comments
after ``#`` or ``;`` are ignored (``1.10.16.0/20 ; SBL256894``).

The verdict, as for the destination ACL (`mtop.acl`): the most specific
matching network wins, ``deny`` wins a tie; an address no entry matches is
refused when the allow list is not empty (an allow list with only IPv4
networks refuses every IPv6 client: add ``::/0`` to admit them; an allow
list file with no network in it admits nobody) and allowed otherwise.  An IPv4-mapped address (``::ffff:a.b.c.d``) is judged
as the IPv4 address, and so are IPv4-mapped networks; a zone index
(``%eth0``) is ignored; a string that is not an IP address (a UNIX socket
path) is never refused.

`ClientLists` is what connection admission asks (`ClientLists.refused`,
`ClientLists.refusal`): the networks are flattened at build time into
sorted disjoint ranges per address family, so a lookup is one
``inet_pton`` and one `bisect` whatever the number of entries, and with no
entries at all it returns at once.  `ClientListWatcher` reloads the lists
when a list file changes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from bisect import bisect_right
from typing import Any, Callable, Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from mtop.interfaces import ISettingsConsumer
from mtop.logs import logger
from mtop.redact import shown

#: A parsed network: (address bits, 32 or 128; network as an int; prefix length).
Network = tuple[int, int, int]
#: What identifies a version of a list file: (mtime_ns, size, inode, device).
Signature = tuple[int, int, int, int]

_MAPPED = 0xFFFF  # ::ffff:0:0/96 shifted right by 32

_NETWORK_HINT = "use CIDR like '192.0.2.0/24' or '2001:db8::/32', or one address"
#: An entry that is not a network but looks like one was meant (a typo such
#: as ``10.0.0.0/33``), rather than a list file's path.
_NETWORK_LIKE = re.compile(r"[0-9A-Fa-f.:]*[0-9][0-9A-Fa-f.:]*(/[0-9]*)?")


class ClientListError(ValueError):
    """An entry that is neither a network nor a readable list file, or a
    list file line that is not a network; the message is one sentence."""


def parse_network(text: str) -> Network | None:
    """A network (CIDR; host bits are dropped) or a single address from
    ``text``, or ``None``.  IPv4-mapped IPv6 networks become IPv4 ones."""
    text = text.strip()
    address, sep, length = text.partition("/")
    bits = 128 if ":" in address else 32
    try:
        packed = socket.inet_pton(socket.AF_INET6 if bits == 128 else socket.AF_INET, address)
    except (OSError, ValueError):
        return _parse_network_slowly(text)
    if not sep:
        prefix = bits
    elif length.isascii() and length.isdigit() and len(length) <= 3:
        prefix = int(length)
        if prefix > bits:
            return None
    else:  # a netmask, '192.0.2.0/255.255.255.0'
        return _parse_network_slowly(text)
    shift = bits - prefix
    value = int.from_bytes(packed, "big") >> shift << shift
    if bits == 128 and prefix >= 96 and value >> 32 == _MAPPED:
        return 32, value & 0xFFFFFFFF, prefix - 96
    return bits, value, prefix


def _parse_network_slowly(text: str) -> Network | None:
    """What `ipaddress` accepts besides CIDR (netmask and hostmask forms)."""
    if "%" in text:  # a zone index: an address of one link, not a network
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return parse_network(f"{net.network_address}/{net.prefixlen}")


def network_text(network: Network) -> str:
    """``203.0.113.0/24`` for a parsed network."""
    bits, value, prefix = network
    address = ipaddress.IPv4Address(value) if bits == 32 else ipaddress.IPv6Address(value)
    return f"{address}/{prefix}"


def is_file_entry(entry: str) -> bool:
    """Whether ``entry`` names a list file rather than a network (or what
    is meant as one: ``10.0.0.0/33`` is a bad network, not a path)."""
    text = entry.strip()
    return bool(text) and parse_network(text) is None and not _NETWORK_LIKE.fullmatch(text)


def resolve_entries(entries: Iterable[str], base: str) -> tuple[str, ...]:
    """``entries`` as written, with the relative paths of list files made
    absolute against ``base`` (the config file's directory)."""
    resolved = []
    for entry in entries:
        if is_file_entry(entry):
            path = os.path.expanduser(entry)
            entry = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
        resolved.append(entry)
    return tuple(resolved)


def list_files(entries: Iterable[str]) -> tuple[str, ...]:
    """The list files among (resolved) ``entries``."""
    return tuple(entry for entry in entries if is_file_entry(entry))


def file_signature(path: str) -> Signature | None:
    """What changes when a list file is edited or replaced, or ``None`` for
    a file that cannot be seen."""
    try:
        return _signature(os.stat(os.path.expanduser(path)))
    except (OSError, ValueError):
        return None


def _signature(st: os.stat_result) -> Signature:
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


def read_entry(entry: str) -> tuple[list[Network], Signature | None]:
    """The networks of one entry, and for a list file the signature of the
    version read (``None`` for a network entry).  A relative path is taken
    relative to the working directory (see `resolve_entries`)."""
    network = parse_network(entry)
    if network is not None:
        return [network], None
    if not is_file_entry(entry):
        raise ClientListError(f"{shown(entry)} is not a network; {_NETWORK_HINT}")
    path = os.path.expanduser(entry)
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            signature = _signature(os.fstat(f.fileno()))
            text = f.read()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ClientListError(f"{shown(entry)} is neither a network nor a readable list file ({reason})") from None
    return _parse_list(path, text), signature


def _parse_list(path: str, text: str) -> list[Network]:
    networks = []
    parse = parse_network
    for number, line in enumerate(text.splitlines(), 1):
        if "#" in line:
            line = line[: line.index("#")]
        if ";" in line:
            line = line[: line.index(";")]
        line = line.strip()
        if not line:
            continue
        network = parse(line)
        if network is None:
            raise ClientListError(f"{path}:{number}: {shown(line)} is not a network or address; {_NETWORK_HINT}")
        networks.append(network)
    return networks


def load_client_lists(
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    base: str | None = None,
    where: Callable[[bool, int], str] | None = None,
) -> "ClientLists":
    """`ClientLists` from entries (networks, addresses, list file paths;
    relative paths against ``base``, default the working directory).
    Raises `ClientListError`, its message prefixed with ``where(denied,
    index)`` (the config key of the entry) when given."""
    if base is not None:
        allow, deny = resolve_entries(allow, base), resolve_entries(deny, base)
    nets: dict[bool, list[Network]] = {False: [], True: []}
    files: dict[str, Signature] = {}
    for denied, entries in ((False, allow), (True, deny)):
        for index, entry in enumerate(entries):
            try:
                networks, signature = read_entry(entry)
            except ClientListError as e:
                if where is None:
                    raise
                raise ClientListError(f"{where(denied, index)}: {e}") from None
            nets[denied].extend(networks)
            if signature is not None:
                files[entry] = signature
    return ClientLists._build(nets[False], nets[True], tuple(files.items()), allow_listed=bool(allow))


def _address(host: str) -> tuple[int, int]:
    """(32 or 128, the address as an int) of an address `ClientLists.refused`
    has judged (which does the same inline: it is the hot path)."""
    if ":" in host:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
        return (32, value & 0xFFFFFFFF) if value >> 32 == _MAPPED else (128, value)
    return 32, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")


class _Table:
    """One address family: disjoint ranges, ``bounds[i]`` to
    ``bounds[i + 1]``, each refused or not, with the prefix length of the
    entry that decided (-1: no entry, the default)."""

    __slots__ = ("bits", "bounds", "refused", "prefix")

    def __init__(self, bits: int, entries: dict[int, bool], default: bool):
        """``entries``: network << 8 | prefix length -> denied."""
        self.bits = bits
        bounds, refused, prefix = [0], [default], [-1]
        size = 1 << bits

        def mark(position: int, denied: bool, length: int) -> None:
            """From ``position`` on, ``denied`` as decided by a /length."""
            if position >= size:
                return
            if bounds[-1] == position:  # the range before would be empty
                if len(bounds) == 1:
                    refused[0], prefix[0] = denied, length
                    return
                bounds.pop(), refused.pop(), prefix.pop()
            if refused[-1] == denied and prefix[-1] == length:
                return  # the same verdict goes on
            bounds.append(position)
            refused.append(denied)
            prefix.append(length)

        # Networks are nested or disjoint, so one pass over them sorted by
        # start (the wider first) with a stack of the enclosing ones finds
        # the most specific network of every range.
        stack: list[tuple[int, bool, int]] = []  # (end, denied, prefix length)

        def close_until(position: int) -> None:
            while stack and stack[-1][0] <= position:
                end = stack.pop()[0]
                if stack:
                    mark(end, stack[-1][1], stack[-1][2])
                else:
                    mark(end, default, -1)

        for key in sorted(entries):  # ints sort much faster than tuples
            start, length, denied = key >> 8, key & 0xFF, entries[key]
            close_until(start)
            mark(start, denied, length)
            stack.append((start + (1 << (bits - length)), denied, length))
        close_until(size)
        self.bounds, self.refused, self.prefix = bounds, refused, prefix

    def index(self, value: int) -> int:
        return bisect_right(self.bounds, value) - 1


class ClientLists:
    """Which client addresses are refused, built once from allow and deny
    networks and never changed (a reload builds a new one).

    `refused` is the admission check; `refusal` says why, for the log.
    Build from configuration with `ClientLists.from_config` or
    `load_client_lists`; ``ClientLists()`` refuses nothing."""

    __slots__ = ("allow_count", "deny_count", "files", "_nothing", "_v4", "_v6")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()):
        """From networks or addresses (no list files; see
        `load_client_lists`).  Raises `ClientListError`."""
        parsed: dict[bool, list[Network]] = {False: [], True: []}
        for denied, texts in ((False, allow), (True, deny)):
            for text in texts:
                network = parse_network(str(text))
                if network is None:
                    raise ClientListError(f"{shown(text)} is not a network; {_NETWORK_HINT}")
                parsed[denied].append(network)
        self._setup(parsed[False], parsed[True], ())

    @classmethod
    def from_config(cls, clients: Any) -> "ClientLists":
        """From a `mtop.config.ClientsConfig`: the lists its loading built
        (list files read once per config), else its entries read now.
        Raises `ClientListError`."""
        if clients.lists is not None:
            return clients.lists
        return load_client_lists(clients.allow, clients.deny)

    @classmethod
    def _build(
        cls, allow: list[Network], deny: list[Network], files: tuple[tuple[str, Signature], ...], allow_listed: bool
    ) -> "ClientLists":
        lists = cls.__new__(cls)
        lists._setup(allow, deny, files, allow_listed)
        return lists

    def _setup(
        self, allow: list[Network], deny: list[Network], files: tuple[tuple[str, Signature], ...], allow_listed: bool = False
    ) -> None:
        """``allow_listed``: allow entries were given, even if their files
        hold no network (an empty allow list file admits nobody, rather
        than everybody)."""
        verdicts: dict[int, dict[int, bool]] = {32: {}, 128: {}}
        # deny after allow: the same network in both lists is denied
        for denied, networks in ((False, allow), (True, deny)):
            for bits, value, prefix in networks:
                verdicts[bits][value << 8 | prefix] = denied
        count = {False: 0, True: 0}
        for table in verdicts.values():
            for denied in table.values():
                count[denied] += 1
        set_ = object.__setattr__
        #: Distinct networks allowed and denied (one in both is denied).
        set_(self, "allow_count", count[False])
        set_(self, "deny_count", count[True])
        #: The list files read, with the signature of the version read.
        set_(self, "files", files)
        # with an allow list, what it does not name is refused
        default = allow_listed or bool(allow)
        set_(self, "_nothing", not default and not deny)
        set_(self, "_v4", _Table(32, verdicts[32], default))
        set_(self, "_v6", _Table(128, verdicts[128], default))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ClientLists cannot be changed (set {name}): build a new one")

    @property
    def empty(self) -> bool:
        """No entries at all: nothing is refused."""
        return self._nothing

    def refused(self, host: str) -> bool:
        """Whether a connection from ``host`` (an address as Twisted gives
        it: ``203.0.113.5``, ``2001:db8::1``, ``::ffff:203.0.113.5``,
        ``fe80::1%eth0``) is refused.  Anything that is not an IP address
        is not."""
        if self._nothing:
            return False
        try:
            if ":" in host:
                value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
                if value >> 32 == _MAPPED:
                    table, value = self._v4, value & 0xFFFFFFFF
                else:
                    table = self._v6
            else:
                table = self._v4
                value = int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
        except (OSError, TypeError, ValueError):
            return False
        return table.refused[bisect_right(table.bounds, value) - 1]

    def refusal(self, host: str) -> str | None:
        """Why a connection from ``host`` is refused (a sentence naming the
        network that decided), or ``None`` when it is not."""
        if not self.refused(host):
            return None
        bits, value = _address(host)
        table = self._v4 if bits == 32 else self._v6
        prefix = table.prefix[table.index(value)]
        if prefix < 0:
            return f"{host} is not in an allowed client network"
        shift = bits - prefix
        return f"{host} is in the denied client network {network_text((bits, value >> shift << shift, prefix))}"

    def __repr__(self) -> str:
        return f"<ClientLists allow={self.allow_count} deny={self.deny_count} files={len(self.files)}>"


@implementer(ISettingsConsumer)
class ClientListWatcher(Service):
    """Reloads the client lists when a list file changes.

    Every ``interval`` seconds it compares each list file's signature
    (mtime, size, inode) with the version the running lists were read
    from; on a change it reads every entry again and hands the new
    `ClientLists` to ``on_change``.  A file that fails to load is logged
    (once per version) and the running lists stay.  With no list files it
    does nothing.  A `twisted.application.service.IService`."""

    _log = logger()

    def __init__(
        self,
        clients: Any,
        lists: ClientLists,
        on_change: Callable[[ClientLists], None],
        clock: IReactorTime,
        interval: float = 5.0,
    ):
        """``clients``: a `mtop.config.ClientsConfig` (resolved entries);
        ``lists``: the lists in use (from `ClientLists.from_config`)."""
        self.on_change = on_change
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        self.use(clients, lists)

    def use(self, clients: Any, lists: ClientLists) -> None:
        """Watch other entries from now on (a reloaded config), with the
        lists built from them."""
        self.clients = clients
        self.lists = lists
        self.paths = list_files(tuple(clients.allow) + tuple(clients.deny))
        self._seen: dict[str, Signature | None] = dict(lists.files)

    def apply_settings(self, settings: Any) -> None:
        """`ISettingsConsumer`: watch the entries of a (reloaded) config."""
        self.use(settings.clients, settings.client_lists)

    def startService(self) -> None:
        super().startService()
        self._log_loaded(self.lists)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> bool:
        """Reload if a list file changed; whether new lists were handed over."""
        if not self.paths:
            return False
        seen = {path: file_signature(path) for path in self.paths}
        if seen == {path: self._seen.get(path) for path in self.paths}:
            return False
        try:
            lists = load_client_lists(self.clients.allow, self.clients.deny)
        except ClientListError as e:
            self._seen = seen  # not again until the file changes again
            self._log.error("client lists not reloaded, the running lists stay: {error}", error=str(e))
            return False
        self.lists = lists
        self._seen = dict(lists.files)
        self._log_loaded(lists)
        try:
            self.on_change(lists)
        except Exception:
            self._log.failure("applying reloaded client lists failed")
        return True

    def _log_loaded(self, lists: ClientLists) -> None:
        if lists.empty and not self.paths:
            return
        self._log.info(
            "client lists loaded: {allowed} networks allowed, {denied} denied, from {files}",
            allowed=lists.allow_count,
            denied=lists.deny_count,
            files=", ".join(self.paths) or "the config file",
        )
