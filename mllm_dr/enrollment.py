"""Joining a federation: a site's request, the center's bundle, the site's federation settings.

1. The site makes a P-384 key pair (``keys/node``, OpenSSH) and a request file carrying only
   the public key, its fingerprint and the site id.
2. The center approves the request (registers the key with the SuperLink) and answers with a
   bundle: its CA certificate, its Ed25519 signing public key and the SuperLink address.
3. The site installs the bundle into ``federation.json``; from then on it trusts only
   checkpoints signed by that key, over TLS anchored at that CA.

The bundle travels by e-mail or USB, so whoever can swap it could make a site trust another center
(session 47). The center signs the bundle with its checkpoint-signing key (``signature``: every other
field, CA certificate, audit key and address included), and the center's operator reads that key's
fingerprint out by another channel (``mllmdr-center init`` / ``fingerprint``); ``enroll --accept
--center-fingerprint FP`` refuses a bundle of another key, so the pin covers the whole bundle. A site
that leaves its center for another (``--replace-center``) retires the old center's records
(``retire_center_records``): the new center's audit heads start a sequence of their own, and the old
ones stay for an investigation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from mllm_dr.atomic import atomic_write_text
from mllm_dr.errors import InputError, read_model
from mllm_dr.pki import (cert_sha256, check_address, check_ca_certificate, check_node_public_key, make_node_key,
                         node_public_key_of)
from mllm_dr.private import private_dir, write_private
from mllm_dr.signing import fingerprint, load_public
from mllm_dr.workspace import Workspace
from mllm_dr.protocol import SiteName

FEDERATION_FILE = "federation.json"
BUNDLE_SIGNATURE_CONTEXT = b"mllmdr-enrollment-bundle-v1\n"
RETIRED_DIR = Path("federation") / "retired"
# what a site keeps of one center (by the center's key): its signed audit heads, and the run policies this site
# pinned for the center's runs (a new center's run of the same name was checked against the old center's pin).
# Not retired: the DP ledgers and the audit log (the site's, whatever center), secure aggregation's release
# records (a privacy guard, fl_client/secagg_mod.py), the checkpoints it received (their signer is recorded).
CENTER_RECORDS = (Path("federation") / "center-heads.jsonl", Path("federation") / "run_policies.json")


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
    signature: str = ""               # Ed25519 by center_public_key over every other field (bundle_payload); '' =
    #                                   a bundle of a kit before session 47


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


@dataclass
class Accepted:
    """What ``accept_bundle`` installed and how far the bundle was trusted."""

    settings: FederationSettings
    pinned: bool                      # its center key matched the fingerprint the operator gave
    signed: bool                      # its signature verified (every field, not only the center key)
    ca_sha256: str
    retired: Path | None = None       # where the old center's records went (a --replace-center)
    retired_files: list[str] = field(default_factory=list)


def bundle_payload(fields: dict) -> bytes:
    """The bytes a bundle's signature covers: every field but ``signature``, as canonical JSON (the fields as they
    are in the file, so that a later kit's added field is covered too)."""
    body = {k: v for k, v in fields.items() if k != "signature"}
    return BUNDLE_SIGNATURE_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def pinned_fingerprint(text: str) -> str:
    """The center key fingerprint an operator typed (``--center-fingerprint``): 16 hex digits as ``mllmdr-center
    init`` and ``fingerprint`` print it, in any case, with ':' or blanks anywhere (read out in groups);
    InputError for anything else."""
    fp = re.sub(r"[\s:]", "", str(text)).lower()
    if re.fullmatch(r"[0-9a-f]{16}", fp):
        return fp
    hint = (" (64 hex digits: the CA certificate's SHA-256? give the center's signing key fingerprint)"
            if re.fullmatch(r"[0-9a-f]{64}", fp) else "")
    raise InputError(f"--center-fingerprint {str(text)[:80]!r} is not a center key fingerprint: 16 hex digits, as "
                     f"'mllmdr-center init' and 'mllmdr-center fingerprint' print it{hint}")


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
                   replace_center: bool = False, center_fingerprint: str | None = None,
                   allow_unsigned: bool = False) -> FederationSettings:
    """Install the center's bundle (``accept_bundle``) and return the settings written."""
    return accept_bundle(ws, bundle_path, supernode_port, replace_center, center_fingerprint, allow_unsigned).settings


