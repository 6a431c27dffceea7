"""`mllmdr-center init | approve | sites | revoke | renew-cert | fingerprint`: the center's keys and the sites it
admits."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import DirOpt, center_dir, console, emit_json
from cli.field_lines import print_fields
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

    c = CenterDir.init(dir, host, port, san or [], feature_recipe)
    ident = center_identity(c)
    fp = ident["signing_key"]
    audit.append(c.audit_path, "center_init", signing_key=fp, address=c.config.address, ca_sha256=ident["ca_sha256"])
    out = {"dir": str(c.root), "address": c.config.address, "tls_names": cert_sans(c.pki / "server.pem"),
           "signing_key": fp, "feature_recipe": c.config.feature_recipe or None}
    if json_out:
        emit_json(out)
        return
    print_fields(f"center created in {c.root}",
                 [("address", out["address"]), ("TLS names", out["tls_names"]),
                  ("feature recipe", out["feature_recipe"]), *_identity_rows(ident)],
                 *_pin_advice(fp))


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

    from mllm_dr.signing import load_private

    c = center_dir(dir)
    req = read_request(request)
    if out.is_dir():                  # before approving: a failed bundle write left an approval unaudited
        raise InputError("--out is a folder; give the bundle's file name", out)
    running = running_from_pidfile(superlink_pidfile(c))
    if _approval_audited(c, req):     # the same request again changes nothing and is not audited twice
        status = c.approve(req)
    else:
        with _audited(c, "approve", site=req.site_id, node_fingerprint=req.fingerprint, audit_key=req.audit_key,
                      registered="now" if running else "at next serve"):
            status = c.approve(req)
    registered = register(c, req.site_id) if running else "at next serve"
    ident = center_identity(c)
    write_bundle(out, req, c.config.address, (c.pki / "ca.crt").read_text(), c.signing_pub.read_text(),
                 ident["audit_key"], c.config.feature_recipe, signing_key=load_private(c.signing_key))
    res = {"site_id": req.site_id, "status": status, "node_fingerprint": req.fingerprint, "bundle": str(out),
           "registered": registered}
    if json_out:
        emit_json(res)
        return
    print_fields(f"site {req.site_id}: {status}",
                 [("node key", req.fingerprint), ("registered", registered), ("bundle", str(out)),
                  ("center key", ident["signing_key"])],
                 f"Send the bundle to the site; give its operator the center key {ident['signing_key']} by another "
                 f"way (phone, in person) for 'mllmdr-site enroll --accept BUNDLE --center-fingerprint "
                 f"{ident['signing_key']}'.")


def fingerprint(dir: Path = DirOpt, json_out: bool = typer.Option(False, "--json")):
    """The center's identity, to read out to each site by another way than its bundle (phone, in person).

    The signing key fingerprint is what 'mllmdr-site enroll --accept BUNDLE --center-fingerprint FP' checks
    (the bundle is signed with that key, so it vouches for the CA certificate and audit key too); the CA
    certificate's SHA-256 is OpenSSL's ('openssl x509 -in pki/ca.crt -noout -fingerprint -sha256').

    Example: mllmdr-center fingerprint --dir /srv/center
    """
    c = center_dir(dir)
    ident = center_identity(c)
    if json_out:
        emit_json({"dir": str(c.root), "address": c.config.address, **ident})
        return
    print_fields(f"center {c.config.address} ({c.root})", _identity_rows(ident), *_pin_advice(ident["signing_key"]))


def center_identity(c) -> dict:
    """What a site trusts in this center, by fingerprint: the checkpoint-signing key (the pin; 16 hex digits as
    everywhere in the kit), the CA certificate (SHA-256, OpenSSL's format) and the audit key."""
    from mllm_dr.pki import cert_sha256
    from mllm_dr.signing import fingerprint as key_fingerprint, load_private

    try:
        ca = cert_sha256((c.pki / "ca.crt").read_bytes())
    except ValueError as err:
        raise InputError(f"{err}; restore it from a backup", c.pki / "ca.crt") from None
    return {"signing_key": key_fingerprint(load_private(c.signing_key).public_key()), "ca_sha256": ca,
            "audit_key": key_fingerprint(load_private(audit.key_path(c.audit_path)).public_key())}


def _identity_rows(ident: dict) -> list[tuple[str, str]]:
    return [("signing key fingerprint", ident["signing_key"]), ("CA certificate SHA-256", ident["ca_sha256"]),
            ("audit key fingerprint", ident["audit_key"])]


def _pin_advice(fp: str) -> tuple[str, ...]:
    return (f"Read the signing key fingerprint to each site's operator by another way than the bundle (phone, in "
            f"person); the site checks it with 'mllmdr-site enroll --accept BUNDLE --center-fingerprint {fp}'.",)


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
    from fl_server.superlink import node_id_of, revoke as revoke_site, superlink_pidfile
    from mllm_dr.processes import running_from_pidfile

    c = center_dir(dir)
    rec = c.site(site)
    running = running_from_pidfile(superlink_pidfile(c))
    with _audited(c, "revoke", site=site, node_fingerprint=rec["fingerprint"], node_id=node_id_of(c, rec),
                  unregistered="now" if running else "at next serve"):
        res = revoke_site(c, site)
    if json_out:
        emit_json(res)
        return
    print_fields(f"site {res['site_id']} revoked", [("node key", res["node_fingerprint"]), ("node id", res["node_id"]),
                                                     ("unregistered", res["unregistered"])])


def renew_cert(dir: Path = DirOpt,
               san: Optional[List[str]] = typer.Option(None, "--san", help="Another name/IP for the certificate "
                                                       "(kept in center.json for later renewals)."),
               json_out: bool = typer.Option(False, "--json")):
    """Re-issue the SuperLink's TLS certificate (pki/server.pem), valid 825 days, signed by the same CA.

    Enrolled sites keep trusting it (ca.crt does not change) and need no new bundle. 'serve' refuses an
    expired certificate and warns 30 days before. A running SuperLink uses the new one after
    'mllmdr-center stop' and 'mllmdr-center serve'.

    Example: mllmdr-center renew-cert --dir /srv/center
    Example: mllmdr-center renew-cert --dir /srv/center --san center2.hospital-net.org
    """
    from fl_server.superlink import superlink_pidfile
    from mllm_dr.pki import cert_expiry
    from mllm_dr.processes import running_from_pidfile

    c = center_dir(dir)
    try:
        before = cert_expiry(c.server_cert_path).isoformat()
    except ValueError:
        before = None                      # damaged or missing: renewing is the remedy
    cert, sans = c.renewal(san or [])
    expires = cert.not_valid_after_utc.isoformat()
    with _audited(c, "renew_cert", certificate=str(c.server_cert_path), previous_expiry=before, expires=expires,
                  tls_names=sans, serial=format(cert.serial_number, "x")):
        c.install_server_cert(cert, sans)
    out = {"certificate": str(c.server_cert_path), "expires": expires, "previous_expiry": before,
           "tls_names": sans, "restart_needed": bool(running_from_pidfile(superlink_pidfile(c)))}
    if json_out:
        emit_json(out)
        return
    print_fields("SuperLink certificate renewed",
                 [("certificate", out["certificate"]), ("expires", out["expires"]),
                  ("previous expiry", out["previous_expiry"]), ("TLS names", out["tls_names"])],
                 *(["Restart the SuperLink to use it: 'mllmdr-center stop', then 'mllmdr-center serve'."]
                   if out["restart_needed"] else []))


@contextmanager
def _audited(c, event: str, **details):
    """Audit ``event`` (what is about to be done) before the change is made, then make it in the block.

    The site records were written first and audited after: a full disk at the audit log left a site approved
    (or revoked) with no entry, and the retry said "already approved" and wrote none (a review, session 44).
    When the change then fails, an ``<event>_failed`` entry says so (best effort: on a full disk it fails too,
    and the error reported is the change's own).
    """
    audit.append(c.audit_path, event, **details)
    try:
        yield
    except Exception as err:
        try:
            audit.append(c.audit_path, f"{event}_failed", site=details.get("site"),
                         reason=f"{type(err).__name__}: {err}"[:300])
        except OSError:
            pass
        raise


def _approval_audited(c, req) -> bool:
    """Is this request approved already, with its ``approve`` entry in the log? (InputError when it may not be
    approved.) An approval an older kit left unaudited (session 44) gets its entry at the next approve."""
    if not c.is_approved(req):
        return False
    done = audit.count_events(c.audit_path, ("approve",), "node_fingerprint")
    return bool(done.get(("approve", req.fingerprint)))
