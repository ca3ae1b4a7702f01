"""Cockpit API through FastAPI's TestClient (and one real uvicorn server on port 0)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from scaler_wizard.cockpit.rundir import list_snapshots, read_control, stages_from_metrics
from scaler_wizard.cockpit.server import CockpitServer, create_app, default_allowed_hosts
from scaler_wizard.errors import InputError

ORIGIN = "http://testserver"


def jline(record: dict) -> str:
    return json.dumps(record) + "\n"


def parse_sse(body: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body (comments and retry lines skipped)."""
    out = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def make_run(runs: Path, run_id: str, state: str = "running", stage: int = 1) -> Path:
    run = runs / run_id
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": state, "stage": stage, "stages": 2, "length": 512}))
    (run / "envelope.json").write_text(json.dumps({"schema_version": 1, "run_id": run_id, "config": {},
                                                   "contract": {"approved_by": "ada@example.org", "verified": True}}))
    metrics = [
        {"step": 1, "metric": "train/loss", "value": 4.0, "timestamp": "2026-01-01T00:00:01Z", "stage": 1},
        {"step": 2, "metric": "train/loss", "value": 3.5, "timestamp": "2026-01-01T00:00:02Z", "stage": 1},
        {"step": 2, "metric": "eval/perplexity@512", "value": 30.0, "timestamp": "2026-01-01T00:00:03Z", "stage": 1},
        {"step": 2, "metric": "probe/passkey@512", "value": 0.5, "timestamp": "2026-01-01T00:00:03Z", "stage": 1},
        {"step": 2, "metric": "gate/passed", "value": 1.0, "timestamp": "2026-01-01T00:00:04Z", "stage": 1,
         "decision": "pass"},
    ]
    (run / "metrics.jsonl").write_text("".join(jline(m) for m in metrics) + '{"step": 3, "metr')  # torn tail
    telegram = {"action": "continue", "reasons": [], "step": 2, "stage": 1, "metrics": {}, "timestamp": "t2"}
    (run / "telegrams.jsonl").write_text(jline({**telegram, "timestamp": "t1"}) + jline(telegram))
    if state == "completed":
        (run / "summary.json").write_text(json.dumps({"run_id": run_id, "headline": {"ppl": 30.0}}))
    return run


def add_cached_snapshot(runs: Path, run_id: str, snapshot_id: str, step: int, stage: int, complete: bool = True) -> Path:
    d = runs / ".checkpoints" / "snapshots" / run_id / snapshot_id
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"run_id": run_id, "snapshot_id": snapshot_id, "step": step,
                                                 "stage": stage, "phase": "stage_end",
                                                 "metrics": {"eval/perplexity@512": 30.0}, "files": {}}))
    if complete:
        (d / "COMPLETE").write_text("scaler-wizard snapshot complete\n")
    return d


@pytest.fixture
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    make_run(runs, "live-run")
    make_run(runs, "done-run", state="completed", stage=2)
    return runs


@pytest.fixture
def client(runs):
    token = secrets.token_urlsafe(32)
    c = TestClient(create_app(runs, token, ["testserver"], poll_interval_s=0.05))
    assert c.get(f"/?token={token}", follow_redirects=False).status_code == 303
    c.csrf = c.get("/api/session").json()["csrf_token"]
    return c


def post(client, path: str, args: dict | None = None):
    return client.post(path, json={"args": args or {}}, headers={"Origin": ORIGIN, "X-CSRF-Token": client.csrf})


