"""Memory OpenSSL holds per TLS connection as pyOpenSSL drives it: the floor under every relayed session.

    python -m benchmarks.tls_memory [--pairs 500]

In one process, makes ``--pairs`` connected TLS pairs (a server and a client
pyOpenSSL Connection over memory BIOs, as Twisted's TLS layer uses them),
handshakes them and exchanges 100 bytes each way, then reports the heap in
use per pair, per server side and per client side (glibc ``mallinfo2``:
live allocations, not RSS), for several settings:

  default        what Twisted sets up: MODE_RELEASE_BUFFERS, OpenSSL's default
                 key-exchange groups (X25519MLKEM768 first, with OpenSSL 3.5+)
  no-release     without MODE_RELEASE_BUFFERS (record buffers stay allocated)
  x25519         groups limited to X25519 and P-256 (no post-quantum hybrid)
  tls1.2         TLS 1.2 at most, X25519

A relayed IMAP session holds one server-side connection (the client's leg)
and one client-side connection (the upstream leg). Bounded: --pairs pairs per
setting, freed before the next.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi, lib as _lib

from benchmarks.stack import format_table


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_kb() -> float:
    info = _libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 1024


def contexts(setting: str) -> tuple[SSL.Context, SSL.Context]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1)).sign(key, hashes.SHA256()))
    server, client = SSL.Context(SSL.TLS_METHOD), SSL.Context(SSL.TLS_METHOD)
    server.use_privatekey(crypto.PKey.from_cryptography_key(key))
    server.use_certificate(crypto.X509.from_cryptography(cert))
    for ctx in (server, client):
        if setting != "no-release":
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if setting in ("x25519", "tls1.2"):
            _lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519:P-256")
        if setting == "tls1.2":
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    return server, client


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    for _ in range(10):
        for x, y in ((b, a), (a, b)):
            try:
                x.do_handshake()
            except SSL.WantReadError:
                pass
            while True:
                try:
                    y.bio_write(x.bio_read(65536))
                except SSL.WantReadError:
                    break


def pair(server: SSL.Context, client: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    a = SSL.Connection(server, None)
    a.set_accept_state()
    b = SSL.Connection(client, None)
    b.set_connect_state()
    _pump(a, b)
    b.send(b"x" * 100)
    a.bio_write(b.bio_read(65536))
    a.recv(65536)
    a.send(b"y" * 100)
    b.bio_write(a.bio_read(65536))
    b.recv(65536)
    return a, b


def measure(setting: str, pairs: int) -> dict[str, Any]:
    server, client = contexts(setting)
    first = pair(server, client)
    group = _ffi.string(_lib.SSL_get0_group_name(first[0]._ssl)).decode()
    out: dict[str, Any] = {"group": group, "cipher": first[0].get_cipher_name()}
    for side in ("pair", "server", "client"):
        gc.collect()
        before = heap_kb()
        kept = []
        for _ in range(pairs):
            a, b = pair(server, client)
            kept.append((a, b) if side == "pair" else a if side == "server" else b)
        gc.collect()
        out[side] = (heap_kb() - before) / pairs
        del kept
    gc.collect()
    before = heap_kb()
    fresh = [SSL.Connection(server, None) for _ in range(pairs)]
    out["fresh"] = (heap_kb() - before) / pairs
    del fresh
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500)
    args = parser.parse_args()
    rows = []
    for setting in ("default", "no-release", "x25519", "tls1.2"):
        m = measure(setting, args.pairs)
        rows.append([setting, m["group"], m["cipher"], f"{m['fresh']:.1f}", f"{m['server']:.1f}",
                     f"{m['client']:.1f}", f"{m['pair']:.1f}"])
    print(f"OpenSSL heap in use per connection, {args.pairs} handshaken pairs, KB ({SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()})")
    print(format_table(["setting", "group", "cipher", "fresh Connection", "server side", "client side",
                        "pair"], rows))


if __name__ == "__main__":
    main()
