"""A throwaway PKI for the web server tests: a CA, a server certificate for 127.0.0.1/localhost and client
certificates (one from the trusted CA, one from a stranger's), written as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@dataclass
class Pair:
    cert: Path
    key: Path


class CA:
    def __init__(self, directory: Path, name: str):
        self.dir = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / f"{name}.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        pair = Pair(self.dir / f"{cn}.crt", self.dir / f"{cn}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return pair


def server_context(pair: Pair, *, client_ca: CA | None = None) -> ssl.SSLContext:
    """A server-side TLS context serving `pair`; with `client_ca`, a client certificate from that CA is required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca.path))
    return ctx


def encrypted_copy(pair: Pair, passphrase: bytes = b"pass phrase") -> Path:
    """The pair's key, encrypted with a pass phrase, in a file next to it (`<cn>.enc.key`)."""
    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    path = pair.key.with_suffix(".enc.key")
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(passphrase)))
    path.chmod(0o600)
    return path


def run_on_pty(script: str, arg: str, *, lines: int, wait: float = 30.0) -> str:
    """Run `python -c script arg` in a new session whose controlling terminal is a pty of ours (the script makes it
    so with TIOCSCTTY on fd 0) — where OpenSSL's default would ask for a key's pass phrase and wait. Returns what it
    wrote once `lines` lines came, it ended, or nothing came for `wait` seconds (it is killed then)."""
    import os
    import pty
    import select
    import subprocess
    import sys

    primary, secondary = pty.openpty()
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", script, arg], stdin=secondary, stdout=secondary,
                            stderr=secondary, start_new_session=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    os.close(secondary)
    out = b""
    try:
        while out.count(b"\n") < lines:
            ready, _, _ = select.select([primary], [], [], wait)
            if not ready:
                break  # waiting at a prompt (or stuck): what it said so far is the evidence
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the child is gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(primary)
    return out.decode(errors="replace").replace("\r\n", "\n")
