// Scaler Wizard cockpit: plain JS + SVG, no build step.
// Data arrives through one EventSource per run (/api/runs/<id>/events): the server replays the
// run's history, then streams new lines. Every string from a run is inserted with textContent.
"use strict";

const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4b5563"];
const CHARTS = {
  loss: { el: "chart-loss", x: "step", y: "loss" },
  ppl: { el: "chart-ppl", x: "length", y: "perplexity", logX: true, threshold: "perplexity_max" },
  bpb: { el: "chart-bpb", x: "length", y: "bits/byte", logX: true },
  passkey: { el: "chart-passkey", x: "length", y: "accuracy", logX: true, yMin: 0, yMax: 1,
             threshold: "passkey_min_accuracy" },
  throughput: { el: "chart-throughput", x: "step", y: "tokens/s" },
  memory: { el: "chart-memory", x: "step", y: "GB" },
};

const S = {
  csrf: null, runId: null, es: null, detail: null, status: null, telegram: null,
  series: {}, dirty: new Set(), gates: [], feedKeys: new Set(), voiceOn: false, rollbackSnapshots: [],
  thresholds: {}, lastTelegram: null,
};

const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", ...options });
  let body = {};
  try { body = await resp.json(); } catch (_) { /* empty body */ }
  if (!resp.ok) throw new Error(body.error || `${resp.status} ${resp.statusText}`);
  return body;
}

// ------------------------------------------------------------------ charts

function resetSeries() {
  S.series = {};
  for (const name of Object.keys(CHARTS)) { S.series[name] = new Map(); S.dirty.add(name); }
  S.gates = [];
  scheduleRender();
}

function addPoint(chart, seriesName, x, y) {
  if (y === null || y === undefined || !Number.isFinite(y) || !Number.isFinite(x)) return;
  const series = S.series[chart];
  if (!series.has(seriesName)) series.set(seriesName, new Map());
  series.get(seriesName).set(x, y); // a re-measured point replaces the old one
  S.dirty.add(chart);
  scheduleRender();
}

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    for (const name of S.dirty) renderChart(name);
    S.dirty.clear();
  });
}

function svgEl(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function fmt(v) {
  if (!Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-2)) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

function renderChart(name) {
  const cfg = CHARTS[name];
  const svg = $(cfg.el);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 420, H = 220, L = 48, R = 10, T = 22, B = 30;
  const entries = [...S.series[name].entries()].map(([k, m]) => [k, [...m.entries()].sort((a, b) => a[0] - b[0])]);
  const points = entries.reduce((n, [, pts]) => n + pts.length, 0);
  svg.setAttribute("data-points", String(points));
  if (!points) {
    svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "waiting for data"));
    return;
  }
  const xs = entries.flatMap(([, p]) => p.map((q) => q[0]));
  const ys = entries.flatMap(([, p]) => p.map((q) => q[1]));
  const logX = cfg.logX && Math.min(...xs) > 0 && Math.max(...xs) / Math.min(...xs) >= 4;
  const tx = (x) => (logX ? Math.log2(x) : x);
  let x0 = tx(Math.min(...xs)), x1 = tx(Math.max(...xs));
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const gateY = cfg.threshold ? Number(S.thresholds[cfg.threshold]) : NaN;
  const ysAll = Number.isFinite(gateY) ? [...ys, gateY] : ys;
  let y0 = cfg.yMin ?? Math.min(...ysAll), y1 = cfg.yMax ?? Math.max(...ysAll);
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const px = (x) => L + ((tx(x) - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 3; i++) {
    const yv = y0 + ((y1 - y0) * i) / 3;
    svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: py(yv), y2: py(yv), class: "grid" }));
    svg.appendChild(svgEl("text", { x: L - 4, y: py(yv) + 3, "text-anchor": "end" }, fmt(yv)));
  }
  const xTicks = [...new Set(logX ? xs : [Math.min(...xs), (Math.min(...xs) + Math.max(...xs)) / 2, Math.max(...xs)])]
    .sort((a, b) => a - b);
  for (const xv of xTicks.slice(0, 8)) {
    svg.appendChild(svgEl("text", { x: px(xv), y: H - B + 13, "text-anchor": "middle" }, fmt(Math.round(xv * 100) / 100)));
  }
  svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("text", { x: W - R, y: H - 4, "text-anchor": "end" }, cfg.x));
  svg.appendChild(svgEl("text", { x: 4, y: T - 8 }, cfg.y));
  if (Number.isFinite(gateY)) { // the stage gate, drawn where it is
    svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: py(gateY), y2: py(gateY), class: "gate-line" }));
    svg.appendChild(svgEl("text", { x: W - R, y: py(gateY) - 3, "text-anchor": "end", class: "gate-label" },
      `gate ${fmt(gateY)}`));
  }
  entries.forEach(([label, pts], i) => {
    const color = PALETTE[i % PALETTE.length];
    svg.appendChild(svgEl("polyline", {
      points: pts.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" "), class: "line", stroke: color,
    }));
    if (pts.length <= 40) for (const [x, y] of pts) svg.appendChild(svgEl("circle", { cx: px(x), cy: py(y), r: 2.5, fill: color }));
    svg.appendChild(svgEl("text", { x: W - R - (i % 4) * 80, y: T - 8, "text-anchor": "end", fill: color }, label));
  });
}

