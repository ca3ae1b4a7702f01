"""Security battery for the cockpit: every attack below must be refused (4xx), leak nothing and
write nothing; the same requests made properly must succeed (so the battery can fail)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from scaler_wizard.cockpit.server import create_app, host_name, token_matches

SECRET = "TOPSECRET-do-not-serve"
ORIGIN = "http://testserver"
TOKEN = secrets.token_urlsafe(32)


@pytest.fixture
def env(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "run1"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "stage": 1, "stages": 2}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "metric": "train/loss", "value": 3.0}) + "\n")
    snap = runs / ".checkpoints" / "snapshots" / "run1" / "s1"
    snap.mkdir(parents=True)
    (snap / "manifest.json").write_text(json.dumps({"snapshot_id": "s1", "step": 5, "stage": 1}))
    (snap / "COMPLETE").write_text("x")
    # things outside the runs folder that traversal would reach
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "status.json").write_text(json.dumps({"state": "running", "secret": SECRET}))
    (outside / "metrics.jsonl").write_text(json.dumps({"secret": SECRET}) + "\n")
    (tmp_path / "secret.json").write_text(json.dumps({"secret": SECRET}))
    os.symlink(outside, runs / "escape")  # a symlinked "run" pointing outside
    app = create_app(runs, TOKEN, ["testserver", "127.0.0.1", "localhost"], poll_interval_s=0.05)
    good = TestClient(app)
    csrf = good.get("/api/session", headers={"Authorization": f"Bearer {TOKEN}"}).json()["csrf_token"]
    return {"runs": runs, "app": app, "csrf": csrf}


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def post_headers(csrf: str) -> dict[str, str]:
    return {**auth(), "Origin": ORIGIN, "X-CSRF-Token": csrf}


def attacks(csrf: str) -> list[tuple[str, str, str, str, dict, dict | None]]:
    """(category, name, method, url, headers, json body)."""
    A: list[tuple[str, str, str, str, dict, dict | None]] = []
    sse = "/api/runs/run1/events?max_seconds=0.2"
    # 1. no token
    for url in ("/", "/api/session", "/api/runs", "/api/runs/run1", sse, "/static/app.js",
                "/api/runs/run1/files/metrics.jsonl", "/api/runs/run1/snapshots"):
        A.append(("no token", f"GET {url}", "GET", url, {}, None))
    A.append(("no token", "POST abort", "POST", "/api/runs/run1/actions/abort",
              {"Origin": ORIGIN, "X-CSRF-Token": csrf}, {"args": {}}))
    # 2. wrong token
    wrong = [("query", "?token=" + "x" * 43, {}), ("query prefix", "?token=" + TOKEN[:-1], {}),
             ("query suffix", "?token=" + TOKEN + "A", {}), ("bearer", "", {"Authorization": "Bearer nope" * 4}),
             ("cookie", "", {"Cookie": "swcockpit_0000000000=" + TOKEN}),  # right value, wrong cookie name
             ("csrf as token", "", {"Authorization": f"Bearer {csrf}"}), ("empty token", "?token=", {})]
    for name, q, h in wrong:
        A.append(("wrong token", f"GET /api/runs {name}", "GET", "/api/runs" + q, h, None))
    A.append(("wrong token", "POST abort bearer", "POST", "/api/runs/run1/actions/abort",
              {"Authorization": "Bearer " + TOKEN[::-1], "Origin": ORIGIN, "X-CSRF-Token": csrf}, {"args": {}}))
    # 3. foreign Host header (DNS rebinding), with a valid token
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.attacker.net",
                 "testserver.evil", "[::2]:80", ""):
        A.append(("foreign host", f"GET /api/runs Host={host!r}", "GET", "/api/runs", {**auth(), "Host": host}, None))
    A.append(("foreign host", "POST abort Host=evil", "POST", "/api/runs/run1/actions/abort",
              {**post_headers(csrf), "Host": "evil.example"}, {"args": {}}))
    # 4. cross-origin / CSRF on POST
    for name, extra in (("Origin evil", {"Origin": "http://evil.example"}), ("Origin null", {"Origin": "null"}),
                        ("Origin look-alike", {"Origin": "http://testserver.evil.example"}),
                        ("Origin other port", {"Origin": "http://testserver:9999"}),
                        ("Referer evil, no Origin", {"Origin": None, "Referer": "http://evil.example/page"}),
                        ("no Origin, no Referer", {"Origin": None}),
                        ("missing CSRF", {"X-CSRF-Token": None}), ("wrong CSRF", {"X-CSRF-Token": "0" * 64}),
                        ("token as CSRF", {"X-CSRF-Token": TOKEN})):
        headers = post_headers(csrf)
        for k, v in extra.items():
            if v is None:
                headers.pop(k, None)
            else:
                headers[k] = v
        A.append(("cross-origin POST", f"POST abort {name}", "POST", "/api/runs/run1/actions/abort", headers, {"args": {}}))
    # 5. GET (and other verbs) on state-changing routes, fully authenticated
    for action in ("abort", "approve", "rollback"):
        A.append(("GET on action", f"GET {action}", "GET", f"/api/runs/run1/actions/{action}", auth(), None))
    for verb in ("PUT", "DELETE", "PATCH"):
        A.append(("GET on action", f"{verb} abort", verb, "/api/runs/run1/actions/abort", post_headers(csrf), None))
    # 6. path traversal in run ids, file names and snapshot ids, fully authenticated
    for rid in ("..", "%2e%2e", "..%2F..%2Foutside", "%2e%2e%2foutside", "escape", ".checkpoints", ".cockpit",
                "run1%00", "run1%2F..%2F..%2Fsecret.json", "%2Fetc%2Fpasswd", "~", "run1\\..\\x"):
        A.append(("path traversal", f"GET run {rid}", "GET", f"/api/runs/{rid}", auth(), None))
    A.append(("path traversal", "SSE escape", "GET", "/api/runs/escape/events?max_seconds=0.2", auth(), None))
    A.append(("path traversal", "files ../secret.json", "GET", "/api/runs/run1/files/..%2F..%2Fsecret.json", auth(), None))
    A.append(("path traversal", "files status.json", "GET", "/api/runs/run1/files/status.json", auth(), None))
    A.append(("path traversal", "static ../server.py", "GET", "/static/..%2Fserver.py", auth(), None))
    A.append(("path traversal", "POST abort on escape", "POST", "/api/runs/escape/actions/abort", post_headers(csrf),
              {"args": {}}))
    A.append(("path traversal", "rollback snapshot ../", "POST", "/api/runs/run1/actions/rollback", post_headers(csrf),
              {"args": {"snapshot_id": "../../outside"}}))
    return A


def test_security_battery_rejects_everything(env, tmp_path):
    client = TestClient(env["app"])
    results: dict[str, list[int]] = {}
    failures = []
    for category, name, method, url, headers, body in attacks(env["csrf"]):
        client.cookies.clear()
        r = client.request(method, url, headers=headers, json=body)
        rejected = 400 <= r.status_code < 500 and SECRET not in r.text
        results.setdefault(category, []).append(int(rejected))
        if not rejected:
            failures.append(f"{category}: {name} -> {r.status_code} {r.text[:120]}")
    assert not failures, "\n".join(failures)
    # nothing was written by any of them
    assert not (env["runs"] / "run1" / "control.jsonl").exists()
    assert not (tmp_path / "outside" / "control.jsonl").exists()
    # refusals of the guard are audited
    audit = [json.loads(x) for x in (env["runs"] / ".cockpit" / "audit.jsonl").read_text().splitlines()]
    written = sum(a["event"] == "refused" for a in audit)
    suppressed = env["app"].settings.audit_log.suppressed_total  # over the refusal rate: counted, not written
    assert written >= 20 and written + suppressed >= 30
    counts = {c: f"{sum(v)}/{len(v)}" for c, v in results.items()}
    total = sum(len(v) for v in results.values())
    assert total >= 55 and set(results) == {"no token", "wrong token", "foreign host", "cross-origin POST",
                                            "GET on action", "path traversal"}
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "security_battery.json").write_text(json.dumps({"rejected": counts, "total": total}, indent=2))
    print(f"\nSECURITY BATTERY: {sum(sum(v) for v in results.values())}/{total} rejected", json.dumps(counts))


def test_the_same_requests_done_properly_succeed(env):
    """Control group: a correct client passes every check the battery exercises."""
    client = TestClient(env["app"])
    for url in ("/api/session", "/api/runs", "/api/runs/run1", "/static/app.js", "/api/runs/run1/snapshots",
                "/api/runs/run1/files/metrics.jsonl", "/api/runs/run1/events?max_seconds=0.2"):
        assert client.get(url, headers=auth()).status_code == 200, url
    assert client.get("/api/runs", headers={**auth(), "Host": "localhost:8123"}).status_code == 200
    assert client.get("/api/runs", headers={**auth(), "Host": "127.0.0.1:8123"}).status_code == 200
    h = post_headers(env["csrf"])
    assert client.post("/api/runs/run1/actions/abort", headers=h, json={"args": {}}).status_code == 200
    referer_only = {k: v for k, v in h.items() if k != "Origin"} | {"Referer": ORIGIN + "/"}
    assert client.post("/api/runs/run1/actions/approve", headers=referer_only, json={}).status_code == 200
    assert client.post("/api/runs/run1/actions/rollback", headers=h, json={"args": {"snapshot_id": "s1"}}).status_code == 200
    lines = (env["runs"] / "run1" / "control.jsonl").read_text().splitlines()
    assert [json.loads(x)["action"] for x in lines] == ["abort", "approve", "rollback"]


def test_cookie_flow_authenticates_and_query_token_is_not_needed_afterwards(env):
    client = TestClient(env["app"])
    r = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/api/runs").status_code == 200  # cookie only


def test_helpers():
    assert token_matches(TOKEN, TOKEN) and not token_matches(None, TOKEN) and not token_matches(TOKEN[:-1], TOKEN)
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost:80") == "localhost" and host_name("::1") == "::1"
    with pytest.raises(Exception, match="at least 16"):
        create_app(Path("."), "short", None)