def accept_bundle(ws: Workspace, bundle_path: Path, supernode_port: int | None = None,
                  replace_center: bool = False, center_fingerprint: str | None = None,
                  allow_unsigned: bool = False) -> Accepted:
    """Install the center's bundle: ``keys/ca.crt``, then ``federation.json``.

    Everything is checked before anything is written (session 44): the CA certificate must be one
    (PEM, BasicConstraints ca=True), and the old settings readable, else a working ca.crt was replaced
    by whatever the bundle held, or before a damaged federation.json stopped the install. Session 46: the
    bundle must approve the node key the private key ``keys/node`` is (``keys/node.pub`` was trusted), name
    the SuperLink as host:port, carry a CA certificate valid now, and come from the center this site is
    enrolled with (another center's key only with ``replace_center``). The caller refuses while this
    workspace's SuperNode runs (``cli/site_federation.py``: the SuperNode is in ``fl_client``).
    Session 47: a signed bundle must verify with its own center key (an edited field is refused);
    ``center_fingerprint`` (what the center's operator read out by another channel) must be that key's,
    and then the bundle must be signed, so that the pin covers the CA certificate, audit key and address
    too; replacing a center retires the old center's records first (``retire_center_records``, audited).
    An unsigned bundle is refused (nothing vouches for its CA certificate, address or audit key: whoever swapped
    it could strip the signature and edit them) unless ``allow_unsigned`` (``--allow-unsigned-bundle``, for a
    center kit before session 47), and always from the center this site is enrolled with, whose key it already
    trusts (an implicit pin; the second read of session 47). The new CA certificate and settings are written
    beside their names before the old center's records are retired, then renamed into place; a failure after the
    retirement puts the old center's records (and CA certificate) back (``center_records_retired_failed``).
    """
    pin = pinned_fingerprint(center_fingerprint) if center_fingerprint is not None else None
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
    if pin is not None and pin != bundle.center_fingerprint:
        raise InputError(f"the bundle's center key fingerprint is {bundle.center_fingerprint}, not the "
                         f"--center-fingerprint given ({pin}): this bundle is not from the center you expect; nothing "
                         "was installed (ask the center's operator for 'mllmdr-center fingerprint' again)", bundle_path)
    signed = _bundle_signature_checked(bundle, pub, bundle_path)
    old = federation_settings(ws) if (ws.root / FEDERATION_FILE).is_file() else None
    if not signed and old is not None and old.center_fingerprint == bundle.center_fingerprint:
        raise InputError(f"the bundle is not signed, and this site is enrolled with its center (key "
                         f"{bundle.center_fingerprint}), whose bundles it accepts signed only: an unsigned one could "
                         "carry another CA certificate or address under the same key; nothing was installed (ask the "
                         "center to run 'mllmdr-center approve' on your request again)", bundle_path)
    if pin is not None and not signed:
        raise InputError(f"the bundle is not signed (made by a center kit before session 47), so --center-fingerprint "
                         f"{pin} would vouch for its checkpoint key but not its CA certificate, audit key or address; "
                         "nothing was installed: ask the center to run 'mllmdr-center approve' on your request again "
                         "(it writes a signed bundle), or accept this one without --center-fingerprint", bundle_path)
    if not signed and not allow_unsigned:
        raise InputError("the bundle is not signed, so nothing vouches for its CA certificate, SuperLink address or "
                         "audit key (a swapped bundle can carry others); nothing was installed: ask the center to run "
                         "'mllmdr-center approve' on your request again (it writes a signed bundle), or give "
                         "--allow-unsigned-bundle for a center kit before session 47", bundle_path)
    try:
        address = check_address(bundle.superlink_address)
        check_ca_certificate(bundle.ca_certificate)
    except ValueError as err:
        raise InputError(f"bundle: {err}; ask the center for a new bundle", bundle_path) from None
    if old and old.center_fingerprint != bundle.center_fingerprint and not replace_center:
        raise InputError(f"bundle comes from another center (key {bundle.center_fingerprint}) than the one this site "
                         f"is enrolled with (key {old.center_fingerprint}); to leave that federation for this one, "
                         "give --replace-center", bundle_path)
    ca_path, fed_path = ws.root / "keys" / "ca.crt", ws.root / FEDERATION_FILE
    settings = FederationSettings(superlink_address=address, ca_certificate_path=str(ca_path),
                                  center_public_key=bundle.center_public_key,
                                  center_fingerprint=bundle.center_fingerprint, node_key_path=str(key),
                                  center_audit_key=bundle.center_audit_key, feature_recipe=bundle.feature_recipe,
                                  supernode_port=supernode_port or (old.supernode_port if old else 9094))
    # written whole beside their names first (a full disk stops here, before anything of the old center moved);
    # after the retirement only two renames are left, and a failure there puts the old center back (review F8)
    staged_ca = write_private(ca_path.with_name(f".ca.crt.{os.getpid()}.new"), bundle.ca_certificate)
    staged_fed = fed_path.with_name(f".{FEDERATION_FILE}.{os.getpid()}.new")
    try:
        atomic_write_text(staged_fed, settings.model_dump_json(indent=1))
        retired, moved = (retire_center_records(ws, old, bundle.center_fingerprint)
                          if old and old.center_fingerprint != bundle.center_fingerprint else (None, []))
        ca_replaced = False
        try:
            os.replace(staged_ca, ca_path)
            ca_replaced = True
            os.replace(staged_fed, fed_path)
        except BaseException as err:
            if retired is not None:     # still enrolled with the old center: its records go back where they were
                _unretire(ws, retired, moved, err, ca_replaced)
            raise
    finally:
        staged_ca.unlink(missing_ok=True)
        staged_fed.unlink(missing_ok=True)
    return Accepted(settings, pinned=pin is not None, signed=signed, ca_sha256=cert_sha256(bundle.ca_certificate),
                    retired=retired, retired_files=moved)


