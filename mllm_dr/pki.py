"""Certificates and node keys for the federation, all made with ``cryptography``.

- The center's private CA signs one TLS server certificate whose subjectAltNames cover
  every address sites (and the center's own processes) connect to.
- Each site holds a P-384 key pair in OpenSSH format: Flower's SuperNode authentication
  identifies a node by that public key. The private key never leaves the site.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mllm_dr.private import write_private

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(name: str) -> str:
    """An IP address or an RFC 1123 host name; raises ValueError naming what is wrong."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(lb) for lb in labels):
        raise ValueError(f"{name!r} is neither an IP address nor a host name (RFC 1123: letters, digits and '-', "
                         "dot-separated labels of 1-63 characters)")
    if all(lb.isdigit() for lb in labels):
        raise ValueError(f"{name!r} looks like an IP address but is not a valid one")
    return name


def _write_pair(folder: Path, name: str, key, cert: x509.Certificate) -> tuple[Path, Path]:
    """``name.key`` (PKCS8) and the certificate beside it, both mode 600."""
    key_path = folder / f"{name}.key"
    cert_path = folder / ("ca.crt" if name == "ca" else f"{name}.pem")
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MLlm-DR federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: Path, days: int = 3650) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("MLlm-DR center CA")).issuer_name(_name("MLlm-DR center CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    return _write_pair(folder, "ca", key, cert)


def subject_alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_server_cert(folder: Path, hosts: list[str], days: int = 825) -> tuple[Path, Path]:
    """TLS certificate for the SuperLink, signed by the CA in ``folder``; SANs = ``hosts``."""
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(subject_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return _write_pair(folder, "server", key, cert)


def cert_sans(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def make_node_key(private_path: Path) -> str:
    """P-384 key pair in OpenSSH format (Flower node auth); returns the public key line."""
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    write_private(private_path.with_suffix(".pub"), pub + "\n")
    return pub


def check_node_public_key(line: str) -> str:
    """Parse an OpenSSH public key line; raises ValueError unless it is NIST P-384, as this kit writes it:
    "<type> <base64>", one space, nothing after (a comment, or other white space, gave the same key another
    fingerprint, which passed the center's revoked and one-key-one-site checks: a review, session 42)."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except UnsupportedAlgorithm:
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError("node keys must be ECDSA P-384 (ecdsa-sha2-nistp384)")
    canonical = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    if line.strip() != canonical:        # a comment, two spaces, a tab: the same key under another fingerprint
        raise ValueError("a node key is one OpenSSH line '<type> <base64>' as the kit writes it, nothing else")
    return canonical
