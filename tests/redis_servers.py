"""Private Redis deployments for tests: a TLS redis-server, and Sentinel.

Each is started by the test that needs it, on free ports, in a directory of
its own, and stopped at the end (`tls_server`, `sentinel_deployment`).  The
TLS server's certificate authority and certificate are made here with
``openssl`` (valid for ``127.0.0.1`` and ``localhost``); `make_ca` makes a
second, unrelated CA for the "wrong CA" case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from tests.soak.harness import free_port

__all__ = ["SentinelDeployment", "TlsServer", "make_ca", "sentinel_deployment", "tls_server"]

MASTER: str = "cit-master"


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return binary


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> Path:
    """A new self-signed test CA in ``directory``: its certificate's path (key beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", "2",
        "-subj", f"/CN=cancellable test {name}", "-out", str(cert),
    )  # fmt: skip
    return cert


def _server_cert(directory: Path, ca: Path) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-subj", "/CN=127.0.0.1", "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def _wait(proc: subprocess.Popen[bytes], ping: redis.Redis, what: str) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(redis.RedisError, OSError):
            if ping.ping():
                return True
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer in 20 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclasses.dataclass
class TlsServer:
    """A redis-server that speaks TLS only."""

    port: int
    ca: Path
    directory: Path

    def url(self, db: int = 0, **query: str) -> str:
        """A ``rediss://`` URL to it, with ``query`` parameters."""
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"rediss://127.0.0.1:{self.port}/{db}" + (f"?{tail}" if tail else "")

    def client(self, db: int = 0) -> redis.Redis:
        """A test-side client (verifies the server with the test CA)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, ssl=True, ssl_ca_certs=str(self.ca),
            ssl_cert_reqs="required", socket_timeout=5, socket_connect_timeout=5,
        )  # fmt: skip


@contextlib.contextmanager
def tls_server(directory: Path) -> Iterator[TlsServer]:
    """A private TLS redis-server (``--port 0 --tls-port P``) with a CA made here."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    cert, key = _server_cert(directory, ca)
    for _attempt in range(3):  # another process may take the free port first
        port = free_port(random.Random())
        argv = [
            _redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--logfile", str(directory / "redis.log"), "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        server = TlsServer(port, ca, directory)
        try:
            if _wait(proc, server.client(), f"TLS redis-server on {port}"):
                break
        except BaseException:
            _stop(proc)
            raise
    else:
        raise RuntimeError("could not start a TLS redis-server on a free port")
    try:
        yield server
    finally:
        _stop(proc)


@dataclasses.dataclass
class SentinelDeployment:
    """A password-protected master and sentinels (password-protected too) watching it."""

    master_port: int
    sentinel_ports: list[int]
    master_password: str
    sentinel_password: str

    def url(self, db: int = 0) -> str:
        """``sentinel://:pw@h:p1/db;sentinel://:pw@h:p2/db`` (kombu's and Celery's spelling)."""
        return ";".join(
            f"sentinel://:{self.master_password}@127.0.0.1:{port}/{db}"
            for port in self.sentinel_ports
        )

    def transport_options(self) -> dict[str, object]:
        """``master_name`` and the sentinels' password (``sentinel_kwargs``)."""
        return {"master_name": MASTER, "sentinel_kwargs": {"password": self.sentinel_password}}

    def master(self, db: int = 0) -> redis.Redis:
        """A test-side client of the master."""
        return redis.Redis(
            host="127.0.0.1", port=self.master_port, db=db, password=self.master_password,
            socket_timeout=5, socket_connect_timeout=5,
        )  # fmt: skip


@contextlib.contextmanager
def sentinel_deployment(directory: Path, sentinels: int = 2) -> Iterator[SentinelDeployment]:
    """A private master and ``sentinels`` ``redis-server --sentinel`` on free ports."""
    directory.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    rng = random.Random()
    deployment = SentinelDeployment(free_port(rng), [], "master-pw", "sentinel-pw")
    try:
        argv = [
            _redis_server(), "--port", str(deployment.master_port), "--bind", "127.0.0.1",
            "--requirepass", deployment.master_password, "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--logfile", str(directory / "master.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        if not _wait(procs[-1], deployment.master(), "the Sentinel master"):
            raise RuntimeError("the Sentinel master exited (its port was taken?)")
        for index in range(sentinels):
            port = free_port(rng)
            conf = directory / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"logfile {directory / f'sentinel-{index}.log'}\n"
                f"requirepass {deployment.sentinel_password}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {deployment.master_port} 1\n"
                f"sentinel auth-pass {MASTER} {deployment.master_password}\n"
                f"sentinel down-after-milliseconds {MASTER} 60000\n"
            )
            procs.append(subprocess.Popen([_redis_server(), str(conf), "--sentinel"]))
            ping = redis.Redis(
                host="127.0.0.1", port=port, password=deployment.sentinel_password,
                socket_timeout=5, socket_connect_timeout=5,
            )  # fmt: skip
            if not _wait(procs[-1], ping, f"sentinel on {port}"):
                raise RuntimeError(f"a sentinel exited (port {port} taken?)")
            deployment.sentinel_ports.append(port)
        yield deployment
    finally:
        for proc in reversed(procs):
            _stop(proc)
