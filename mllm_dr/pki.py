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


def check_address(address: str) -> str:
    """``host:port`` as a SuperNode dials it (Flower's ``--superlink``): a host name or IPv4 address, or an IPv6
    address in brackets, then a port 1-65535; ValueError naming what is wrong. A bundle saying
    "https://center.example.org" was installed and the SuperNode waited for it forever (a review, session 46)."""
    text = address.strip() if isinstance(address, str) else ""
    host, sep, port = text.rpartition(":")
    why = None
    if not sep or not host or "/" in text or " " in text:
        why = "not host:port"
    elif not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        why = f"port {port!r} is not a number 1-65535"
    elif host.startswith("["):
        try:
            ok = host.endswith("]") and ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            ok = False
        why = None if ok else f"{host!r} is not an IPv6 address in brackets"
    elif ":" in host:
        why = "an IPv6 address goes in brackets, e.g. [2001:db8::1]:9092"
    else:
        try:
            check_host(host)
        except ValueError as err:
            why = str(err)
    if why:
        raise ValueError(f"superlink_address {address!r}: {why} (expected host:port, e.g. center.example.org:9092 "
                         "or [2001:db8::1]:9092)")
    return text


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


def make_server_cert(folder: Path, hosts: list[str], days: int = 825,
                     now: dt.datetime | None = None) -> tuple[Path, Path]:
    """TLS certificate for the SuperLink and its new key, signed by the CA in ``folder``; SANs = ``hosts``."""
    key = ec.generate_private_key(ec.SECP384R1())
    return _write_pair(folder, "server", key, server_cert(folder, key.public_key(), hosts, days, now))


def server_cert(folder: Path, public_key, hosts: list[str], days: int = 825,
                now: dt.datetime | None = None) -> x509.Certificate:
    """A SuperLink certificate for ``public_key`` (not written), signed by the CA in ``folder``: valid ``days``
    from ``now`` (default this moment; a test passes an earlier one for an expired certificate), never past
    the CA's own expiry (a chain is no longer valid than its CA)."""
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    now = now or dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(subject_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))


def renewed_server_cert(folder: Path, hosts: list[str], days: int = 825) -> x509.Certificate:
    """The SuperLink's certificate issued again for its key ``server.key`` (not written): nothing renewed the
    825-day certificate, and an expired one fails every site's TLS handshake (a review, session 44). The
    same CA signs it, so enrolled sites keep trusting it; the key stays, so the one file that changes,
    ``server.pem``, is replaced whole (``write_cert``). ValueError when the key is not readable."""
    try:
        key = serialization.load_pem_private_key((folder / "server.key").read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{folder / 'server.key'}: the SuperLink's key is not readable ({type(err).__name__}); "
                         "restore it from a backup") from None
    return server_cert(folder, key.public_key(), hosts, days)


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    """A certificate as PEM, mode 600, replaced whole (``write_private``)."""
    return write_private(path, cert.public_bytes(serialization.Encoding.PEM))


def cert_expiry(path: Path) -> dt.datetime:
    """When the certificate in ``path`` expires (UTC); ValueError when it is not a readable PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc
    except OSError as err:
        raise ValueError(f"{path}: cannot read the certificate ({err.strerror})") from None
    except ValueError:
        raise ValueError(f"{path}: not a PEM certificate; restore it from a backup") from None


def check_ca_certificate(pem: str, now: dt.datetime | None = None) -> x509.Certificate:
    """``pem`` as a CA certificate (PEM, BasicConstraints ca=True) valid at ``now`` (default this moment);
    ValueError naming what is wrong. A bundle whose ca_certificate was anything at all replaced a site's working
    ca.crt (a review, session 44); one past its expiry was installed and every TLS handshake failed (session 46)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise ValueError("ca_certificate is not a PEM certificate") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):      # none, or one that does not parse
        is_ca = False
    if not is_ca:
        raise ValueError("ca_certificate is not a CA certificate (no BasicConstraints ca=True)")
    now = now or dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise ValueError(f"the center's CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < cert.not_valid_before_utc:
        raise ValueError(f"the center's CA certificate is not valid before "
                         f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    return cert


def cert_sha256(pem: str | bytes) -> str:
    """A PEM certificate's SHA-256 fingerprint (over its DER bytes) as OpenSSL prints it, ``AB:CD:...``, so an
    operator can compare it with ``openssl x509 -in ca.crt -noout -fingerprint -sha256``; ValueError when ``pem``
    is not a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise ValueError("not a PEM certificate") from None
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


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


def node_public_key_of(private_path: Path) -> str:
    """The OpenSSH public key line of the node key at ``private_path`` (``make_node_key``'s), derived from the
    private key itself; ValueError when the file is not such a key."""
    try:
        key = serialization.load_ssh_private_key(Path(private_path).read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"not an unencrypted OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise ValueError("not an ECDSA P-384 node key")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


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
