"""Issue 14 cockpit battery: symlinks inside a run folder are never followed (reads, SSE, the
control.jsonl and audit appends), the refusal log is bounded under an unauthenticated flood,
NaN/Infinity bodies are 400, wildcard bind addresses in any spelling are refused, unknown CLI
options are usage errors. At least three variants of each."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from scaler_wizard.cockpit import rundir as R
from scaler_wizard.cockpit import server as S
from scaler_wizard.errors import InputError

SECRET = "OUTSIDE-SECRET-4f1c"
TOKEN = secrets.token_urlsafe(32)
ORIGIN = "http://testserver"


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def env(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "run1"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "stage": 1, "stages": 2}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "metric": "train/loss", "value": 3.0}) + "\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret_json = outside / "secret.json"
    secret_json.write_text(json.dumps({"state": "running", "secret": SECRET, "snapshot_id": "s9", "step": 9,
                                       "snapshots": [{"snapshot_id": "s9", "secret": SECRET}]}))
    secret_jsonl = outside / "secret.jsonl"
    secret_jsonl.write_text(json.dumps({"step": 1, "metric": "x", "secret": SECRET}) + "\n")
    victim = outside / "victim.txt"
    victim.write_text("untouched\n")
    app = create = S.create_app(runs, TOKEN, ["testserver", "127.0.0.1"], poll_interval_s=0.02)
    client = TestClient(app)
    csrf = client.get("/api/session", headers=auth()).json()["csrf_token"]
    return {"runs": runs, "run": run, "outside": outside, "json": secret_json, "jsonl": secret_jsonl,
            "victim": victim, "app": create, "client": client, "csrf": csrf}


def _link(target: Path, link: Path) -> None:
    if link.exists() or link.is_symlink():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def _all_responses(env) -> str:
    c = env["client"]
    bodies = [c.get(u, headers=auth()).text for u in (
        "/api/runs", "/api/runs/run1", "/api/runs/run1/snapshots", "/api/runs/run1/files/metrics.jsonl",
        "/api/runs/run1/files/telegrams.jsonl", "/api/runs/run1/files/alerts.jsonl",
        "/api/runs/run1/files/control.jsonl", "/api/runs/run1/events?max_seconds=0.3")]
    return "\n".join(bodies)


# ----- 9a. symlinked reads ------------------------------------------------------------------

READ_LINKS = {
    "status.json": ("json", "status.json"),
    "summary.json": ("json", "summary.json"),
    "envelope.json": ("json", "envelope.json"),
    "telegram.json": ("json", "telegram.json"),
    "metrics.jsonl": ("jsonl", "metrics.jsonl"),
    "telegrams.jsonl": ("jsonl", "telegrams.jsonl"),
    "alerts.jsonl": ("jsonl", "alerts.jsonl"),
    "control.jsonl (read)": ("jsonl", "control.jsonl"),
    "snapshots.json": ("json", "snapshots.json"),
    "snapshots/<id>/manifest.json": ("json", "snapshots/s9/manifest.json"),
    "contract/*.json": ("json", "contract/badge.json"),
}


@pytest.mark.parametrize("name", list(READ_LINKS))
def test_symlinked_file_in_a_run_folder_is_not_served(env, name):
    kind, rel = READ_LINKS[name]
    _link(env[kind], env["run"] / rel)
    assert SECRET not in _all_responses(env)


@pytest.mark.parametrize("name", ["snapshots", "contract", "cache snapshots", "cache run folder"])
def test_symlinked_folder_in_a_run_or_cache_folder_is_not_followed(env, name):
    target = env["outside"] / "tree"
    (target / "s9").mkdir(parents=True, exist_ok=True)
    for n in ("manifest.json", "meta.json", "COMPLETE", "badge.json"):
        (target / "s9" / n).write_text(env["json"].read_text())
        (target / n).write_text(env["json"].read_text())
    link = {"snapshots": env["run"] / "snapshots", "contract": env["run"] / "contract",
            "cache snapshots": env["runs"] / ".checkpoints" / "snapshots",
            "cache run folder": env["runs"] / ".checkpoints" / "snapshots" / "run1"}[name]
    _link(target, link)
    assert SECRET not in _all_responses(env)
    assert "s9" not in env["client"].get("/api/runs/run1/snapshots", headers=auth()).text


def test_sse_stream_does_not_follow_a_link_that_appears_mid_stream(env):
    """A link planted while the stream is open is never read (each poll reopens without following)."""
    c = env["client"]
    seen = []

    def plant():
        time.sleep(0.1)
        _link(env["jsonl"], env["run"] / "telegrams.jsonl")
        _link(env["json"], env["run"] / "telegram.json")
        (env["run"] / "status.json").unlink()
        _link(env["json"], env["run"] / "status.json")

    t = threading.Thread(target=plant)
    t.start()
    seen.append(c.get("/api/runs/run1/events?max_seconds=0.6", headers=auth()).text)
    t.join()
    assert SECRET not in seen[0] and "event: hello" in seen[0]


def test_symlinked_run_folder_is_refused(env):
    _link(env["outside"], env["runs"] / "evil")
    r = env["client"].get("/api/runs/evil", headers=auth())
    assert r.status_code in (400, 404) and SECRET not in r.text


def test_fifo_in_a_run_folder_does_not_hang_the_cockpit(env):
    os.mkfifo(env["run"] / "telegram.json")
    os.mkfifo(env["run"] / "alerts.jsonl")
    t = time.monotonic()
    assert env["client"].get("/api/runs/run1", headers=auth()).status_code == 200
    assert env["client"].get("/api/runs/run1/files/alerts.jsonl", headers=auth()).json() == {"records": []}
    assert time.monotonic() - t < 5


# ----- 9b. symlinked writes -----------------------------------------------------------------


def _post(env, action: str, body: dict | None = None, raw: bytes | None = None):
    headers = {**auth(), "Origin": ORIGIN, "X-CSRF-Token": env["csrf"]}
    if raw is not None:
        return env["client"].post(f"/api/runs/run1/actions/{action}", headers={**headers,
                                  "content-type": "application/json"}, content=raw)
    return env["client"].post(f"/api/runs/run1/actions/{action}", headers=headers, json=body or {"args": {}})


@pytest.mark.parametrize("action", ["abort", "approve"])
def test_authenticated_action_never_appends_through_a_control_link(env, action):
    _link(env["victim"], env["run"] / "control.jsonl")
    r = _post(env, action)
    assert 400 <= r.status_code < 500, r.text
    assert env["victim"].read_text() == "untouched\n"


def test_action_through_a_symlinked_run_folder_is_refused(env):
    (env["outside"] / "status.json").write_text(json.dumps({"state": "running"}))
    _link(env["outside"], env["runs"] / "run2")
    headers = {**auth(), "Origin": ORIGIN, "X-CSRF-Token": env["csrf"]}
    r = env["client"].post("/api/runs/run2/actions/abort", headers=headers, json={"args": {}})
    assert 400 <= r.status_code < 500
    assert not (env["outside"] / "control.jsonl").exists()


def test_control_fifo_is_refused_without_hanging(env):
    os.mkfifo(env["run"] / "control.jsonl")
    t = time.monotonic()
    r = _post(env, "abort")
    assert 400 <= r.status_code < 500 and time.monotonic() - t < 5


@pytest.mark.parametrize("where", ["audit.jsonl", ".cockpit folder", "rotated audit.jsonl.1"])
def test_unauthenticated_request_never_appends_through_an_audit_link(env, where):
    cockpit = env["runs"] / ".cockpit"
    if where == "audit.jsonl":
        _link(env["victim"], cockpit / "audit.jsonl")
    elif where == ".cockpit folder":
        _link(env["outside"], cockpit)
    else:
        env["app"].settings.audit_log.max_bytes = 200  # rotate at once
        cockpit.mkdir(exist_ok=True)
        (cockpit / "audit.jsonl").write_text("x" * 300 + "\n")
        _link(env["victim"], cockpit / "audit.jsonl.1")
    for _ in range(5):
        assert env["client"].get("/api/runs").status_code == 401  # no token
    assert env["victim"].read_text() == "untouched\n"
    assert not (env["outside"] / "audit.jsonl").exists()


def test_open_beneath_refuses_links_dirs_and_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_text("ok")
    os.symlink(tmp_path, root / "up")
    os.symlink(root / "a" / "f", root / "a" / "l")
    assert R.read_bytes_beneath(root, root / "a" / "f") == b"ok"
    for bad in (root / "a" / "l", root / "up" / "root" / "a" / "f", root / "a", tmp_path / "x", root / ".." / "x"):
        assert R.read_bytes_beneath(root, bad) is None
        with pytest.raises(OSError):
            os.close(R.open_beneath(root, bad, os.O_WRONLY | os.O_APPEND | os.O_CREAT))


# ----- 10. bounded refusal log --------------------------------------------------------------


def flood(host: str, port: int, seconds: float, path_len: int = 98_000) -> int:
    """Unauthenticated requests with long paths, one connection each, as fast as one client goes,
    for ``seconds``; stops by itself. Raw sockets: an HTTP client library refuses URLs this long.
    Returns the number of requests sent."""
    import socket

    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        request = (f"GET /{'A' * path_len}?n={n} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Connection: close\r\n\r\n").encode()
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(request)
                while sock.recv(65536):
                    pass
        except OSError:
            pass
        n += 1
    return n


def _audit_bytes(runs: Path) -> int:
    d = runs / ".cockpit"
    return sum(p.stat().st_size for p in d.glob("audit.jsonl*")) if d.is_dir() else 0


@pytest.mark.parametrize("path_len", [98_000, 10, 4_000])
def test_unauthenticated_flood_grows_the_audit_log_by_a_bounded_amount(tmp_path, path_len):
    seconds = float(os.environ.get("SW_FLOOD_SECONDS", "2"))
    runs = tmp_path / "runs"
    runs.mkdir()
    server = S.CockpitServer(runs).start()
    try:
        before = _audit_bytes(runs)
        sent = flood("127.0.0.1", server.port, seconds, path_len)
    finally:
        server.stop()
    grown = _audit_bytes(runs) - before
    bound = (S.REFUSAL_BURST + S.REFUSAL_RATE * (seconds + 1)) * S.AUDIT_LINE_MAX
    lines = (runs / ".cockpit" / "audit.jsonl").read_text().splitlines()
    assert all(len(x.encode()) < S.AUDIT_LINE_MAX for x in lines)
    assert grown <= bound, (grown, bound, sent)
    assert server.settings.audit_log.suppressed_total > 0 or sent < S.REFUSAL_BURST
    print(f"\nFLOOD {seconds:g}s path_len={path_len}: {sent} requests, audit log +{grown} bytes "
          f"({grown / seconds:.0f} B/s), bound {bound:.0f} bytes, suppressed {server.settings.audit_log.suppressed_total}")


def test_audit_log_is_size_bounded_by_rotation(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    log = S.CockpitAudit(runs, max_bytes=4096, rate=1e9, burst=10**9)
    for i in range(2000):
        log.refused({"event": "refused", "status": 401, "path": "/" + "x" * 5000, "client": "127.0.0.1"})
    sizes = [p.stat().st_size for p in (runs / ".cockpit").glob("audit.jsonl*")]
    assert len(sizes) == 2 and sum(sizes) <= 2 * 4096 + 2 * S.AUDIT_LINE_MAX
    assert oct((runs / ".cockpit" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_refusals_are_not_fsynced_but_actions_are(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    calls = []
    monkeypatch.setattr(S.os, "fsync", lambda fd: calls.append(fd))
    log = S.CockpitAudit(runs)
    for _ in range(10):
        log.refused({"event": "refused", "status": 401, "path": "/"})
    assert calls == []
    log.action({"event": "action", "action": "abort"})
    assert len(calls) == 1


# ----- 11. NaN / Infinity -------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b'{"args": {"x": NaN}}', b'{"args": {"x": Infinity}}', b'{"args": {"x": -Infinity}}',
                                 b'{"args": {"snapshot_id": "s1", "y": [1, NaN]}}', b'{"args": {"x": 1e999}}'])
def test_non_finite_numbers_in_an_action_body_are_400(env, raw):
    r = _post(env, "abort", raw=raw)
    assert r.status_code == 400 or (raw.endswith(b'1e999}}') and r.status_code in (400, 200)), r.text
    if b"NaN" in raw or b"Infinity" in raw:
        assert r.status_code == 400 and "NaN" in r.json()["error"] or "Infinity" in r.json()["error"]
        assert not (env["run"] / "control.jsonl").exists()


# ----- 12. wildcard hosts -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0", "0x0", "0.0.0", "0.0.0.0", "::0", "::", "0000::", "0:0:0:0:0:0:0:0",
                                  "::ffff:0.0.0.0", "00", "0.0", "000.000.000.000", ""])
def test_wildcard_bind_in_any_spelling_is_refused(host, tmp_path):
    assert S.is_wildcard_host(host)
    with pytest.raises(InputError, match="wildcard|exposes"):
        S.default_allowed_hosts(host)
    with pytest.raises(InputError):
        S.CockpitServer(tmp_path, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.1", "0177.0.0.1"])
def test_loopback_spellings_are_not_wildcards(host):
    assert not S.is_wildcard_host(host)


@pytest.mark.parametrize("host", ["0", "0x0", "::0"])
def test_cockpit_cli_refuses_a_wildcard_host(tmp_path, capsys, host):
    from sw_run_helpers import invoke

    (tmp_path / "runs").mkdir()
    result = invoke(["scaler-wizard", "cockpit", str(tmp_path / "runs"), "--host", host], capsys)
    assert result.rc == 2 and "wildcard" in result.err and "Traceback" not in result.text


def test_checked_address_is_the_one_bound(tmp_path):
    server = S.CockpitServer(tmp_path, host="127.1")
    try:
        assert server.sock.getsockname()[0] == "127.0.0.1"
    finally:
        server.sock.close()
