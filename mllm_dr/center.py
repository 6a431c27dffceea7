"""The coordinating center's folder: PKI, signing key, approved and revoked sites, runs.

Nothing here ever holds patient data: the center sees adapter tensors, aggregate
metrics and sufficient statistics only. Site records: ``sites/<site>.json`` (the
enrollment request, approval time, Flower node id once registered), ``sites/<site>.pub``
(the node key the SuperLink accepts), ``sites/<site>.heads.jsonl`` (the site's signed
audit heads); a revoked site moves to ``sites/revoked/`` and its node key is never
approved again.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from pydantic import BaseModel, Field

from mllm_dr.atomic import atomic_write_text
from mllm_dr.enrollment import EnrollmentRequest
from mllm_dr.errors import InputError, read_model
from mllm_dr.pki import cert_expiry, check_host, make_ca, make_server_cert, renewed_server_cert, write_cert
from mllm_dr.private import private_dir, write_private
from mllm_dr.signing import new_signing_key

CONFIG = "center.json"
CERT_WARN_DAYS = 30      # 'serve' warns this long before the SuperLink's certificate expires


class CenterConfig(BaseModel):
    host: str = Field("127.0.0.1", description="address the SuperLink listens on and sites connect to")
    port: int = Field(9092, ge=1024, le=65535)
    san_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"])
    feature_recipe: str = Field("", description="the federation's feature recipe (sent in enrollment bundles, "
                                "the default of every run); '' = each site's own features")
    created: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class CenterDir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        path = self.root / CONFIG
        _not_a_workspace(self.root)
        if not path.is_file():
            kept = _center_material(self.root)
            raise InputError(_without_config(kept) if kept else
                             "not a center folder (no center.json); run 'mllmdr-center init --dir DIR' first", self.root)
        self.config = read_model(path, CenterConfig, "center config")

    pki = property(lambda self: self.root / "pki")
    signing_key = property(lambda self: self.root / "keys" / "signing.key")
    signing_pub = property(lambda self: self.root / "keys" / "signing.pub")
    sites_dir = property(lambda self: self.root / "sites")
    runs_dir = property(lambda self: self.root / "runs")
    state_dir = property(lambda self: self.root / "state")
    audit_path = property(lambda self: self.root / "audit" / "audit.jsonl")

    @classmethod
    def init(cls, root: Path, host: str = "127.0.0.1", port: int = 9092, extra_hosts: list[str] | None = None,
             feature_recipe: str = "") -> "CenterDir":
        from mllm_dr.features.recipe import get_recipe

        root = Path(root)
        if (root / CONFIG).exists():
            raise InputError("a center folder already exists here", root)
        _not_a_workspace(root)
        kept = _center_material(root)
        if kept:        # checked before anything is written: a lost center.json must not cost the CA
            raise InputError(_without_config(kept), root)
        if feature_recipe:
            feature_recipe = get_recipe(feature_recipe).name
        try:
            host = check_host(host)
            extra = [check_host(h) for h in extra_hosts or []]
        except ValueError as err:
            raise InputError(f"--host/--san: {err}") from None
        sans = list(dict.fromkeys([host, "127.0.0.1", "localhost", *extra]))
        private_dir(root)
        for sub in ("pki", "keys", "sites", "runs", "state", "audit"):
            private_dir(root / sub)
        make_ca(root / "pki")
        make_server_cert(root / "pki", sans)
        new_signing_key(root / "keys" / "signing.key")
        from mllm_dr.audit import _signing_key

        _signing_key(root / "audit" / "audit.jsonl")
        cfg = CenterConfig(host=host, port=port, san_hosts=sans, feature_recipe=feature_recipe,
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_text(root / CONFIG, cfg.model_dump_json(indent=1))
        return cls(root)

    # the SuperLink's TLS certificate ------------------------------------------
    server_cert_path = property(lambda self: self.pki / "server.pem")

    def server_cert_warning(self, now: datetime | None = None) -> str | None:
        """Checked by ``serve``: None while the SuperLink's certificate is valid beyond CERT_WARN_DAYS, a
        warning line when it expires sooner, InputError naming the file, its expiry and the renew command when
        it has expired: nothing renewed the 825-day certificate, and an expired one failed every site's TLS
        handshake with no word at the center (a review, session 44)."""
        try:
            expires = cert_expiry(self.server_cert_path)
        except ValueError as err:
            raise InputError(str(err)) from None
        left = expires - (now or datetime.now(timezone.utc))
        renew = f"'mllmdr-center renew-cert --dir {self.root}'"
        if left.total_seconds() <= 0:
            raise InputError(f"the SuperLink's TLS certificate expired on {expires:%Y-%m-%d %H:%M} UTC (sites "
                             f"cannot connect); renew it with {renew}", self.server_cert_path)
        if left.days < CERT_WARN_DAYS:
            return (f"{self.server_cert_path}: the SuperLink's TLS certificate expires on {expires:%Y-%m-%d} "
                    f"({left.days} days); renew it with {renew}")
        return None

    def renewal(self, extra_hosts: list[str] | None = None) -> tuple[x509.Certificate, list[str]]:
        """The SuperLink's certificate issued again by this center's CA (not written yet: the CLI audits it
        first, then ``install_server_cert``), for the names of ``center.json`` and ``extra_hosts``."""
        try:
            sans = list(dict.fromkeys([*self.config.san_hosts, *(check_host(h) for h in extra_hosts or [])]))
            return renewed_server_cert(self.pki, sans), sans
        except ValueError as err:
            raise InputError(f"renew-cert: {err}") from None

    def install_server_cert(self, cert: x509.Certificate, sans: list[str]) -> None:
        """Replace ``pki/server.pem`` (whole) and keep its names in ``center.json`` for the next renewal."""
        write_cert(self.server_cert_path, cert)
        if sans != self.config.san_hosts:
            self.config = self.config.model_copy(update={"san_hosts": sans})
            atomic_write_text(self.root / CONFIG, self.config.model_dump_json(indent=1))

    # sites ----------------------------------------------------------------
    revoked_dir = property(lambda self: self.sites_dir / "revoked")

    def is_approved(self, req: EnrollmentRequest) -> bool:
        """True when this very request is approved already, False when it may be approved; InputError when
        it may not be: another key for an approved site id, a node key approved under another site id, a
        revoked key, a request naming no audit key. Nothing is written: the CLI audits an approval before
        ``approve`` writes it (session 44)."""
        if not req.audit_key:      # else the first audit head that arrives, whoever signed it, would be trusted
            raise InputError(f"the request of site {req.site_id!r} names no audit-log key (an older kit's?): the site "
                             f"makes a new request with 'mllmdr-site enroll --out'")
        for gone in self.revoked_sites():     # first: a revoke cut short left its approved record (_revoked_key)
            if gone["fingerprint"] == req.fingerprint:
                raise InputError(f"node key {req.fingerprint} was revoked ({gone['site_id']}, {gone['revoked']}); the "
                                 "site must make a new key (remove keys/node*, then 'mllmdr-site enroll --out')")
        existing = self.sites_dir / f"{req.site_id}.json"
        if existing.is_file() and not self._revoked_key(_site_record(existing)):
            old = _site_record(existing)
            if old["fingerprint"] != req.fingerprint:
                raise InputError(f"site {req.site_id!r} is already approved with another key "
                                 f"({old['fingerprint']}); revoke it first ('mllmdr-center revoke {req.site_id}')",
                                 existing)
            return True
        for other in self.approved_sites():
            if other["fingerprint"] == req.fingerprint:
                raise InputError(f"node key {req.fingerprint} is already approved for site {other['site_id']!r}; "
                                 "one node key, one site")
        return False

    def approve(self, req: EnrollmentRequest) -> str:
        """Remember an approved site (its public key is what the SuperLink will accept).

        Returns "approved", or "already approved" for the same request again (refusals: ``is_approved``).
        The node key file ``sites/<id>.pub`` is written before the record, and "already approved" writes it
        again when it is missing, empty or another key: the record was written first, so an approval cut
        short by a full disk kept a site whose key file was empty, and every retry said "already approved"
        (a review, session 44).
        """
        if self.is_approved(req):
            self._write_node_key(req, only_if_wrong=True)
            return "already approved"
        self._write_node_key(req)
        atomic_write_text(self.sites_dir / f"{req.site_id}.json",
                          json.dumps(req.model_dump() | {"approved": _now()}, indent=1))
        return "approved"

    def _write_node_key(self, req: EnrollmentRequest, only_if_wrong: bool = False) -> None:
        """``sites/<id>.pub``, the node key the SuperLink registers (``only_if_wrong``: unless it holds it already)."""
        path, want = self.sites_dir / f"{req.site_id}.pub", (req.node_public_key + "\n").encode()
        if only_if_wrong and path.is_file() and path.read_bytes() == want:
            return
        write_private(path, want)

    def approved_sites(self) -> list[dict]:
        """The approved sites' records, less any whose key is on the revoked list (``_revoked_key``)."""
        gone = self._revoked_fingerprints()
        return [rec for rec in (_site_record(p) for p in sorted(self.sites_dir.glob("*.json")))
                if rec["fingerprint"] not in gone]

    def _revoked_fingerprints(self) -> set[str]:
        return {rec["fingerprint"] for rec in self.revoked_sites()}

    def _revoked_key(self, rec: dict) -> dict | None:
        """The revoked record of ``rec``'s node key, if that key was revoked: ``revoke`` writes the revoked
        record, then deletes the approved one, so a revoke cut short between the two left a site both approved
        and revoked, and the next ``serve`` registered its key again (then unregistered it once, and
        registered it for good at the serve after: a review, session 44). Such a record approves nothing."""
        return next((gone for gone in self.revoked_sites() if gone["fingerprint"] == rec["fingerprint"]), None)

    def revoked_sites(self) -> list[dict]:
        return [_site_record(p) for p in sorted(self.revoked_dir.glob("*.json"))]

    def _site_file(self, site_id: str, suffix: str) -> Path:
        """``sites/<id><suffix>``, for a site id that names no other file (a reply's id is the site's say)."""
        from mllm_dr.protocol import site_name

        try:
            return self.sites_dir / f"{site_name(site_id)}{suffix}"
        except ValueError as err:
            raise InputError(str(err)) from None

    def site(self, site_id: str) -> dict:
        path = self._site_file(site_id, ".json")
        rec = _site_record(path) if path.is_file() else None
        if rec is None or self._revoked_key(rec):
            known = ", ".join(s["site_id"] for s in self.approved_sites()) or "none"
            raise InputError(f"no approved site {site_id!r} (approved: {known})", self.sites_dir)
        return rec

    def update_site(self, site_id: str, **fields) -> dict:
        rec = self.site(site_id) | fields
        atomic_write_text(self.sites_dir / f"{site_id}.json", json.dumps(rec, indent=1))
        return rec

    def revoke(self, site_id: str, unregistered: bool) -> dict:
        """Move the site to ``sites/revoked/``; ``unregistered``: its key is already off the SuperLink."""
        rec = self.site(site_id) | {"revoked": _now(), "unregistered": unregistered}
        private_dir(self.revoked_dir)
        latest = self.revoked_dir / f"{site_id}.json"
        if latest.is_file():        # revoked before under another key: that record stays (it was overwritten)
            earlier = _site_record(latest)
            latest.rename(self.revoked_dir / f"{site_id}.{earlier['fingerprint']}.json")
        atomic_write_text(latest, json.dumps(rec, indent=1))
        (self.sites_dir / f"{site_id}.json").unlink()
        (self.sites_dir / f"{site_id}.pub").unlink(missing_ok=True)
        return rec

    def mark_unregistered(self, site_id: str) -> None:
        path = self.revoked_dir / f"{site_id}.json"
        atomic_write_text(path, json.dumps(json.loads(path.read_text()) | {"unregistered": True}, indent=1))

    # the sites' signed audit heads ------------------------------------------
    def site_heads_path(self, site_id: str) -> Path:
        return self._site_file(site_id, ".heads.jsonl")

    def record_site_head(self, site_id: str, head: dict, **context) -> dict:
        """Keep a site's signed audit head from its reply (ServerApp, every reply).

        The head must verify with the audit key the site named in its enrollment request and
        must not go backwards against the last one kept (else HeadError, audited here too).
        """
        from mllm_dr import audit, audit_heads

        rec = self.site(site_id)
        try:
            row = audit_heads.record(self.site_heads_path(site_id), head, rec.get("audit_key") or None, **context)
        except audit.HeadError as err:
            audit.append(self.audit_path, "site_audit_head_refused", site=site_id, reason=str(err), **context)
            raise
        audit.append(self.audit_path, "site_audit_head", site=site_id, entries=head["entries"],
                     last_hash=head["last_hash"], **context)
        return row

    def keep_reply_head(self, site_id: str, fields, **context) -> str | None:
        """Keep the signed audit head a site's reply carries (``fields``: its config record); the
        reason to reject the reply when it carries none (every reply of this kit's sites does: a site
        that stopped sending them would let its log be cut unseen), when the head is malformed, does
        not verify, goes backwards, the site is not approved here, or the center's record of its heads is
        damaged (named with its line: session 44); None when it was kept."""
        from mllm_dr import audit, audit_heads

        try:
            head = audit_heads.from_fields(fields) if fields else None
            if head is None:
                return "the reply carries no signed audit head"
            self.record_site_head(site_id, head, **context)
        except audit.HeadError as err:
            return f"audit head refused: {err}"
        except InputError as err:          # not an approved site of this center, a damaged heads record
            return str(err)
        return None

    def history_by_site(self) -> dict[str, dict]:
        """From the runs' histories: each site's Flower node id and its last aggregated round."""
        from mllm_dr.run_folder import RunFolder

        runs = [RunFolder(self.runs_dir, d.name) for d in self.runs_dir.iterdir() if d.is_dir()] \
            if self.runs_dir.is_dir() else []
        out: dict[str, dict] = {}
        for run in sorted((r for r in runs if r.history_path.is_file()), key=lambda r: r.history_path.stat().st_mtime):
            try:
                hist = run.history()
            except InputError:          # one damaged history: the others still say where the sites are
                continue
            for node, site in (hist.get("site_nodes") or {}).items():
                out.setdefault(site, {})["node_id"] = str(node)
            for r in hist.get("rounds", []):
                for site in r.get("sites", {}):
                    out.setdefault(site, {}).update(run=run.run, round=r.get("round"), time=r.get("time"))
        return out


