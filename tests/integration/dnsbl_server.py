"""A DNSBL authority for the tests: a twisted.names server on loopback, run as a subprocess.

    python dnsbl_server.py --port PORT --data zones.json --log queries.log

``zones.json`` (re-read whenever it changes, so a test lists and delists
addresses while the server runs)::

    {"zones": {"bl.test":    {"listed": {"127.0.0.3": {"code": "127.0.0.2", "reason": "..."}}},
               "clean.test": {"listed": {}},
               "hang.test":  {"mode": "hang"},        # never answers
               "fail.test":  {"mode": "servfail"}}}   # SERVFAIL

A listed address has an A record (``code``) and a TXT record (``reason``) at
``<address reversed>.<zone>`` (octets for IPv4, nibbles for IPv6, by netaddr);
any other name in a zone is NXDOMAIN; a name in no zone is SERVFAIL. Every
query is appended to the log as ``<type> <name>``. The server answers UDP and
TCP on 127.0.0.1:PORT and prints ``ready`` once both listen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import netaddr
from twisted.internet import defer, reactor
from twisted.names import common, dns, error, server


class ListingResolver(common.ResolverBase):
    """Answers from the data file; "hang" zones return a Deferred that never fires."""

    def __init__(self, data_path: str, log_path: str) -> None:
        super().__init__()
        self.data_path = data_path
        self.log_path = log_path
        self._seen: tuple[int, int] | None = None
        self._zones: dict[str, Any] = {}

    def _data(self) -> dict[str, Any]:
        stat = os.stat(self.data_path)
        if self._seen != (stat.st_ino, stat.st_mtime_ns):
            with open(self.data_path) as fh:
                self._zones = {zone.lower(): spec for zone, spec in json.load(fh)["zones"].items()}
            self._seen = (stat.st_ino, stat.st_mtime_ns)
        return self._zones

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        text = name.decode("ascii").lower().rstrip(".")
        with open(self.log_path, "a") as fh:
            fh.write(f"{dns.QUERY_TYPES.get(type, type)} {text}\n")
        for zone, spec in self._data().items():
            if text != zone and not text.endswith("." + zone):
                continue
            mode = spec.get("mode", "list")
            if mode == "hang":
                return defer.Deferred()
            if mode == "servfail":
                return defer.fail(RuntimeError("servfail"))
            for address, entry in (spec.get("listed") or {}).items():
                reverse = netaddr.IPAddress(address).reverse_dns.rstrip(".")
                prefix = reverse.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
                if text == f"{prefix}.{zone}":
                    answers = []
                    if type in (dns.A, dns.ALL_RECORDS):
                        answers.append(dns.RRHeader(name, dns.A, ttl=60,
                                                    payload=dns.Record_A(entry.get("code", "127.0.0.2"), 60)))
                    if type in (dns.TXT, dns.ALL_RECORDS) and entry.get("reason"):
                        answers.append(dns.RRHeader(name, dns.TXT, ttl=60,
                                                    payload=dns.Record_TXT(entry["reason"].encode(), ttl=60)))
                    return defer.succeed((answers, [], []))
            return defer.fail(error.AuthoritativeDomainError(text))
        return defer.fail(error.DNSQueryRefusedError(text))  # not ours: SERVFAIL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    factory = server.DNSServerFactory(authorities=[ListingResolver(args.data, args.log)])
    factory.noisy = False
    reactor.listenUDP(args.port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    print("ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
