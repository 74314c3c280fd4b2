"""Development certificates: a CA, a server and a client certificate (`make certs`). Not for production.

python -m nanodist.services.common.devcerts DIR [--hosts localhost,127.0.0.1,...]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = "localhost,127.0.0.1,ps-0,ps-1,barrier,lock"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nanodist dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(directory: str, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    with open(os.path.join(directory, f"{stem}.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    key_path = os.path.join(directory, f"{stem}-key.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    os.chmod(key_path, 0o600)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool,
    usage: list[x509.ObjectIdentifier],
    hosts: list[str],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(directory: str, stem: str = "ca") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue("nanodist dev CA", key, _name("nanodist dev CA"), key, True, [], [])
    _write(directory, stem, key, cert)
    return key, cert


def make_leaf(
    directory: str,
    stem: str,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    hosts: list[str],
    client: bool = False,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
    _write(directory, stem, key, _issue(f"nanodist {stem}", key, ca[1].subject, ca[0], False, usage, hosts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--hosts", default=DEFAULT_HOSTS, help="names and addresses in the server certificate")
    args = parser.parse_args()
    os.makedirs(args.directory, exist_ok=True)
    ca = make_ca(args.directory)
    make_leaf(args.directory, "server", ca, args.hosts.split(","))
    make_leaf(args.directory, "client", ca, [], client=True)
    write_tokens(args.directory)
    print(
        f"wrote ca.pem, server.pem, server-key.pem, client.pem, client-key.pem, tokens and worker.token "
        f"to {args.directory}/"
    )


def write_tokens(directory: str) -> None:
    """`tokens` for servers (one per role) and `worker.token` for workers, random each time."""
    tokens = {role: secrets.token_urlsafe(24) for role in ("worker", "reader", "admin")}
    with open(os.path.join(directory, "tokens"), "w") as f:
        f.writelines(f"{token} {role}\n" for role, token in tokens.items())
    with open(os.path.join(directory, "worker.token"), "w") as f:
        f.write(f"{tokens['worker']} worker\n")
    for name in ("tokens", "worker.token"):
        os.chmod(os.path.join(directory, name), 0o600)


if __name__ == "__main__":
    main()