def test_first_visit_sets_cookie_and_drops_token_from_url(runs):
    token = secrets.token_urlsafe(32)
    c = TestClient(create_app(runs, token, ["testserver"]))
    r = c.get(f"/?token={token}&x=1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?x=1"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token in cookie
    page = c.get("/")
    assert page.status_code == 200 and "Scaler Wizard cockpit" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert c.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/static/nope.js").status_code == 404


def test_runs_list_skips_cache_folder(client, runs):
    add_cached_snapshot(runs, "done-run", "s1", 10, 1)
    ids = [r["run_id"] for r in client.get("/api/runs").json()["runs"]]
    assert sorted(ids) == ["done-run", "live-run"]
    live = next(r for r in client.get("/api/runs").json()["runs"] if r["run_id"] == "live-run")
    assert (live["state"], live["stage"], live["stages"], live["action"]) == ("running", 1, 2, "continue")


def test_run_detail(client):
    d = client.get("/api/runs/done-run").json()
    assert d["status"]["state"] == "completed" and d["summary"]["headline"] == {"ppl": 30.0}
    assert d["telegram"]["timestamp"] == "t2", "latest telegram from telegrams.jsonl"
    assert d["contract"] == {"present": True, "approved_by": "ada@example.org", "verified": True}
    assert d["stages"] == [{"stage": 1, "step": 2, "passed": True, "decision": "pass", "reasons": [],
                            "probes": {"eval/perplexity@512": 30.0, "probe/passkey@512": 0.5},
                            "timestamp": "2026-01-01T00:00:04Z"}]
    assert client.get("/api/runs/missing-run").status_code == 404


def test_telegram_json_wins_over_history(client, runs):
    (runs / "live-run" / "telegram.json").write_text(json.dumps({"action": "warn", "reasons": ["ppl up"], "step": 3}))
    assert client.get("/api/runs/live-run").json()["telegram"]["action"] == "warn"


def test_files_endpoint_returns_complete_records_only(client):
    records = client.get("/api/runs/live-run/files/metrics.jsonl").json()["records"]
    assert len(records) == 5 and records[-1]["metric"] == "gate/passed"
    assert client.get("/api/runs/live-run/files/status.json").status_code == 400


def test_sse_stream_returns_history_then_appended_lines(client, runs):
    run = runs / "live-run"

    def writer():
        time.sleep(0.4)
        with open(run / "metrics.jsonl", "a") as fh:  # completes the torn line, then a new one
            fh.write('ic": "train/loss", "value": 3.0, "timestamp": "t3"}\n')
            fh.write(jline({"step": 4, "metric": "train/tokens_per_s", "value": 900.0, "timestamp": "t4"}))
        with open(run / "alerts.jsonl", "a") as fh:
            fh.write(jline({"type": "decision", "key": "k", "message": "ppl up", "channels": {}}))
        (run / "telegram.json").write_text(json.dumps({"action": "stop", "reasons": ["nan"], "step": 4}))

    t = threading.Thread(target=writer)
    t.start()
    with client.stream("GET", "/api/runs/live-run/events?max_seconds=1.5") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read().decode()
    t.join()
    events = parse_sse(body)
    kinds = [k for k, _ in events]
    assert kinds[0] == "hello" and kinds[-1] == "end"
    metrics = [e for k, e in events if k == "metric"]
    assert [m["step"] for m in metrics] == [1, 2, 2, 2, 2, 3, 4], "history, the completed torn line, the new line"
    assert [e["action"] for k, e in events if k == "telegram"][-1] == "stop"
    assert any(k == "alert" and e["message"] == "ppl up" for k, e in events)
    assert any(k == "status" and e["state"] == "running" for k, e in events)


def test_abort_appends_to_control_and_audit(client, runs):
    r = post(client, "/api/runs/live-run/actions/abort")
    assert r.status_code == 200, r.text
    control = read_control(runs / "live-run")
    assert len(control) == 1
    rec = control[0]
    assert set(rec) == {"timestamp", "action", "args", "source"}
    assert (rec["action"], rec["args"], rec["source"]) == ("abort", {}, "cockpit")
    audit = [json.loads(x) for x in (runs / ".cockpit" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "action" and audit[-1]["action"] == "abort" and audit[-1]["run_id"] == "live-run"


def test_approve_and_abort_need_a_running_run(client, runs):
    assert post(client, "/api/runs/live-run/actions/approve", {"stage": 2}).status_code == 200
    for action in ("approve", "abort"):
        r = post(client, f"/api/runs/done-run/actions/{action}")
        assert r.status_code == 409 and "completed, not running" in r.json()["error"]
    assert not (runs / "done-run" / "control.jsonl").exists()
    assert post(client, "/api/runs/live-run/actions/explode").status_code == 400
    assert post(client, "/api/runs/live-run/actions/abort", {"x": 1}).status_code == 200
    bad = client.post("/api/runs/live-run/actions/abort", content=b'{"argz": {}}',
                      headers={"Origin": ORIGIN, "X-CSRF-Token": client.csrf})
    assert bad.status_code == 400 and "argz" in bad.json()["error"]


def test_snapshots_from_cache_and_run_folder(runs):
    add_cached_snapshot(runs, "done-run", "s-20", 20, 1)
    add_cached_snapshot(runs, "done-run", "s-30", 30, 2, complete=False)  # never offered
    folder = runs / "done-run" / "snapshots" / "step-10"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 10, "stage": 1, "metrics": {"train/loss": 3.9}}))
    (runs / "done-run" / "snapshots.json").write_text(json.dumps({"snapshots": [{"id": "m-5", "step": 5}]}))
    snaps = list_snapshots(runs / "done-run")
    assert [(s["snapshot_id"], s["step"], s["origin"]) for s in snaps] == [
        ("m-5", 5, "manifest"), ("step-10", 10, "run folder"), ("s-20", 20, "cache")]
    assert snaps[2]["metrics"] == {"eval/perplexity@512": 30.0} and snaps[2]["path"].endswith("s-20")