function onMetric(ev) {
  const name = String(ev.metric || "");
  const v = ev.value === null || ev.value === undefined ? NaN : Number(ev.value);
  const step = Number(ev.step);
  const at = name.indexOf("@");
  const length = at > 0 ? Number(name.slice(at + 1)) : NaN;
  const base = at > 0 ? name.slice(0, at) : name;
  // base/... = the unscaled model, final/... = the scaled model the run ended with, else a stage's probe
  const prefix = base.startsWith("base/") ? "base (unscaled)" : base.startsWith("final/") ? "scaled (final)" : null;
  const stageLabel = prefix || (ev.stage === undefined || ev.stage === null || ev.stage === 0 ? "base" : `stage ${ev.stage}`);
  const probe = prefix ? base.slice(base.indexOf("/") + 1) : base;
  if (name === "train/loss") addPoint("loss", "train", step, v);
  else if (name === "eval/loss") addPoint("loss", "eval", step, v);
  else if (probe === "eval/perplexity") addPoint("ppl", stageLabel, length, v);
  else if (probe === "eval/bits_per_byte") addPoint("bpb", stageLabel, length, v);
  else if (probe === "probe/passkey") addPoint("passkey", stageLabel, length, v);
  else if (name === "train/tokens_per_s") addPoint("throughput", "tokens/s", step, v);
  else if (name.startsWith("system/") && name.endsWith("_gb")) addPoint("memory", name.slice(7), step, v);
  else if (name === "gate/passed") { S.gates.push(ev); renderTimeline(); }
  if (name.startsWith("eval/") || name.startsWith("probe/")) S.probeEvents.push(ev);
}

// ------------------------------------------------------------------ header, chip, timeline

function setText(id, text) { $(id).textContent = text; }

function renderHeader() {
  const st = S.status || {};
  setText("run-id", S.runId || "no run selected");
  setText("run-stage", `stage ${st.stage ?? "-"}/${st.stages ?? "-"}`);
  setText("run-length", `length ${st.length ?? "-"}`);
  setText("run-state", st.state || "-");
  const c = (S.detail && S.detail.contract) || {};
  const badge = $("contract-badge");
  if (!c.present) { badge.textContent = "contract: none"; badge.className = "pill badge-none"; }
  else {
    const who = c.approved_by ? `approved by ${c.approved_by}` : "approved";
    const ver = c.verified === true ? "verified" : c.verified === false ? "NOT verified" : "unverified";
    badge.textContent = `contract: ${who}, ${ver}`;
    badge.className = "pill " + (c.verified === true ? "badge-ok" : "badge-warn");
  }
  const running = st.state === "running";
  $("btn-approve").disabled = !running;
  $("btn-abort").disabled = !running;
  $("btn-rollback").disabled = !(S.detail && S.detail.snapshots && S.detail.snapshots.length);
}

const VERDICTS = { // a finished run shows its verdict, not the last telegram
  completed: ["PASSED", "continue"], completed_gates_failed: ["GATES FAILED", "stop"], failed: ["FAILED", "stop"],
  rejected: ["REJECTED", "stop"],
};

