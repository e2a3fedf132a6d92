"""Certificates: a small private CA for the agents, and the command that makes one.

``python -m swarmagent.certs init --out DIR [--name NODE ...] [--ip ADDR ...]`` writes::

    ca.pem  ca-key.pem                 the CA (keep ca-key.pem off the nodes)
    server-cert.pem  server-key.pem    AGENT_TLS_CERT / AGENT_TLS_KEY for every agent
    ca.pem  cert.pem  key.pem          a client certificate in Docker's layout

so ``DOCKER_CERT_PATH=DIR DOCKER_TLS_VERIFY=1 docker -H tcp://NODE:9001 ...`` works, and so
does ``docker.tls.TLSConfig(client_cert=(cert.pem, key.pem), ca_cert=ca.pem, verify=True)``.
The server certificate may also act as a client (agent-to-agent calls present it).

``python -m swarmagent.certs client --ca-dir DIR --out OTHER [--name CN]`` issues one more
client certificate from that CA into OTHER (``ca.pem``, ``cert.pem``, ``key.pem``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_DAYS = 3650
LEAF_DAYS = 365
#: Certificates start a little in the past, so a node whose clock is behind accepts them.
BACKDATE = datetime.timedelta(minutes=5)

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "cert.pem", "key.pem"

CERT_MODE, KEY_MODE = 0o644, 0o600


def new_key(kind: str = "ec") -> PrivateKey:
    """A new private key: ECDSA P-256 (``"ec"``) or RSA-2048 (``"rsa"``)."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r}")


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(key: PrivateKey, *, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        # RSA key exchange needs it; harmless and expected on RSA leaf certificates.
        key_encipherment=isinstance(key, rsa.RSAPrivateKey) and not ca,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    common_name: str = "swarmagent CA",
    *,
    days: int = CA_DAYS,
    key: PrivateKey | None = None,
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = key or new_key()
    start = _now(now) - BACKDATE
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key, ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _sans(dns_names: Iterable[str], ips: Iterable[IPAddress]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(dns_names):
        out.append(x509.DNSName(name))
    for ip in dict.fromkeys(ips):
        out.append(x509.IPAddress(ip))
    return out


def _leaf(
    subject: str,
    issuer: x509.Name,
    signing_key: PrivateKey,
    key: PrivateKey,
    *,
    dns_names: Iterable[str],
    ips: Iterable[IPAddress],
    usages: Sequence[x509.ObjectIdentifier],
    days: int,
    now: datetime.datetime | None,
    issuer_key_id: x509.SubjectKeyIdentifier | None,
) -> x509.Certificate:
    start = _now(now) - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    sans = _sans(dns_names, ips)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if issuer_key_id is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_key_id),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def issue(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    *,
    dns_names: Iterable[str] = (),
    ips: Iterable[IPAddress] = (),
    server: bool = False,
    client: bool = False,
    days: int = LEAF_DAYS,
    key: PrivateKey | None = None,
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf certificate signed by the CA, for server and/or client authentication."""
    if not (server or client):
        raise ValueError("a certificate must be for a server, a client or both")
    key = key or new_key()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ca_ski = None
    cert = _leaf(
        common_name,
        ca_cert.subject,
        ca_key,
        key,
        dns_names=dns_names,
        ips=ips,
        usages=usages,
        days=days,
        now=now,
        issuer_key_id=ca_ski,
    )
    return cert, key


def self_signed(
    common_name: str,
    *,
    dns_names: Iterable[str] = (),
    ips: Iterable[IPAddress] = (),
    days: int = LEAF_DAYS,
    key: PrivateKey | None = None,
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed server certificate, as the reference agent makes at every start."""
    key = key or new_key()
    cert = _leaf(
        common_name,
        _name(common_name),
        key,
        key,
        dns_names=dns_names,
        ips=ips,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        days=days,
        now=now,
        issuer_key_id=None,
    )
    return cert, key


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of one certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM, which Go, OpenSSL and Python's ssl all read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_key(path: str | os.PathLike[str]) -> PrivateKey:
    """An unencrypted PEM private key (PKCS#1, SEC1 or PKCS#8), ECDSA or RSA."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{path}: only ECDSA and RSA keys are supported")
    return key


def write_files(folder: Path, files: dict[str, tuple[bytes, int]], force: bool = False) -> None:
    """Write ``name -> (content, mode)``; refuse to replace any file unless ``force``.

    Each file appears whole, with its mode already set (a key is never world-readable,
    even for a moment).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not force:
        existing = sorted(name for name in files if (folder / name).exists())
        if existing:
            raise FileExistsError(
                f"{folder} already has {', '.join(existing)}; use --force to replace"
            )
    for name, (content, mode) in files.items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def init(
    out: Path,
    names: Sequence[str] = (),
    ips: Sequence[IPAddress] = (),
    *,
    days: int = LEAF_DAYS,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> None:
    """Write a CA, a server certificate and a Docker-layout client certificate to ``out``."""
    ca_cert, ca_key = make_ca(now=now)
    server_ips = [*ips, ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    server_cert, server_key = issue(
        ca_cert,
        ca_key,
        names[0] if names else "swarmagent",
        dns_names=[*names, "localhost"],
        ips=server_ips,
        server=True,
        client=True,
        days=days,
        now=now,
    )
    client_cert, client_key = issue(ca_cert, ca_key, "swarmagent client", client=True, now=now)
    write_files(
        out,
        {
            CA_CERT: (cert_pem(ca_cert), CERT_MODE),
            CA_KEY: (key_pem(ca_key), KEY_MODE),
            SERVER_CERT: (cert_pem(server_cert), CERT_MODE),
            SERVER_KEY: (key_pem(server_key), KEY_MODE),
            CLIENT_CERT: (cert_pem(client_cert), CERT_MODE),
            CLIENT_KEY: (key_pem(client_key), KEY_MODE),
        },
        force,
    )


def issue_client(
    ca_dir: Path,
    out: Path,
    common_name: str = "swarmagent client",
    *,
    days: int = LEAF_DAYS,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> None:
    """Write ``ca.pem``, ``cert.pem`` and ``key.pem`` for a new client of the ``ca_dir`` CA."""
    ca_cert = load_cert(ca_dir / CA_CERT)
    ca_key = load_key(ca_dir / CA_KEY)
    cert, key = issue(ca_cert, ca_key, common_name, client=True, days=days, now=now)
    write_files(
        out,
        {
            CA_CERT: (cert_pem(ca_cert), CERT_MODE),
            CLIENT_CERT: (cert_pem(cert), CERT_MODE),
            CLIENT_KEY: (key_pem(key), KEY_MODE),
        },
        force,
    )


def _ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_dns_name(text: str) -> bool:
    """Whether ``text`` can go in a certificate as a DNS name (ASCII labels, ``*.`` allowed)."""
    labels = text.removeprefix("*.").removesuffix(".").split(".")
    return 0 < len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _dns(text: str) -> str:
    if not is_dns_name(text):
        raise argparse.ArgumentTypeError(f"not a DNS name: {text!r}")
    return text


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of days: {text!r}")
    return days


def parser() -> argparse.ArgumentParser:
    """The ``python -m swarmagent.certs`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m swarmagent.certs", description="Certificates for swarmagent TLS."
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="make a CA, a server certificate and a client certificate")
    i.add_argument("--out", type=Path, required=True, help="folder to write to")
    i.add_argument(
        "--name", action="append", type=_dns, default=[], help="DNS name of the agents (repeatable)"
    )
    i.add_argument(
        "--ip", action="append", type=_ip, default=[], help="IP of the agents (repeatable)"
    )
    c = sub.add_parser("client", help="issue one more client certificate from an existing CA")
    c.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.pem and ca-key.pem")
    c.add_argument("--out", type=Path, required=True, help="folder to write to")
    c.add_argument("--name", default="swarmagent client", help="common name of the client")
    for s in (i, c):
        s.add_argument("--days", type=_days, default=LEAF_DAYS, help="validity of the leaves")
        s.add_argument("--force", action="store_true", help="replace existing files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser().parse_args(argv)
    try:
        if args.command == "init":
            init(args.out, args.name, args.ip, days=args.days, force=args.force)
        else:
            issue_client(args.ca_dir, args.out, args.name, days=args.days, force=args.force)
    except (OSError, ValueError) as e:
        print(f"swarmagent.certs: {e}", file=sys.stderr)
        return 1
    print(f"wrote certificates to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