def test_rollback(client, runs):
    assert post(client, "/api/runs/done-run/actions/rollback").status_code == 409, "no snapshots yet"
    add_cached_snapshot(runs, "done-run", "s-20", 20, 1)
    assert post(client, "/api/runs/done-run/actions/rollback").status_code == 400, "snapshot_id required"
    assert post(client, "/api/runs/done-run/actions/rollback", {"snapshot_id": "s-99"}).status_code == 400
    r = post(client, "/api/runs/done-run/actions/rollback", {"snapshot_id": "s-20"})
    assert r.status_code == 200 and r.json()["applied"] is False
    rec = read_control(runs / "done-run")[-1]
    assert rec["action"] == "rollback" and rec["args"]["snapshot_id"] == "s-20" and rec["args"]["step"] == 20


def test_rollback_handler_restores_a_finished_run(runs):
    add_cached_snapshot(runs, "done-run", "s-20", 20, 1)
    seen = []

    def handler(run_dir: Path, snap: dict) -> dict:
        seen.append((run_dir.name, snap["snapshot_id"]))
        return {"restored_to": str(run_dir / "restored"), "step": snap["step"]}

    token = secrets.token_urlsafe(32)
    c = TestClient(create_app(runs, token, ["testserver"], rollback_handler=handler))
    csrf = c.get(f"/api/session?token={token}").json()["csrf_token"]
    r = c.post("/api/runs/done-run/actions/rollback", json={"args": {"snapshot_id": "s-20"}},
               headers={"Origin": ORIGIN, "X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["applied"] is True and r.json()["restored"]["step"] == 20
    assert seen == [("done-run", "s-20")]


def test_stage_timeline_helper():
    events = [{"step": 5, "metric": "gate/passed", "value": 0.0, "stage": 2, "decision": "stop", "reasons": ["ppl"]},
              {"step": 5, "metric": "eval/perplexity@1024", "value": 9.0, "stage": 2},
              {"step": 5, "metric": "eval/perplexity@1024", "value": 99.0, "stage": 1}]
    assert stages_from_metrics(events) == [{"stage": 2, "step": 5, "passed": False, "decision": "stop",
                                            "reasons": ["ppl"], "probes": {"eval/perplexity@1024": 9.0},
                                            "timestamp": None}]


def test_real_server_on_port_zero_streams_events(runs):
    httpx = pytest.importorskip("httpx")
    server = CockpitServer(runs, poll_interval_s=0.05).start()
    try:
        assert server.base_url.startswith("http://127.0.0.1:") and server.port > 0
        assert server.url.endswith(f"/?token={server.token}")
        auth = {"Authorization": f"Bearer {server.token}"}
        assert httpx.get(f"{server.base_url}/api/runs", headers=auth).json()["runs"]
        got = []
        with httpx.stream("GET", f"{server.base_url}/api/runs/live-run/events", headers=auth, timeout=5) as resp:
            for line in resp.iter_lines():
                if line.startswith("event: status"):
                    with open(runs / "live-run" / "metrics.jsonl", "a") as fh:
                        fh.write('ic": "x", "value": 1}\n' + jline({"step": 9, "metric": "train/loss", "value": 2.0}))
                if line.startswith("data:") and '"step": 9' in line:
                    got.append(json.loads(line[5:]))
                    break
        assert got and got[0]["value"] == 2.0
    finally:
        server.stop()
    assert not server._thread.is_alive()


def test_wildcard_bind_needs_an_allowlist():
    with pytest.raises(InputError, match="exposes it to the network"):
        default_allowed_hosts("0.0.0.0")
    assert "127.0.0.1" in default_allowed_hosts("127.0.0.1")


def test_cli_command_reports_missing_runs_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from scaler_wizard.cockpit.cockpit_cli import cockpit

    app = typer.Typer()
    app.command()(cockpit)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["cockpit", str(tmp_path / "nope")])
    assert isinstance(result.exception, InputError) and "does not exist" in str(result.exception)
