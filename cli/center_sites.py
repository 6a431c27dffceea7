"""`mllmdr-center init | approve`: the center's keys and the sites it admits."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.common import DirOpt, center_dir, console, emit_json
from mllm_dr import audit


def init(dir: Path = DirOpt,
         host: str = typer.Option("127.0.0.1", "--host", help="Address the SuperLink listens on and sites dial."),
         port: int = typer.Option(9092, "--port", min=1024, max=65535),
         san: Optional[List[str]] = typer.Option(None, "--san", help="Extra names/IPs for the TLS certificate."),
         json_out: bool = typer.Option(False, "--json")):
    """Create the center: private CA, SuperLink TLS certificate, checkpoint signing key.

    The Ed25519 key signs every global checkpoint; sites get its public half in their bundle.

    Example: mllmdr-center init --dir /srv/center --host 10.0.0.5 --san center.hospital-net.org
    """
    from mllm_dr.center import CenterDir
    from mllm_dr.pki import cert_sans
    from mllm_dr.signing import fingerprint, load_private

    c = CenterDir.init(dir, host, port, san or [])
    fp = fingerprint(load_private(c.signing_key).public_key())
    audit.append(c.audit_path, "center_init", signing_key=fp, address=c.config.address)
    out = {"dir": str(c.root), "address": c.config.address, "tls_names": cert_sans(c.pki / "server.pem"),
           "signing_key": fp}
    emit_json(out) if json_out else console.print(" ".join(f"{k}={v}" for k, v in out.items()))


def approve(request: Path = typer.Argument(..., help="A site's enrollment request file."),
            dir: Path = DirOpt,
            out: Path = typer.Option(..., "--out", help="Bundle file to send back to the site."),
            json_out: bool = typer.Option(False, "--json")):
    """Approve a site's enrollment request and write its bundle.

    The node key is registered with the SuperLink now if it is running, else at the next 'serve';
    the bundle carries the CA certificate, the center's public key and the address.

    Example: mllmdr-center approve site-a.request.json --dir /srv/center --out site-a.bundle.json
    """
    from fl_server.superlink import register, superlink_pidfile
    from mllm_dr.enrollment import read_request, write_bundle
    from mllm_dr.processes import running_from_pidfile

    c = center_dir(dir)
    req = read_request(request)
    c.approve(req)
    registered = "at next serve"
    if running_from_pidfile(superlink_pidfile(c)):
        registered = register(c, req.site_id)
    write_bundle(out, req, c.config.address, (c.pki / "ca.crt").read_text(), c.signing_pub.read_text())
    audit.append(c.audit_path, "approve", site=req.site_id, node_fingerprint=req.fingerprint, registered=registered)
    res = {"site_id": req.site_id, "node_fingerprint": req.fingerprint, "bundle": str(out), "registered": registered}
    emit_json(res) if json_out else console.print(" ".join(f"{k}={v}" for k, v in res.items()))