function renderChip() {
  const chip = $("status-chip");
  const verdict = VERDICTS[(S.status || {}).state];
  if (verdict) {
    chip.dataset.action = verdict[1];
    chip.dataset.verdict = (S.status || {}).state;
    chip.textContent = verdict[0];
    chip.className = "chip chip-" + verdict[1];
    chip.title = ((S.detail && S.detail.summary && S.detail.summary.verdict_reasons) || []).join("; ")
      || `run ${(S.status || {}).state}`;
    return;
  }
  const action = S.telegram ? String(S.telegram.action || "none") : "none";
  delete chip.dataset.verdict;
  chip.dataset.action = action;
  chip.textContent = S.telegram ? action : "no telegram";
  chip.className = "chip chip-" + (["continue", "warn", "stop"].includes(action) ? action : "none");
  chip.title = S.telegram ? (S.telegram.reasons || []).join("; ") || "no reasons given" : "latest safety telegram";
}

function renderTimeline() {
  const ol = $("timeline");
  while (ol.firstChild) ol.removeChild(ol.firstChild);
  const st = S.status || {};
  const n = Math.max(Number(st.stages) || 0, ...S.gates.map((g) => Number(g.stage) || 0));
  for (let k = 1; k <= n; k++) {
    const gate = [...S.gates].reverse().find((g) => Number(g.stage) === k);
    const li = document.createElement("li");
    const head = document.createElement("span");
    if (gate) {
      head.className = gate.value ? "pass" : "fail";
      head.textContent = `stage ${k}: ${gate.value ? "passed" : "failed"} (${gate.decision || "-"}) at step ${gate.step}`;
    } else if (Number(st.stage) === k && st.state === "running") {
      head.className = "current";
      head.textContent = `stage ${k}: training${st.length ? ` at ${st.length} tokens` : ""}`;
    } else if (Number(st.stage) === k && st.state && st.state !== "running") {
      head.className = st.state === "completed" ? "pass" : "fail";
      head.textContent = `stage ${k}: ${st.state === "completed" ? "done" : "stopped"} (run ${st.state.replace(/_/g, " ")})`;
    } else {
      head.className = "muted";
      head.textContent = `stage ${k}: pending`;
    }
    li.appendChild(head);
    if (gate) {
      const probes = S.probeEvents.filter((e) => e.step === gate.step && e.stage === gate.stage);
      const p = document.createElement("div");
      p.className = "probes";
      p.textContent = probes.map((e) => `${e.metric}=${fmt(Number(e.value))}`).join("  ")
        + ((gate.reasons || []).length ? ` | reasons: ${gate.reasons.join("; ")}` : "");
      li.appendChild(p);
    }
    ol.appendChild(li);
  }
}

// ------------------------------------------------------------------ feed, banner, voice

function feed(tag, text, key) {
  if (key && S.feedKeys.has(key)) return;
  if (key) S.feedKeys.add(key);
  const ul = $("feed");
  const li = document.createElement("li");
  const t = document.createElement("span");
  t.className = `tag tag-${tag}`;
  t.textContent = tag;
  li.appendChild(t);
  li.appendChild(document.createTextNode(text));
  ul.insertBefore(li, ul.firstChild);
  while (ul.children.length > 200) ul.removeChild(ul.lastChild);
}

function onTelegram(t) {
  const key = "t:" + JSON.stringify([t.timestamp, t.step, t.action]);
  S.telegram = t;
  renderChip();
  if (key && S.feedKeys.has(key)) return;
  const quiet = String(t.action) === "continue" && !(t.reasons || []).length;
  const last = S.lastTelegram;
  if (quiet && last && last.quiet && last.li.isConnected) { // repeated "ok": one line with a count
    S.feedKeys.add(key);
    last.count += 1;
    last.li.lastChild.textContent = ` ok x${last.count} (steps ${last.first}-${t.step ?? "-"})`;
    return;
  }
  feed(String(t.action || "?"), ` step ${t.step ?? "-"} stage ${t.stage ?? "-"}: ${(t.reasons || []).join("; ") || "ok"}`, key);
  S.lastTelegram = { quiet, li: $("feed").firstChild, count: 1, first: t.step ?? "-" };
}

function onAlert(a) {
  if (a.type === "digest") {
    const keys = (a.keys || []).slice(0, 5).map((k) => `${k.key}×${k.count}`).join(", ");
    feed("digest", ` ${a.suppressed_alerts} alert(s) held since ${a.window_start}: ${keys}`, "d:" + a.timestamp);
    return;
  }
  const ch = a.channels || {};
  const granted = (c) => ch[c] && ch[c].outcome === "granted";
  if (granted("telegram")) feed("alert", ` [${a.effective_severity}] ${a.message}${a.repeats ? ` (+${a.repeats} repeats)` : ""}`,
    "a:" + a.timestamp + a.key);
  if (granted("visual")) showBanner(a);
  if (granted("voice") && S.voiceOn && S.live) speak(a.message);
}

