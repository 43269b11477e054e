"""DNS blocklists without I/O: zone names, query names, what an answer means, CSV import and export.

A DNSBL lists an address when ``<address reversed>.<zone>`` has an A record:
the octets of an IPv4 address in reverse order (``3.0.0.127.zen.example``),
the 32 nibbles of an IPv6 address in reverse order; netaddr builds both. The
A answer is a code in 127.0.0.0/8 saying why, the TXT record of the same name
a text for people. Answers in 127.255.255.0/24 are the zone's own error codes
(Spamhaus: query through a public resolver, over quota, unknown zone), and
anything outside 127.0.0.0/8 is not a DNSBL answer: both are unknown, never
listed and never clean. The Twisted side (queries, schedule, policy) is
`gateway.net.reputation`.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import netaddr

MAX_ZONES = 100
MAX_ZONE_LENGTH = 180        # + 64 characters of an IPv6 query prefix stays under DNS's 253
MAX_NAME_LENGTH = 200
MAX_REPORTED = 20            # bad CSV rows named in one error message
CSV_HEADER = ("rbl_hostname", "rbl_name")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_LISTING = netaddr.IPNetwork("127.0.0.0/8")
_ZONE_ERRORS = netaddr.IPNetwork("127.255.255.0/24")


@dataclass(frozen=True)
class Zone:
    """One DNSBL: the zone queried and the name people know it by."""

    host: str
    name: str

    def document(self) -> dict[str, str]:
        return {"host": self.host, "name": self.name}


def zone_host(text: object) -> str:
    """The canonical (lower-case, no final dot) zone name; ValueError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected a DNS zone name such as zen.spamhaus.org")
    host = text.strip().lower().rstrip(".")
    if not host.isascii():
        raise ValueError(f"{text!r} is not ASCII: give the xn-- form of the name")
    labels = host.split(".")
    if len(host) > MAX_ZONE_LENGTH or len(labels) < 2 or not all(_LABEL.match(label) for label in labels) \
            or labels[-1].isdigit():  # no top-level domain is all digits: that is an address
        raise ValueError(f"{text!r} is not a DNS zone name such as zen.spamhaus.org")
    return host


def zone_name(text: object, host: str) -> str:
    """The display name of a zone (its host when empty)."""
    if text is None:
        return host
    if not isinstance(text, str):
        raise ValueError("name must be a string")
    name = text.strip()
    if len(name) > MAX_NAME_LENGTH or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"name must be at most {MAX_NAME_LENGTH} characters, without control characters")
    return name or host


