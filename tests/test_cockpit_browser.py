"""The cockpit in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python API).

A fake job appends to a live run directory in a background thread; the test watches the charts
update, clicks Abort, sees ``control.jsonl`` get the command and the status chip turn to stop,
then rolls a finished run back to a cached snapshot. Screenshots go to ``<tmp>/artifacts``.
Skipped where /usr/bin/chromium is missing, except under CI=true where it must run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("SCALER_WIZARD_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IN_CI = os.environ.get("CI", "").lower() == "true"

if not CHROMIUM.exists() and not IN_CI:
    pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium) "
                "to run the browser test", allow_module_level=True)
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from scaler_wizard.cockpit.rundir import read_control
from scaler_wizard.cockpit.server import CockpitServer


def wait_for(predicate, what: str, timeout_s: float = 15.0) -> None:
    """Poll from Python: the page's CSP forbids eval, which Playwright's wait_for_function needs."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def points(page, chart: str) -> int:
    return int(page.locator(f"#chart-{chart}").get_attribute("data-points") or 0)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def write_telegram(run: Path, action: str, step: int, reasons: list[str]) -> None:
    t = {"action": action, "reasons": reasons, "step": step, "stage": 1, "metrics": {}, "timestamp": now()}
    append(run / "telegrams.jsonl", t)
    tmp = run / ".telegram.json.tmp"
    tmp.write_text(json.dumps(t))
    os.replace(tmp, run / "telegram.json")


class FakeJob(threading.Thread):
    """Appends training metrics every 0.15 s; obeys an abort found in control.jsonl."""

    def __init__(self, run: Path):
        super().__init__(daemon=True)
        self.run_dir = run
        self.stop_event = threading.Event()
        self.aborted_at: float | None = None

    def run(self) -> None:
        run, step = self.run_dir, 0
        write_telegram(run, "continue", 0, [])
        append(run / "alerts.jsonl", {"type": "decision", "timestamp": now(), "source": "safety", "key": "tp",
                                      "severity": "warning", "effective_severity": "warning", "escalated": False,
                                      "message": "throughput below plan", "repeats": 0,
                                      "channels": {"voice": {"outcome": "denied", "reason": "-"},
                                                   "visual": {"outcome": "granted", "reason": "-"},
                                                   "telegram": {"outcome": "granted", "reason": "-"}}})
        while not self.stop_event.is_set():
            if any(c["action"] == "abort" for c in read_control(run)):
                self.aborted_at = time.monotonic()
                write_telegram(run, "stop", step, ["operator abort from the cockpit"])
                (run / "status.json").write_text(json.dumps({"state": "failed", "stage": 1, "stages": 2,
                                                             "length": 512, "error": "RunHalted: operator abort"}))
                return
            step += 1
            for metric, value in (("train/loss", 5.0 / (1 + 0.05 * step)), ("train/tokens_per_s", 900 + step),
                                  ("system/peak_rss_gb", 1.0 + 0.01 * step)):
                append(run / "metrics.jsonl", {"step": step, "metric": metric, "value": value, "timestamp": now(),
                                               "stage": 1})
            if step % 10 == 0:
                for length, ppl in ((256, 20.0), (512, 25.0 + 10 / step)):
                    append(run / "metrics.jsonl", {"step": step, "metric": f"eval/perplexity@{length}", "value": ppl,
                                                   "timestamp": now(), "stage": 1})
                    append(run / "metrics.jsonl", {"step": step, "metric": f"eval/bits_per_byte@{length}",
                                                   "value": ppl / 20, "timestamp": now(), "stage": 1})
                    append(run / "metrics.jsonl", {"step": step, "metric": f"probe/passkey@{length}",
                                                   "value": 0.9 if length == 256 else 0.6, "timestamp": now(),
                                                   "stage": 1})
            time.sleep(0.15)


@pytest.fixture
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    live = runs / "live-run"
    live.mkdir(parents=True)
    (live / "status.json").write_text(json.dumps({"state": "running", "stage": 1, "stages": 2, "length": 512}))
    (live / "envelope.json").write_text(json.dumps({"run_id": "live-run", "contract": {"approved_by": "ada",
                                                                                       "verified": True}}))
    (live / "metrics.jsonl").write_text("")
    done = runs / "done-run"
    done.mkdir()
    (done / "status.json").write_text(json.dumps({"state": "completed_gates_failed", "stage": 2, "stages": 2,
                                                  "length": 1024, "verdict": "gates_failed"}))
    (done / "summary.json").write_text(json.dumps({
        "verdict": "gates_failed", "verdict_reasons": ["stage 2 (1024 tokens): passkey@1024 below 0.8"],
        "thresholds": {"passkey_min_accuracy": 0.8, "perplexity_max": 60.0}, "headline": {}}))
    (done / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 20, "metric": "train/loss", "value": 3.1, "stage": 1},
        {"step": 20, "metric": "gate/passed", "value": 1.0, "stage": 1, "decision": "pass"},
        {"step": 40, "metric": "gate/passed", "value": 0.0, "stage": 2, "decision": "rollback",
         "reasons": ["passkey@1024 below 0.8"]}]))
    write_telegram(done, "warn", 40, ["passkey@1024 below 0.8"])
    snap = runs / ".checkpoints" / "snapshots" / "done-run" / "s-000020"
    snap.mkdir(parents=True)
    (snap / "manifest.json").write_text(json.dumps({"snapshot_id": "s-000020", "step": 20, "stage": 1,
                                                    "phase": "stage_end", "metrics": {"eval/perplexity@512": 21.5}}))
    (snap / "COMPLETE").write_text("complete\n")
    return runs


