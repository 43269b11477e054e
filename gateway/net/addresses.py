"""Local source addresses: validation, the start-up bind check, and picking one from a pool.

Strategies (`network.address_strategy`):

- `default`: no bind, the operating system chooses;
- `static`: each account keeps one address of the pool, chosen by rendezvous
  (highest-random-weight) hashing of account ID and address. Removing an
  address from the pool moves only the accounts that had it; adding one moves
  only the accounts that now score it highest;
- `random`: a fresh pick for every connection.

Both `static` and `random` take optional weights (warm-up, `gateway.net.warmup`):
an address of weight w gets about w / (sum of the weights) of the accounts or
connections. Weighted rendezvous hashing scores ``w / -ln(u)``, u the hash as a
fraction in (0, 1): with every weight 1 it picks what the plain hash picks, and
raising one address's weight only moves accounts to that address.

Pools mix IPv4 and IPv6; a pick only considers the addresses of the family of
the address being connected to. When a pool has none of that family the
operating system chooses.
"""

from __future__ import annotations

import hashlib
import math
import random
import socket
from typing import Iterable, Mapping, Sequence

import netaddr

from gateway.net.ipstrategy import IPV4, IPV6

STRATEGIES = ("default", "static", "random")


def normalize_address(text: object) -> str:
    """The canonical text of an IPv4/IPv6 address; ValueError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected an IP address")
    raw = text.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        if ":" in raw:
            return str(netaddr.IPAddress(raw, 6))
        return str(netaddr.IPAddress(raw, 4, flags=netaddr.INET_PTON))
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None


def family_of(address: str) -> int:
    """IPV4 or IPV6 for a normalized address."""
    return IPV6 if ":" in address else IPV4


def normalize_pool(addresses: Iterable[object]) -> tuple[str, ...]:
    """Validated, de-duplicated addresses in their given order; ValueError names the bad one."""
    result: list[str] = []
    for item in addresses:
        address = normalize_address(item)
        if address not in result:
            result.append(address)
    return tuple(result)


def bindable(address: str) -> str | None:
    """None when ``address`` is configured on this machine, else the reason binding to it fails."""
    family = socket.AF_INET6 if family_of(address) == IPV6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError as e:
        return e.strerror or str(e)
    return None


def missing_addresses(addresses: Iterable[str]) -> list[tuple[str, str]]:
    """(address, reason) for every address this machine cannot bind to."""
    missing = []
    for address in addresses:
        reason = bindable(address)
        if reason is not None:
            missing.append((address, reason))
    return missing


def rendezvous_score(key: str, address: str) -> int:
    """The weight of ``address`` for ``key``: the first 8 bytes of SHA-256(key NUL address)."""
    digest = hashlib.sha256(key.encode("utf-8") + b"\x00" + address.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big")


def rendezvous(key: str, pool: Sequence[str], weights: Mapping[str, float] | None = None) -> str | None:
    """The address of ``pool`` that ``key`` scores highest (ties: the smaller address text); with
    ``weights`` (missing: 1), weighted rendezvous hashing."""
    if not pool:
        return None
    if not weights or all(weights.get(address, 1.0) == 1.0 for address in pool):
        return max(pool, key=lambda address: (rendezvous_score(key, address), address))

    def weighted(address: str) -> tuple[float, str]:
        fraction = (rendezvous_score(key, address) + 0.5) / 2.0 ** 64  # in (0, 1)
        return weights.get(address, 1.0) / -math.log(fraction), address

    return max(pool, key=weighted)


def of_family(pool: Sequence[str], family: int) -> list[str]:
    return [address for address in pool if family_of(address) == family]


def pick(strategy: str, pool: Sequence[str], key: str, family: int,
         rng: random.Random | None = None, weights: Mapping[str, float] | None = None) -> str | None:
    """The source address for one connection of ``family``, or None to let the OS choose."""
    if strategy == "default":
        return None
    candidates = of_family(pool, family)
    if not candidates:
        return None
    if strategy == "random":
        if weights and any(address in weights for address in candidates):
            return (rng or random).choices(candidates, [weights.get(a, 1.0) for a in candidates])[0]
        return (rng or random).choice(candidates)
    return rendezvous(key, candidates, weights)