def parse_zones(items: Any, where: str = "zones") -> tuple[Zone, ...]:
    """Zones from a list of ``{host, name?}``; ValueError names the bad entry (``zones[2].host: ...``)."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{where}: expected a list of {{host, name}}")
    if len(items) > MAX_ZONES:
        raise ValueError(f"{where}: at most {MAX_ZONES} zones")
    zones: list[Zone] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{here}: expected {{host, name}}")
        unknown = sorted(set(item) - {"host", "name"})
        if unknown:
            raise ValueError(f"{here}: unknown field {unknown[0]}")
        try:
            host = zone_host(item.get("host"))
        except ValueError as e:
            raise ValueError(f"{here}.host: {e}") from None
        if host in seen:
            raise ValueError(f"{here}.host: {host} is listed twice")
        seen.add(host)
        try:
            name = zone_name(item.get("name"), host)
        except ValueError as e:
            raise ValueError(f"{here}.name: {e}") from None
        zones.append(Zone(host, name))
    return tuple(zones)


def parse_nameservers(items: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """``["127.0.0.1:53", "[::1]:5353", "192.0.2.53"]`` as (address, port) pairs (port 53 by default)."""
    servers = []
    for item in items:
        text = item.strip()
        host, port = text, "53"
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{item!r} is not ADDRESS, ADDRESS:PORT or [IPv6]:PORT")
                port = rest[1:]
        elif text.count(":") == 1:
            host, port = text.split(":")
        try:
            address = str(netaddr.IPAddress(host, flags=netaddr.INET_PTON))
        except (netaddr.AddrFormatError, ValueError):
            raise ValueError(f"{item!r}: {host!r} is not an IP address") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r}: bad port {port!r}")
        servers.append((address, int(port)))
    return tuple(servers)


def query_name(address: str, zone: str) -> str:
    """``<address reversed>.<zone>``: octets for IPv4, nibbles for IPv6."""
    reverse = netaddr.IPAddress(address).reverse_dns.rstrip(".")
    for suffix in (".in-addr.arpa", ".ip6.arpa"):
        if reverse.endswith(suffix):
            reverse = reverse[: -len(suffix)]
    return f"{reverse}.{zone}"


@dataclass(frozen=True)
class Verdict:
    """What the A answer of one query says: listed True/False, or None (unknown) with why."""

    listed: bool | None
    code: str | None = None
    why: str | None = None


def verdict(answers: Sequence[str]) -> Verdict:
    """Read the A records of a DNSBL answer (none: not listed)."""
    if not answers:
        return Verdict(False)
    codes = sorted(set(answers), key=lambda a: int(netaddr.IPAddress(a)))
    listing = [a for a in codes if netaddr.IPAddress(a) in _LISTING and netaddr.IPAddress(a) not in _ZONE_ERRORS]
    if listing:
        return Verdict(True, ",".join(listing))
    if any(netaddr.IPAddress(a) in _ZONE_ERRORS for a in codes):
        return Verdict(None, ",".join(codes), f"the zone answered {','.join(codes)}: its error code (query "
                                              "refused, over quota or from a public resolver), not a listing")
    return Verdict(None, ",".join(codes), f"the zone answered {','.join(codes)}, not a 127.0.0.x code")


# CSV -------------------------------------------------------------------------


class CsvError(ValueError):
    """Bad rows of a CSV import, by line number; nothing was imported."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        shown = "; ".join(f"line {line}: {text}" for line, text in problems[:MAX_REPORTED])
        more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        rows = "1 bad row" if len(problems) == 1 else f"{len(problems)} bad rows"
        super().__init__(f"{rows}, nothing imported: {shown}{more}")


def zones_csv(zones: Iterable[Zone]) -> bytes:
    """The zones as CSV (UTF-8, CRLF), with the header ``rbl_hostname,rbl_name``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for zone in zones:
        writer.writerow((zone.host, zone.name))
    return out.getvalue().encode("utf-8")


def parse_csv(data: bytes) -> tuple[Zone, ...]:
    """Zones from CSV rows ``rbl_hostname,rbl_name`` (the header line is optional, the name may be
    left out, blank lines and lines starting with # are skipped). CsvError lists every bad row."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CsvError([(data[:e.start].count(b"\n") + 1, "not UTF-8")]) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    zones: list[Zone] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    data_rows = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.append((reader.line_num, f"not CSV ({e})"))
            break  # the reader cannot resynchronise after a broken quote
        line = reader.line_num
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if data_rows == 0 and not zones and not problems and \
                tuple(c.lower() for c in cells) == CSV_HEADER:
            continue
        data_rows += 1
        if len(cells) > 2:
            problems.append((line, f"expected 2 columns (rbl_hostname,rbl_name), got {len(cells)}"))
            continue
        try:
            host = zone_host(cells[0])
            name = zone_name(cells[1] if len(cells) > 1 else None, host)
        except ValueError as e:
            problems.append((line, str(e)))
            continue
        if host in first_line:
            problems.append((line, f"{host} is already on line {first_line[host]}"))
            continue
        first_line[host] = line
        zones.append(Zone(host, name))
    if data_rows > MAX_ZONES:
        problems.append((reader.line_num, f"{data_rows} zones: at most {MAX_ZONES}"))
    if problems:
        raise CsvError(problems)
    if not zones:
        raise CsvError([(max(reader.line_num, 1), "no zones (expected rows rbl_hostname,rbl_name)")])
    return tuple(zones)