function showBanner(a) {
  $("alert-text").textContent = `${String(a.effective_severity).toUpperCase()}: ${a.message}`;
  $("alert-banner").className = "banner sev-" + a.effective_severity;
}

function speak(text) {
  if (!("speechSynthesis" in window)) return;
  window.speechSynthesis.cancel(); // the throttle grants one voice alert at a time
  window.speechSynthesis.speak(new SpeechSynthesisUtterance(String(text)));
}

function onControl(c) {
  const args = c.args || {};
  const what = c.action === "rollback" ? ` to snapshot ${args.snapshot_id} (step ${args.step}, stage ${args.stage})` : "";
  feed("control", ` ${c.action}${what} by ${c.source || "?"} at ${c.timestamp}`, "c:" + c.timestamp + c.action);
}

// ------------------------------------------------------------------ runs and streams

async function loadRuns() {
  let runs = [];
  try { runs = (await api("/api/runs")).runs; } catch (e) { return; }
  const ul = $("runs-list");
  while (ul.firstChild) ul.removeChild(ul.firstChild);
  $("runs-empty").classList.toggle("hidden", runs.length > 0);
  for (const r of runs) {
    const li = document.createElement("li");
    li.dataset.runId = r.run_id;
    li.className = r.run_id === S.runId ? "active" : "";
    const name = document.createElement("span");
    name.textContent = r.run_id;
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = `${r.state}${r.action ? " · " + r.action : ""}`;
    li.append(name, state);
    li.addEventListener("click", () => { location.hash = "run=" + encodeURIComponent(r.run_id); });
    ul.appendChild(li);
  }
  if (!S.runId && runs.length && !location.hash) selectRun(runs[0].run_id);
}

async function refreshDetail() {
  if (!S.runId) return;
  try {
    S.detail = await api(`/api/runs/${encodeURIComponent(S.runId)}`);
    if (S.detail.status) S.status = S.detail.status;
    const th = (S.detail.summary && S.detail.summary.thresholds) || {};
    if (JSON.stringify(th) !== JSON.stringify(S.thresholds)) {
      S.thresholds = th; S.dirty.add("ppl"); S.dirty.add("passkey"); scheduleRender();
    }
    renderHeader(); renderChip();
    renderTimeline();
  } catch (e) { setText("action-result", e.message); }
}

function selectRun(runId) {
  if (S.es) { S.es.close(); S.es = null; }
  S.runId = runId;
  S.detail = null; S.status = null; S.telegram = null; S.thresholds = {}; S.lastTelegram = null;
  setText("action-result", "");
  for (const li of $("runs-list").children) li.classList.toggle("active", li.dataset.runId === runId);
  resetFeed();
  renderHeader(); renderChip();
  refreshDetail();
  const es = new EventSource(`/api/runs/${encodeURIComponent(runId)}/events`);
  S.es = es;
  es.addEventListener("hello", () => { resetSeries(); resetFeed(); S.live = false; setTimeout(() => { S.live = true; }, 1500); });
  es.addEventListener("metric", (m) => onMetric(JSON.parse(m.data)));
  es.addEventListener("telegram", (m) => onTelegram(JSON.parse(m.data)));
  es.addEventListener("alert", (m) => onAlert(JSON.parse(m.data)));
  es.addEventListener("control", (m) => onControl(JSON.parse(m.data)));
  es.addEventListener("status", (m) => {
    const prev = S.status && S.status.state;
    S.status = JSON.parse(m.data);
    renderHeader(); renderChip(); renderTimeline();
    if (prev !== S.status.state) { refreshDetail(); loadRuns(); }
  });
}

function resetFeed() {
  const ul = $("feed");
  while (ul.firstChild) ul.removeChild(ul.firstChild);
  S.feedKeys = new Set();
  S.probeEvents = [];
  $("alert-banner").className = "banner hidden";
}

// ------------------------------------------------------------------ actions

function addDetail(dl, k, v) {
  const dt = document.createElement("dt"); dt.textContent = k;
  const dd = document.createElement("dd"); dd.textContent = v;
  dl.append(dt, dd);
}

