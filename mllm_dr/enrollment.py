"""Joining a federation: a site's request, the center's bundle, the site's federation settings.

1. The site makes a P-384 key pair (``keys/node``, OpenSSH) and a request file carrying only
   the public key, its fingerprint and the site id.
2. The center approves the request (registers the key with the SuperLink) and answers with a
   bundle: its CA certificate, its Ed25519 signing public key and the SuperLink address.
3. The site installs the bundle into ``federation.json``; from then on it trusts only
   checkpoints signed by that key, over TLS anchored at that CA.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from mllm_dr.atomic import atomic_write_text
from mllm_dr.errors import InputError, read_model
from mllm_dr.pki import (check_address, check_ca_certificate, check_node_public_key, make_node_key,
                         node_public_key_of)
from mllm_dr.private import write_private
from mllm_dr.signing import fingerprint, load_public
from mllm_dr.workspace import Workspace
from mllm_dr.protocol import SiteName

FEDERATION_FILE = "federation.json"


class EnrollmentRequest(BaseModel):
    kind: str = Field("mllmdr-enrollment-request", pattern="^mllmdr-enrollment-request$")
    site_id: SiteName
    node_public_key: str
    fingerprint: str
    audit_key: str = Field("", description="fingerprint of the site's audit-log key: an anchor outside the site")
    created: str


class EnrollmentBundle(BaseModel):
    kind: str = Field("mllmdr-enrollment-bundle", pattern="^mllmdr-enrollment-bundle$")
    site_id: str
    superlink_address: str
    ca_certificate: str               # PEM
    center_public_key: str            # PEM, Ed25519: verifies global checkpoints
    center_fingerprint: str
    node_fingerprint: str
    center_audit_key: str = ""        # fingerprint of the center's audit-log key: checks its signed heads
    feature_recipe: str = ""          # the federation's feature recipe (mllm_dr/features/recipe.py); '' = none


class FederationSettings(BaseModel):
    """What a site needs to take part: stored in the workspace, no secret in it."""

    superlink_address: str
    ca_certificate_path: str
    center_public_key: str
    center_fingerprint: str
    node_key_path: str
    supernode_port: int = Field(9094, ge=1024, le=65535, description="the SuperNode's local ClientAppIo port")
    center_audit_key: str = Field("", description="fingerprint of the center's audit key (empty: first head seen)")
    feature_recipe: str = Field("", description="the federation's feature recipe; 'extract' uses it by default")


def key_fingerprint(openssh_line: str) -> str:
    return hashlib.sha256(openssh_line.strip().encode()).hexdigest()[:16]


def node_key_path(ws: Workspace) -> Path:
    return ws.root / "keys" / "node"


def make_request(ws: Workspace, out: Path) -> EnrollmentRequest:
    """Create the node key once (kept on site) and write the request file."""
    key = node_key_path(ws)
    pub = _kept_node_key(key) if key.is_file() else make_node_key(key)
    from mllm_dr.audit import _signing_key

    audit_key = fingerprint(_signing_key(ws.audit_path).public_key())
    req = EnrollmentRequest(site_id=ws.config.site_id, node_public_key=pub, fingerprint=key_fingerprint(pub),
                            audit_key=audit_key,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_text(out, req.model_dump_json(indent=1))
    return req


def _kept_node_key(key: Path) -> str:
    """The public key line of the site's node key, from the private key (the one truth): ``keys/node.pub`` is
    written again when it is missing or says another key. Session 44: a missing node.pub made `enroll --out`
    answer "does not exist", and an edited one was sent in the request as the site's key."""
    try:
        pub = node_public_key_of(key)
    except (OSError, ValueError) as err:
        raise InputError(f"the site's node key cannot be read ({err}); restore it from a backup, or remove "
                         f"keys/node* to make a new one (the center must then approve a new request)", key) from None
    kept = key.with_suffix(".pub")
    if not kept.is_file() or kept.read_text().strip() != pub:
        write_private(kept, pub + "\n")
    return pub


