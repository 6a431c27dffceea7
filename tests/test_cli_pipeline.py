"""The site's command-line path on a synthetic corpus, as hospital IT runs it."""

import hashlib
import json

from conftest import cli_json, run_cli


def test_synth_check_extract_rationales_train_score(tmp_path):
    synth = cli_json("mllmdr-site", "data", "synth", tmp_path / "synth", "--participants", "6", "--sites", "2",
                     "--seconds", "2")
    site = synth["sites"][0]
    report = cli_json("mllmdr-site", "data", "check", site)
    assert report["format"] == "edaic" and len(report["participants"]) == 3 and not report["problems"]
    ws = tmp_path / "ws"
    run_cli("mllmdr-site", "init", "-w", ws, "--site-id", "site1")
    env = {"MLLMDR_WORKSPACE": str(ws)}  # the env var replaces --workspace
    ext = cli_json("mllmdr-site", "extract", "--corpus", site, env=env)
    assert len(ext["extracted"]) == 3 and ext["dims"] == {"audio": 25, "visual": 49}
    assert cli_json("mllmdr-site", "extract", "--corpus", site, env=env)["skipped"] == [p["id"] for p in report["participants"]]
    rat = cli_json("mllmdr-site", "rationales", "--max-new-tokens", "16", "--retries", "1", env=env)
    assert rat["teacher"].startswith("local:smollm2") and rat["instances"] == 16  # 2 non-test participants x 8 items
    lines = (ws / "rationales" / "rationales.jsonl").read_text().splitlines()
    assert len(lines) == rat["accepted"]
    assert all(json.loads(line)["rationale"] for line in lines)
    again = cli_json("mllmdr-site", "rationales", "--max-new-tokens", "16", "--retries", "0", env=env)
    assert again["already_done"] >= rat["accepted"]  # resumable: accepted instances are not asked again
    tr = cli_json("mllmdr-site", "train", "--local", "--base-model", "tiny-random", "--stage2-epochs", "1", env=env)
    assert tr["train_instances"] == 16 and [h["stage"] for h in tr["history"]] == [1, 2]
    test_id = next(p["id"] for p in report["participants"] if p["split"] == "test")
    sc = cli_json("mllmdr-site", "score", test_id, "--max-new-tokens", "8", env=env)
    assert sc["participant"] == test_id and len(sc["items"]) == 8
    assert sc["total"] == sum(i["score"] for i in sc["items"]) and sc["binary"] == int(sc["total"] >= 10)
    assert sc["adapters"] == tr["adapter_version"]
    assert sorted(p.name for p in (ws / "checkpoints" / "local").iterdir() if p.is_dir()) == \
        ["latest", "stage1-epoch1", "stage2-epoch1"]

    # an interruption after stage 1: --resume trains stage 2 only
    (ws / "checkpoints" / "local" / "state.json").write_text('{"stage": 2, "epoch": 0}')
    again = cli_json("mllmdr-site", "train", "--local", "--base-model", "tiny-random", "--stage2-epochs", "1",
                     "--resume", env=env)
    assert [h["stage"] for h in again["history"]] == [2]

    # clinician review: ratings and a correction, then the Table 7 figures. The review rates the scores
    # `score` showed (kept on site), never a new scoring (it used to score again, with other options)
    rv = cli_json("mllmdr-site", "review", test_id, "--ratings", "3,3,2,1,3,3,2,3", "--corrections", "Sleep=3",
                  "--reviewer", "dr.a", "--score", sc["kept_score_sha256"], env=env)
    assert rv["ratings"] == {"fully agree": 5, "reasonable": 2, "disagree": 1} and rv["engine"] == "torch"
    assert rv["model_total"] == sc["total"]
    stats = cli_json("mllmdr-site", "review", "stats", env=env)
    generated = [k for k, i in enumerate(sc["items"]) if i["source"] == "generated"]
    assert stats["items"] == 8 and stats["IV_rationales_rated"] == len(generated)   # placeholders are not rated
    assert stats["IV_ratings_3_2_1"]["3 fully agree"] == (
        sum([3, 3, 2, 1, 3, 3, 2, 3][k] == 3 for k in generated) / len(generated) if generated else None)
    assert stats["II_agreement"] == (1.0 if rv["model_total"] == rv["clinician_total"] else 7 / 8)
    assert stats["III_mae"] == abs(rv["model_total"] - rv["clinician_total"]) and stats["unaudited_reviews"] == 0
    entries = [json.loads(x) for x in (ws / "audit" / "audit.jsonl").read_text().splitlines()]
    kept = ws / "scores" / f"{test_id}.json"
    assert entries[-1]["event"] == "review" and oct(kept.stat().st_mode & 0o777) == "0o600"
    assert entries[-1]["kept_score_sha256"] == [e for e in entries if e["event"] == "score"][-1]["kept_score_sha256"] \
        == hashlib.sha256(kept.read_bytes()).hexdigest()
    line = (ws / "reviews" / "reviews.jsonl").read_text()
    assert entries[-1]["record_sha256"] == hashlib.sha256(line.rstrip("\n").encode()).hexdigest()
    (ws / "reviews" / "reviews.jsonl").write_text(line.replace('"rating":1', '"rating":3'))   # an edited record shows
    assert cli_json("mllmdr-site", "review", "stats", env=env)["unaudited_reviews"] == 1
    (ws / "reviews" / "reviews.jsonl").write_text(line)
    bad = run_cli("mllmdr-site", "review", test_id, "--ratings", "3,3", check=False, env=env)
    assert bad.returncode == 2 and "--ratings needs 8 values" in bad.stderr
    for other, why in ((report["participants"][0]["id"] if report["participants"][0]["id"] != test_id else
                        report["participants"][1]["id"], "no score of participant"), ("../x", "is not a participant id")):
        unseen = run_cli("mllmdr-site", "review", other, "--ratings", "3", check=False, env=env)
        assert unseen.returncode == 2 and why in unseen.stderr and len(unseen.stderr.strip().splitlines()) == 1
    # the review can be pinned to the score that was printed; a kept score edited, or another participant's
    # copied in, is refused (it would show scores nobody was shown)
    assert run_cli("mllmdr-site", "review", test_id, "--ratings", "3,3,3,3,3,3,3,3", "--score",
                   sc["kept_score_sha256"][:12], "--json", env=env).returncode == 0
    other_sha = run_cli("mllmdr-site", "review", test_id, "--ratings", "3,3,3,3,3,3,3,3", "--score", "deadbeef00",
                        check=False, env=env)
    assert other_sha.returncode == 2 and f"is {sc['kept_score_sha256'][:12]}" in other_sha.stderr, other_sha.stderr
    shown = kept.read_bytes()
    kept.write_bytes(shown.replace(b'"total": ', b'"total": 1'))
    edited = run_cli("mllmdr-site", "review", test_id, "--ratings", "3,3,3,3,3,3,3,3", check=False, env=env)
    assert edited.returncode == 2 and "no 'score' audit entry names this kept score" in edited.stderr, edited.stderr
    other_id = next(p["id"] for p in report["participants"] if p["id"] != test_id)
    (ws / "scores" / f"{other_id}.json").write_bytes(shown)
    copied = run_cli("mllmdr-site", "review", other_id, "--ratings", "3,3,3,3,3,3,3,3", check=False, env=env)
    assert copied.returncode == 2 and f"is participant {test_id}'s, not {other_id}'s" in copied.stderr
    (ws / "scores" / f"{other_id}.json").unlink()
    kept.write_bytes(shown)
    line = (ws / "reviews" / "reviews.jsonl").read_text()
    (ws / "reviews" / "reviews.jsonl").write_bytes(line.encode() + b"\xff\n")
    damaged = run_cli("mllmdr-site", "review", "stats", check=False, env=env)
    assert damaged.returncode == 2 and "not UTF-8" in damaged.stderr, damaged.stderr     # was an internal error
    (ws / "reviews" / "reviews.jsonl").write_text(line)

    missing = run_cli("mllmdr-site", "score", "nobody", check=False, env=env)
    assert missing.returncode == 2 and "nobody" in missing.stderr
    audit = [json.loads(x)["event"] for x in (ws / "audit" / "audit.jsonl").read_text().splitlines()]
    assert audit[:2] == ["init", "extract"] and "score" in audit and "review" in audit