def _bundle_signature_checked(bundle: EnrollmentBundle, pub, bundle_path: Path) -> bool:
    """True when the bundle is signed and its signature verifies with its center key over the fields as they are
    in the file; False when it carries none (an older center kit); InputError when it does not verify (a field
    was changed after the center wrote it: another address, CA certificate or audit key)."""
    from cryptography.exceptions import InvalidSignature

    if not bundle.signature:
        return False
    try:
        fields = json.loads(Path(bundle_path).read_text(encoding="utf-8"))
        pub.verify(bytes.fromhex(bundle.signature), bundle_payload(fields))
        if EnrollmentBundle.model_validate(fields) != bundle:     # the file read twice: the same both times
            raise ValueError("the bundle changed while it was read")
    except (InvalidSignature, ValueError, OSError, AttributeError):
        raise InputError("the bundle's signature does not verify with its center key: the bundle was changed after "
                         "the center wrote it; nothing was installed (ask the center for a new bundle)",
                         bundle_path) from None
    return True


def retire_center_records(ws: Workspace, old: FederationSettings, new_center: str,
                          now: datetime | None = None) -> tuple[Path, list[str]]:
    """Move what this site kept of the center it leaves into ``federation/retired/<UTC time>-center-<key>/``: its
    signed audit heads and this site's pins of its run policies (``CENTER_RECORDS``), with copies of the old
    ``federation.json`` and ``keys/ca.crt`` (the old center's keys: what an investigation checks those heads
    with, ``audit verify --against`` at the old center). Audited (``center_records_retired``) before anything
    moves; a move that fails is audited too (``center_records_retired_failed``). Returns the folder and the
    records moved (workspace-relative). The new center's heads then start a record of their own."""
    from mllm_dr import audit

    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = ws.root / RETIRED_DIR / f"{stamp}-center-{old.center_fingerprint}"
    folder, n = base, 1
    while folder.exists():          # two replacements within a second
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    moved = [str(rel) for rel in CENTER_RECORDS if (ws.root / rel).is_file()]
    ca = ws.root / "keys" / "ca.crt"
    copied = [FEDERATION_FILE] + (["keys/ca.crt"] if ca.is_file() else [])
    audit.append(ws.audit_path, "center_records_retired", center=old.center_fingerprint, new_center=new_center,
                 folder=str(folder.relative_to(ws.root)), moved=moved, copied=copied)
    try:
        private_dir(folder)
        write_private(folder / FEDERATION_FILE, (ws.root / FEDERATION_FILE).read_bytes())
        if ca.is_file():
            write_private(folder / "ca.crt", ca.read_bytes())
        for rel in moved:     # their one writer is the SuperNode's ClientApp: the caller refuses while it runs
            os.replace(ws.root / rel, folder / Path(rel).name)
    except OSError as err:
        try:
            audit.append(ws.audit_path, "center_records_retired_failed", folder=str(folder.relative_to(ws.root)),
                         reason=f"{type(err).__name__}: {err}"[:300])
        except OSError:
            pass
        raise
    return folder, moved