function showSnapshot(snap) {
  const dl = $("snapshot-details");
  while (dl.firstChild) dl.removeChild(dl.firstChild);
  if (!snap) return;
  addDetail(dl, "snapshot", snap.snapshot_id);
  addDetail(dl, "step", String(snap.step ?? "-"));
  addDetail(dl, "stage", String(snap.stage ?? "-"));
  const metrics = Object.entries(snap.metrics || {}).map(([k, v]) => `${k}=${typeof v === "number" ? fmt(v) : v}`).join(", ");
  addDetail(dl, "metrics", metrics || "-");
  addDetail(dl, "path", snap.path || "-");
}

function confirmAction(title, text, snapshots) {
  return new Promise((resolve) => {
    const dlg = $("confirm-dialog");
    setText("confirm-title", title);
    setText("confirm-text", text);
    const picker = $("snapshot-picker");
    picker.classList.toggle("hidden", !snapshots);
    if (snapshots) {
      const sel = $("snapshot-select");
      while (sel.firstChild) sel.removeChild(sel.firstChild);
      for (const s of snapshots) {
        const o = document.createElement("option");
        o.value = s.snapshot_id;
        o.textContent = `${s.snapshot_id} — step ${s.step ?? "-"}, stage ${s.stage ?? "-"}`;
        sel.appendChild(o);
      }
      sel.value = snapshots[snapshots.length - 1].snapshot_id;
      showSnapshot(snapshots[snapshots.length - 1]);
      sel.onchange = () => showSnapshot(snapshots.find((s) => s.snapshot_id === sel.value));
    }
    dlg.onclose = () => resolve(dlg.returnValue === "ok" ? (snapshots ? $("snapshot-select").value : true) : null);
    dlg.returnValue = "";
    dlg.showModal();
  });
}

async function act(action, args) {
  try {
    const res = await api(`/api/runs/${encodeURIComponent(S.runId)}/actions/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify({ args: args || {} }),
    });
    let msg = `${action}: ${res.note}`;
    if (res.restored) msg += ` — restored snapshot ${res.record.args.snapshot_id} (step ${res.record.args.step}, stage ${res.record.args.stage})`;
    setText("action-result", msg);
    refreshDetail();
  } catch (e) {
    setText("action-result", `${action} refused: ${e.message}`);
  }
}

function wireButtons() {
  $("btn-abort").addEventListener("click", async () => {
    if (await confirmAction("Abort run?", `Stop run ${S.runId} at the next training step. The last good state is kept.`)) act("abort");
  });
  $("btn-approve").addEventListener("click", async () => {
    const next = (Number((S.status || {}).stage) || 0) + 1;
    if (await confirmAction("Approve next stage?", `Let run ${S.runId} continue to stage ${next}.`)) act("approve", { stage: next });
  });
  $("btn-rollback").addEventListener("click", async () => {
    let snaps = [];
    try { snaps = (await api(`/api/runs/${encodeURIComponent(S.runId)}/snapshots`)).snapshots; } catch (e) { setText("action-result", e.message); return; }
    if (!snaps.length) { setText("action-result", "no cached snapshots for this run"); return; }
    const chosen = await confirmAction("Roll back to a snapshot?", `Restore run ${S.runId} to the snapshot below.`, snaps);
    if (chosen) act("rollback", { snapshot_id: chosen });
  });
  $("alert-dismiss").addEventListener("click", () => { $("alert-banner").className = "banner hidden"; });
  $("voice-toggle").addEventListener("change", (e) => {
    S.voiceOn = e.target.checked && "speechSynthesis" in window;
    if (S.voiceOn) speak("Voice narration on.");
  });
}

async function main() {
  S.probeEvents = [];
  resetSeries();
  wireButtons();
  try { S.csrf = (await api("/api/session")).csrf_token; } catch (e) { setText("action-result", e.message); return; }
  const fromHash = () => {
    const m = /run=([^&]+)/.exec(location.hash);
    return m ? decodeURIComponent(m[1]) : null;
  };
  window.addEventListener("hashchange", () => { const id = fromHash(); if (id && id !== S.runId) selectRun(id); });
  const initial = fromHash();
  if (initial) selectRun(initial);
  await loadRuns();
  setInterval(loadRuns, 5000);
}

document.addEventListener("DOMContentLoaded", main);