def read_request(path: Path) -> EnrollmentRequest:
    req = read_model(path, EnrollmentRequest, "enrollment request")
    try:
        check_node_public_key(req.node_public_key)
    except ValueError as err:
        raise InputError(f"enrollment request: {err}", path) from None
    if key_fingerprint(req.node_public_key) != req.fingerprint:
        raise InputError("enrollment request: fingerprint does not match the public key", path)
    return req


def install_bundle(ws: Workspace, bundle_path: Path, supernode_port: int | None = None,
                   replace_center: bool = False) -> FederationSettings:
    """Install the center's bundle: ``keys/ca.crt``, then ``federation.json``.

    Everything is checked before anything is written (session 44): the CA certificate must be one
    (PEM, BasicConstraints ca=True), and the old settings readable, else a working ca.crt was replaced
    by whatever the bundle held, or before a damaged federation.json stopped the install. Session 46: the
    bundle must approve the node key the private key ``keys/node`` is (``keys/node.pub`` was trusted), name
    the SuperLink as host:port, carry a CA certificate valid now, and come from the center this site is
    enrolled with (another center's key only with ``replace_center``). The caller refuses while this
    workspace's SuperNode runs (``cli/site_federation.py``: the SuperNode is in ``fl_client``).
    """
    bundle = read_model(bundle_path, EnrollmentBundle, "enrollment bundle")
    key = node_key_path(ws)
    if not key.is_file():
        raise InputError("no node key in this workspace; run 'mllmdr-site enroll --out REQUEST' first", ws.root)
    if bundle.site_id != ws.config.site_id:
        raise InputError(f"bundle is for site {bundle.site_id!r}, this workspace is {ws.config.site_id!r}", bundle_path)
    if bundle.node_fingerprint != key_fingerprint(_kept_node_key(key)):
        raise InputError("bundle approves a different node key than this workspace's", bundle_path)
    pub = load_public(bundle.center_public_key, bundle_path)
    if fingerprint(pub) != bundle.center_fingerprint:
        raise InputError("bundle: center key fingerprint does not match the key", bundle_path)
    try:
        address = check_address(bundle.superlink_address)
        check_ca_certificate(bundle.ca_certificate)
    except ValueError as err:
        raise InputError(f"bundle: {err}; ask the center for a new bundle", bundle_path) from None
    old = federation_settings(ws) if (ws.root / FEDERATION_FILE).is_file() else None
    if old and old.center_fingerprint != bundle.center_fingerprint and not replace_center:
        raise InputError(f"bundle comes from another center (key {bundle.center_fingerprint}) than the one this site "
                         f"is enrolled with (key {old.center_fingerprint}); to leave that federation for this one, "
                         "give --replace-center", bundle_path)
    ca = write_private(ws.root / "keys" / "ca.crt", bundle.ca_certificate)
    settings = FederationSettings(superlink_address=address, ca_certificate_path=str(ca),
                                  center_public_key=bundle.center_public_key, center_fingerprint=bundle.center_fingerprint,
                                  node_key_path=str(key), center_audit_key=bundle.center_audit_key,
                                  feature_recipe=bundle.feature_recipe,
                                  supernode_port=supernode_port or (old.supernode_port if old else 9094))
    atomic_write_text(ws.root / FEDERATION_FILE, settings.model_dump_json(indent=1))
    return settings


def federation_settings(ws: Workspace) -> FederationSettings:
    path = ws.root / FEDERATION_FILE
    if not path.is_file():
        raise InputError("this site is not enrolled; run 'mllmdr-site enroll --out REQUEST', send it to the center, "
                         "then 'mllmdr-site enroll --accept BUNDLE'", ws.root)
    return read_model(path, FederationSettings, "federation settings")


def write_bundle(out: Path, req: EnrollmentRequest, address: str, ca_pem: str, center_pub_pem: str,
                 center_audit_key: str = "", feature_recipe: str = "") -> EnrollmentBundle:
    bundle = EnrollmentBundle(site_id=req.site_id, superlink_address=address, ca_certificate=ca_pem,
                              center_public_key=center_pub_pem,
                              center_fingerprint=fingerprint(load_public(center_pub_pem)),
                              node_fingerprint=req.fingerprint, center_audit_key=center_audit_key,
                              feature_recipe=feature_recipe)
    atomic_write_text(out, bundle.model_dump_json(indent=1))
    return bundle