def _unretire(ws: Workspace, folder: Path, moved: list[str], err: BaseException, ca_replaced: bool) -> None:
    """Put back what ``retire_center_records`` moved (and the old CA certificate, from its copy, when the new one
    was already in place) after the new center's settings failed to be put in place, and audit
    ``center_records_retired_failed`` (also when a step of this fails: the audit entry names what went back)."""
    from mllm_dr import audit

    restored, failed = [], []
    steps = [(rel, folder / Path(rel).name, ws.root / rel) for rel in moved]
    if ca_replaced and (folder / "ca.crt").is_file():
        steps.append(("keys/ca.crt", folder / "ca.crt", ws.root / "keys" / "ca.crt"))
    for rel, src, dst in steps:
        try:
            if rel == "keys/ca.crt":    # a copy: the retired folder keeps its own
                tmp = dst.with_name(f".ca.crt.{os.getpid()}.old")
                tmp.unlink(missing_ok=True)
                os.link(src, tmp)
                os.replace(tmp, dst)
            else:
                os.replace(src, dst)
            restored.append(rel)
        except OSError as step_err:
            failed.append(f"{rel}: {type(step_err).__name__}: {step_err}"[:200])
    try:
        audit.append(ws.audit_path, "center_records_retired_failed", folder=str(folder.relative_to(ws.root)),
                     reason=f"{type(err).__name__}: {err}"[:300], restored=restored,
                     **({"not_restored": failed} if failed else {}))
    except OSError:
        pass


def federation_settings(ws: Workspace) -> FederationSettings:
    path = ws.root / FEDERATION_FILE
    if not path.is_file():
        raise InputError("this site is not enrolled; run 'mllmdr-site enroll --out REQUEST', send it to the center, "
                         "then 'mllmdr-site enroll --accept BUNDLE'", ws.root)
    return read_model(path, FederationSettings, "federation settings")


def write_bundle(out: Path, req: EnrollmentRequest, address: str, ca_pem: str, center_pub_pem: str,
                 center_audit_key: str = "", feature_recipe: str = "", signing_key=None) -> EnrollmentBundle:
    """The bundle for ``req``, signed with ``signing_key`` (the center's Ed25519 private key, whose public half is
    ``center_pub_pem``) when given: the center always signs (``mllmdr-center approve``); unsigned bundles are
    what older kits wrote (and what tests make)."""
    bundle = EnrollmentBundle(site_id=req.site_id, superlink_address=address, ca_certificate=ca_pem,
                              center_public_key=center_pub_pem,
                              center_fingerprint=fingerprint(load_public(center_pub_pem)),
                              node_fingerprint=req.fingerprint, center_audit_key=center_audit_key,
                              feature_recipe=feature_recipe)
    if signing_key is not None:
        if fingerprint(signing_key.public_key()) != bundle.center_fingerprint:
            raise InputError("the signing key is not the center key the bundle names", out)
        signature = signing_key.sign(bundle_payload(bundle.model_dump(exclude={"signature"}))).hex()
        bundle = bundle.model_copy(update={"signature": signature})
    atomic_write_text(out, bundle.model_dump_json(indent=1))
    return bundle