def test_cockpit_in_headless_chromium(runs, tmp_path):
    if not CHROMIUM.exists():  # only reached under CI=true, where the browser test must run
        pytest.fail(f"CI=true but {CHROMIUM} is missing: .ci/run must `apt-get install -y chromium`.", pytrace=False)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    restored: list[str] = []

    def restore(run_dir: Path, snap: dict) -> dict:
        restored.append(snap["snapshot_id"])
        (run_dir / "RESTORED_FROM").write_text(snap["path"])
        return {"snapshot_id": snap["snapshot_id"], "target": str(run_dir)}

    job = FakeJob(runs / "live-run")
    server = CockpitServer(runs, poll_interval_s=0.1, rollback_handler=restore).start()
    console_errors: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(server.url)
            assert "token=" not in page.url, "the token is dropped from the address bar"
            job.start()
            page.click("#runs-list li[data-run-id='live-run']")
            page.wait_for_selector("#status-chip[data-action='continue']", timeout=15_000)
            wait_for(lambda: points(page, "loss") >= 5, "loss points")
            first = points(page, "loss")
            wait_for(lambda: points(page, "loss") >= first + 5, "the loss chart to update")
            wait_for(lambda: points(page, "ppl") >= 2, "perplexity points")
            for chart in ("throughput", "memory", "bpb", "passkey"):
                assert points(page, chart) > 0, chart
            assert "approved by ada, verified" in page.locator("#contract-badge").inner_text()
            assert "throughput below plan" in page.locator("#alert-text").inner_text()
            page.screenshot(path=str(artifacts / "1-live-charts.png"), full_page=True)

            page.click("#btn-abort")
            page.wait_for_selector("#confirm-dialog[open]")
            page.click("#confirm-ok")
            deadline = time.monotonic() + 10
            while not any(c["action"] == "abort" for c in read_control(runs / "live-run")):
                assert time.monotonic() < deadline, "abort never reached control.jsonl"
                time.sleep(0.05)
            page.wait_for_selector("#status-chip[data-action='stop']", timeout=15_000)
            wait_for(lambda: page.locator("#run-state").inner_text() == "failed", "run state failed")
            # a finished run's chip is its verdict, not the last telegram
            wait_for(lambda: page.locator("#status-chip").inner_text().strip() == "FAILED", "the FAILED verdict chip")
            assert page.locator("#btn-abort").is_disabled()
            assert job.aborted_at is not None
            page.screenshot(path=str(artifacts / "2-after-abort.png"), full_page=True)

            page.click("#runs-list li[data-run-id='done-run']")
            page.wait_for_selector("#status-chip[data-verdict='completed_gates_failed']", timeout=15_000)
            assert page.locator("#status-chip").inner_text().strip() == "GATES FAILED"
            assert "passkey@1024 below 0.8" in (page.locator("#status-chip").get_attribute("title") or "")
            page.wait_for_selector("#btn-rollback:not([disabled])", timeout=10_000)
            page.click("#btn-rollback")
            page.wait_for_selector("#confirm-dialog[open]")
            details = page.locator("#snapshot-details").inner_text()
            for expected in ("s-000020", "20", "eval/perplexity@512=21.5", str(runs / ".checkpoints")):
                assert expected in details, (expected, details)
            page.screenshot(path=str(artifacts / "3-rollback-confirm.png"), full_page=True)
            page.click("#confirm-ok")
            wait_for(lambda: "restored snapshot s-000020" in page.locator("#action-result").inner_text(),
                     "the rollback result")
            page.screenshot(path=str(artifacts / "4-rollback-done.png"), full_page=True)
            browser.close()
    finally:
        job.stop_event.set()
        server.stop()
    assert restored == ["s-000020"]
    rollback = read_control(runs / "done-run")[-1]
    assert rollback["action"] == "rollback" and rollback["args"]["step"] == 20 and rollback["source"] == "cockpit"
    assert not console_errors, console_errors
    shots = sorted(p.name for p in artifacts.glob("*.png"))
    assert shots == ["1-live-charts.png", "2-after-abort.png", "3-rollback-confirm.png", "4-rollback-done.png"]
    assert all((artifacts / s).stat().st_size > 10_000 for s in shots)
    print(f"\nscreenshots in {artifacts}")
