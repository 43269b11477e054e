"""A real redis-server (the Debian package) for the tests, on a loopback port, in a temporary directory.

``RedisServer(workdir).start()``; ``url(db)`` for the gateway's ``store:``; ``stop()``/``start()``
again on the same port (a restart); ``cli(...)`` runs redis-cli against it; ``values()`` is every
string and hash value in a database (what a "no secret in clear" test reads).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from .proxies import ServerProcess


class RedisServer(ServerProcess):
    name = "redis"

    def __init__(self, workdir: Path, password: str | None = None, persist: bool = False) -> None:
        super().__init__(workdir)  # the port is kept over restarts
        self.password = password
        self.persist = persist  # append-only file: the data outlives a restart

    def command(self) -> list[str]:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
                "--dir", str(self.workdir), "--protected-mode", "no"]
        return args + (["--requirepass", self.password] if self.password else [])

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start and wait for PONG (not just a connection: a restarted server answers LOADING while
        it reads its append-only file)."""
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: " + self.tail())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if self.password:
                        sock.sendall(f"AUTH {self.password}\r\n".encode())
                        sock.recv(100)
                    sock.sendall(b"PING\r\n")
                    if sock.recv(100).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def cli(self, *args: str, db: int = 0) -> str:
        command = ["redis-cli", "-p", str(self.port), "-n", str(db), "--no-auth-warning"]
        if self.password:
            command += ["-a", self.password]
        return subprocess.run(command + list(args), capture_output=True, text=True, timeout=30, check=True).stdout

    def flush(self, db: int = 0) -> None:
        self.cli("FLUSHDB", db=db)

    def values(self, db: int = 0) -> str:
        """Every key with its value (strings, hashes, sets, sorted sets) of database ``db``, as text."""
        out = []
        for key in self.cli("--scan", db=db).split():
            kind = self.cli("TYPE", key, db=db).strip()
            read = {"string": ("GET",), "hash": ("HGETALL",), "set": ("SMEMBERS",),
                    "zset": ("ZRANGE", "0", "-1")}.get(kind)
            if read:
                out.append(key + " " + self.cli(read[0], key, *read[1:], db=db))
        return "\n".join(out)


def missing() -> bool:
    return shutil.which("redis-server") is None or shutil.which("redis-cli") is None
