"""`mllmdr-center init | approve | sites | revoke`: the center's keys and the sites it admits."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from cli.common import DirOpt, center_dir, console, emit_json
from mllm_dr import audit
from mllm_dr.errors import InputError


def init(dir: Path = DirOpt,
         host: str = typer.Option("127.0.0.1", "--host", help="Address the SuperLink listens on and sites dial "
                                                             "(IP address or RFC 1123 host name)."),
         port: int = typer.Option(9092, "--port", min=1024, max=65535),
         san: Optional[List[str]] = typer.Option(None, "--san", help="Extra names/IPs for the TLS certificate."),
         feature_recipe: str = typer.Option("", "--feature-recipe", help="The federation's feature recipe, for sites "
                                            "that record differently: 'egemaps-openface' (see README). Sent in every "
                                            "enrollment bundle; the default of every run."),
         json_out: bool = typer.Option(False, "--json")):
    """Create the center: private CA, SuperLink TLS certificate, checkpoint signing key.

    The Ed25519 key signs every global checkpoint; sites get its public half in their bundle.

    Example: mllmdr-center init --dir /srv/center --host 10.0.0.5 --san center.hospital-net.org
    Example: mllmdr-center init --dir /srv/center --feature-recipe egemaps-openface
    """
    from mllm_dr.center import CenterDir
    from mllm_dr.pki import cert_sans
    from mllm_dr.signing import fingerprint, load_private

    c = CenterDir.init(dir, host, port, san or [], feature_recipe)
    fp = fingerprint(load_private(c.signing_key).public_key())
    audit.append(c.audit_path, "center_init", signing_key=fp, address=c.config.address)
    out = {"dir": str(c.root), "address": c.config.address, "tls_names": cert_sans(c.pki / "server.pem"),
           "signing_key": fp, "feature_recipe": c.config.feature_recipe or None}
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

    from mllm_dr.signing import fingerprint, load_private

    c = center_dir(dir)
    req = read_request(request)
    if out.is_dir():                  # before approving: a failed bundle write left an approval unaudited
        raise InputError("--out is a folder; give the bundle's file name", out)
    status = c.approve(req)
    registered = "at next serve"
    try:
        if running_from_pidfile(superlink_pidfile(c)):
            registered = register(c, req.site_id)
    finally:    # an approval is audited whatever follows (a failed registration happens at the next serve)
        if status == "approved":      # the same request again changes nothing and is not audited twice
            audit.append(c.audit_path, "approve", site=req.site_id, node_fingerprint=req.fingerprint,
                         audit_key=req.audit_key, registered=registered)
    center_audit_key = fingerprint(load_private(audit.key_path(c.audit_path)).public_key())
    write_bundle(out, req, c.config.address, (c.pki / "ca.crt").read_text(), c.signing_pub.read_text(),
                 center_audit_key, c.config.feature_recipe)
    res = {"site_id": req.site_id, "status": status, "node_fingerprint": req.fingerprint, "bundle": str(out),
           "registered": registered}
    emit_json(res) if json_out else console.print(" ".join(f"{k}={v}" for k, v in res.items()))


def sites(dir: Path = DirOpt, json_out: bool = typer.Option(False, "--json")):
    """Approved sites: node key fingerprint, audit key, approval time, last seen, last audit head.

    Last seen comes from the SuperLink ('flwr supernode ls') while it runs, else from the runs' histories.

    Example: mllmdr-center sites --dir /srv/center --json
    """
    from rich.table import Table

    from fl_server.superlink import sites_overview

    c = center_dir(dir)
    rows = sites_overview(c)
    revoked = [{k: r.get(k) for k in ("site_id", "fingerprint", "revoked", "unregistered")} for r in c.revoked_sites()]
    if json_out:
        emit_json({"sites": rows, "revoked": revoked})
        return
    t = Table(title=f"sites of {c.config.address}")
    for col in ("site", "node key", "approved", "status", "last seen", "audit head"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["site_id"], r["node_fingerprint"], str(r["approved"]), r["status"] or "-",
                  f"{r['last_seen']} ({r['seen_by']})" if r["last_seen"] else "never",
                  (r["audit_head"] or "-")[:24])
    console.print(t)
    if revoked:
        console.print("revoked: " + ", ".join(f"{r['site_id']} ({r['revoked']})" for r in revoked))


def revoke(site: str = typer.Argument(..., help="Site id, as in 'mllmdr-center sites'."),
           dir: Path = DirOpt,
           json_out: bool = typer.Option(False, "--json")):
    """Revoke a site: unregister its node key at the SuperLink and remove it from the approved sites.

    The SuperLink drops the node and refuses it at its next activation; if the SuperLink is not
    running, the key is unregistered when it next starts. The key can never be approved again.

    Example: mllmdr-center revoke hospital-b --dir /srv/center
    """
    from fl_server.superlink import revoke as revoke_site

    c = center_dir(dir)
    res = revoke_site(c, site)
    audit.append(c.audit_path, "revoke", site=site, node_fingerprint=res["node_fingerprint"],
                 node_id=res["node_id"], unregistered=res["unregistered"])
    emit_json(res) if json_out else console.print(" ".join(f"{k}={v}" for k, v in res.items()))