def _site_record(path: Path) -> dict:
    """An approved (or revoked) site's record; InputError naming the file when it is not one."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"not a readable site record ({type(err).__name__}); restore it from a backup", path) from None
    if not isinstance(rec, dict) or not isinstance(rec.get("site_id"), str) or "fingerprint" not in rec:
        raise InputError("not a site record (site_id and fingerprint); restore it from a backup", path)
    return rec


def _not_a_workspace(root: Path) -> None:
    """InputError when ``root`` is a site workspace: its audit key and log read as a center's keys, and every
    center command said to restore center.json from a backup (a review, session 44)."""
    from mllm_dr.workspace import CONFIG_NAME

    if (Path(root) / CONFIG_NAME).is_file():
        raise InputError(f"is a site workspace ({CONFIG_NAME}), not a center folder; give --dir the center's "
                         "folder", root)


def _center_material(root: Path) -> list[str]:
    """The keys, certificates and site records of a center in ``root`` (relative paths), if any."""
    names = ["pki/ca.key", "pki/ca.crt", "pki/server.key", "keys/signing.key", "keys/audit.key", "audit/audit.jsonl"]
    found = [n for n in names if (Path(root) / n).exists()]
    return found + sorted(str(p.relative_to(root)) for p in (Path(root) / "sites").glob("*.json"))


def _without_config(kept: list[str]) -> str:
    """What to do when a center's keys are here but its ``center.json`` is not (init and every command say it)."""
    return (f"no center.json, but the center's keys are here ({', '.join(kept[:3])}): restore center.json from a "
            f"backup (init never replaces a center's keys: every enrolled site trusts this CA and signing key)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
