"""TLS certificates and SuperNode keys for one federation, generated at start into its run folder (never committed).

    tls = make_tls(run_dir / "certs")          # a throw-away CA, and a server certificate for 127.0.0.1/localhost
    key = make_node_key(run_dir / "keys", 0)   # node-00 (OpenSSH EC P-384 private key) + node-00.pub

What Flower 1.42 expects: the SuperLink serves HTTPS with --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile, clients
verify it with --root-certificates (the CA). SuperNode authentication (`flower-superlink --enable-supernode-auth`)
takes an EC key on a NIST curve: the SuperNode reads its private key in OpenSSH format
(--auth-supernode-private-key), and its public key is registered beforehand with `flwr supernode register
KEY.pub CONNECTION` (OpenSSH format too).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from edge_ft.atomic import atomic_open, atomic_write_bytes

CERT_DAYS = 2  # a federation's certificates only need to outlive its run


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # the root every client verifies the SuperLink with (--root-certificates, root-certificates)
    server_cert: Path  # the SuperLink's certificate, SANs 127.0.0.1 and localhost (--ssl-certfile)
    server_key: Path  # its private key (--ssl-keyfile)


@dataclass(frozen=True)
class NodeKey:
    private: Path  # OpenSSH EC private key (flower-supernode --auth-supernode-private-key)
    public: Path  # OpenSSH public key line (flwr supernode register)


def _write_secret(path: Path, data: bytes) -> None:
    """Private keys readable by their owner only (the temp file is made private before the key is written)."""
    with atomic_open(path, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def make_tls(folder: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A self-signed CA and a server certificate it signed, for `host` (and localhost)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CERT_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-ft fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if host not in ("127.0.0.1", "localhost"):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    atomic_write_bytes(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(files.server_key, key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return files


def make_node_key(folder: Path, index: int) -> NodeKey:
    """node-NN / node-NN.pub: an EC P-384 key pair in OpenSSH format, the form Flower's SuperNode auth reads."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    out = NodeKey(folder / f"node-{index:02d}", folder / f"node-{index:02d}.pub")
    _write_secret(out.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
    atomic_write_bytes(out.public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
    return out
