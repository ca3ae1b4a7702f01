"""The cockpit: a local web dashboard over the runs folder (FastAPI + server-sent events).

    create_app(runs_dir, token, allowed_hosts)   the ASGI app (tests drive it with TestClient)
    CockpitServer(runs_dir, ...)                  uvicorn on a socket bound before start (port 0 ok)
    serve(runs_dir, host="127.0.0.1", port=0)     what ``scaler-wizard cockpit`` runs

Security model (a local dashboard that can stop a training run is worth attacking; Ray's
unauthenticated dashboard, CVE-2023-48022, and MLflow's path traversals are the precedents):

* binds 127.0.0.1 unless told otherwise; a wildcard bind needs an explicit host allowlist;
* a random token (``secrets.token_urlsafe(32)``), printed in the URL as Jupyter does. Every route,
  static files included, needs it: ``?token=`` on the first visit, then an ``HttpOnly;
  SameSite=Strict`` cookie (the page redirects to drop the token from the address bar), or an
  ``Authorization: Bearer`` header for scripts. Compared with ``hmac.compare_digest``;
* the ``Host`` header must be in the allowlist, so a DNS-rebinding page cannot talk to us;
* state-changing routes are POST only and need both a same-origin ``Origin`` (or ``Referer``)
  and the CSRF token (``X-CSRF-Token``; an HMAC of the session token, handed out by
  ``/api/session`` which a cross-site page cannot read);
* run and snapshot ids are validated and resolved inside the runs folder (``rundir.py``), and
  every file under it is opened without following a symlink (``rundir.open_beneath``), for
  reading, for the event stream and for the appends to ``control.jsonl`` and the audit log;
* the refusal log is rate- and size-bounded (:class:`CockpitAudit`): a token bucket of
  ``REFUSAL_RATE`` records per second (burst ``REFUSAL_BURST``), fields clipped, at most
  ``AUDIT_LINE_MAX`` bytes a line, no fsync for refusals, one rotation at ``AUDIT_MAX_BYTES``, so an
  unauthenticated flood cannot fill the disk (at most 2 x AUDIT_MAX_BYTES + 2 lines on disk);
* a bind address that resolves to a wildcard (``0``, ``0x0``, ``0.0.0``, ``::0``...) is refused
  unless ``--allowed-host`` names the hosts clients use; the socket binds the resolved address.

Operator actions are appended to ``runs/<id>/control.jsonl`` (the job obeys them) and to the
cockpit's audit log ``<runs_dir>/.cockpit/audit.jsonl``, where refused requests are recorded too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InputError, ScalerWizardError
from .rundir import (
    ACTIONS,
    RunNotFoundError,
    SafeJsonlTail,
    append_control,
    check_name,
    list_runs,
    list_snapshots,
    open_dir_beneath,
    read_json,
    read_records,
    resolve_run_dir,
    run_detail,
    utc_now,
)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CSRF_HEADER = "x-csrf-token"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8",
                ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
MAX_BODY_BYTES = 64 * 1024
# A rollback on a finished run has no job to apply it; the lead may pass a handler that restores the
# snapshot through the checkpoint cache: handler(run_dir, snapshot_entry) -> JSON-able result.
RollbackHandler = Callable[[Path, dict[str, Any]], dict[str, Any]]


AUDIT_MAX_BYTES = 1024 * 1024  # then audit.jsonl -> audit.jsonl.1 (one generation kept)
AUDIT_LINE_MAX = 1024  # bytes of one refusal record, at most
AUDIT_FIELD_MAX = 160  # characters of one string field of a refusal record (paths, Host headers...)
REFUSAL_RATE = 10.0  # refusal records per second, sustained
REFUSAL_BURST = 20  # refusal records at once


class CockpitAudit:
    """``<runs_dir>/.cockpit/audit.jsonl``: operator actions (authenticated; fsynced) and refused
    requests (anyone can cause them: rate-limited by a token bucket, fields clipped, line size
    capped, no fsync; refusals over the rate are counted and the count is written with the next
    record). The file is opened beneath the runs folder without following symlinks and rotated once
    it passes ``max_bytes`` (one older generation kept), so the log never holds more than
    ``2 * max_bytes + 2 * AUDIT_LINE_MAX`` bytes, and under a flood it grows by at most
    ``(burst + rate * seconds) * AUDIT_LINE_MAX`` bytes."""

    def __init__(self, runs_dir: Path, *, max_bytes: int = AUDIT_MAX_BYTES, rate: float = REFUSAL_RATE,
                 burst: int = REFUSAL_BURST):
        self.runs_dir = Path(runs_dir)
        self.path = self.runs_dir / ".cockpit" / "audit.jsonl"
        self.max_bytes, self.rate, self.burst = max_bytes, rate, burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.suppressed = 0  # refusals not written since the last written one
        self.suppressed_total = 0

    @staticmethod
    def _clip(value: Any) -> Any:
        if isinstance(value, str) and len(value) > AUDIT_FIELD_MAX:
            return value[:AUDIT_FIELD_MAX] + f"...(+{len(value) - AUDIT_FIELD_MAX} chars)"
        return value

    def refused(self, record: dict[str, Any]) -> bool:
        """Record a refused request if the rate allows; returns whether it was written."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                self.suppressed += 1
                self.suppressed_total += 1
                return False
            self._tokens -= 1.0
            entry = {"timestamp": utc_now(), **{k: self._clip(v) for k, v in record.items()}}
            if self.suppressed:
                entry["suppressed_before"] = self.suppressed
            line = (json.dumps(entry, allow_nan=False, default=str) + "\n").encode("utf-8")
            if len(line) > AUDIT_LINE_MAX:
                entry = {"timestamp": entry["timestamp"], "event": record.get("event"), "status": record.get("status"),
                         "note": "fields dropped: record over the line limit",
                         "suppressed_before": self.suppressed or None}
                line = (json.dumps(entry, allow_nan=False, default=str) + "\n").encode("utf-8")[:AUDIT_LINE_MAX]
            if self._write(line, fsync=False):
                self.suppressed = 0
            return True

    def action(self, record: dict[str, Any]) -> None:
        """An operator action (authenticated, rare): written in full and fsynced."""
        line = (json.dumps({"timestamp": utc_now(), **record}, allow_nan=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            self._write(line, fsync=True)

    def _write(self, line: bytes, *, fsync: bool) -> bool:
        """Append through a descriptor of ``.cockpit`` reached without symlinks; the file is opened
        ``O_NOFOLLOW`` relative to it and must be regular; rotation renames within that folder."""
        import stat as _stat

        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        name = self.path.name
        try:
            dfd = open_dir_beneath(self.runs_dir, self.path.parent, create=True)
        except OSError:  # a read-only runs folder or a planted link must not take the cockpit down
            return False
        fd = -1
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dfd)
            st = os.fstat(fd)
            if not _stat.S_ISREG(st.st_mode):
                return False
            if st.st_size + len(line) > self.max_bytes:
                os.close(fd)
                fd = -1
                os.rename(name, name + ".1", src_dir_fd=dfd, dst_dir_fd=dfd)  # replaces the old generation
                fd = os.open(name, flags, 0o600, dir_fd=dfd)
                if not _stat.S_ISREG(os.fstat(fd).st_mode):
                    return False
            os.write(fd, line)
            if fsync:
                os.fsync(fd)
            return True
        except OSError:
            return False
        finally:
            if fd >= 0:
                os.close(fd)
            os.close(dfd)


@dataclass
class CockpitSettings:
    runs_dir: Path
    token: str
    allowed_hosts: frozenset[str]
    cache_root: Path | None = None
    poll_interval_s: float = 0.25
    heartbeat_s: float = 15.0
    rollback_handler: RollbackHandler | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    audit_log: CockpitAudit | None = None

    def __post_init__(self) -> None:
        if self.audit_log is None:
            self.audit_log = CockpitAudit(self.runs_dir)

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: a per-token name keeps two cockpits on one host apart.
        return "swcockpit_" + hashlib.sha256(self.token.encode()).hexdigest()[:10]

    @property
    def csrf_token(self) -> str:
        return hmac.new(self.token.encode(), b"scaler-wizard cockpit csrf", hashlib.sha256).hexdigest()

    @property
    def audit_path(self) -> Path:
        return self.runs_dir / ".cockpit" / "audit.jsonl"

    def audit(self, record: dict[str, Any]) -> None:
        """An operator action (see :meth:`refused` for refused requests)."""
        assert self.audit_log is not None
        self.audit_log.action(record)

    def refused(self, record: dict[str, Any]) -> None:
        assert self.audit_log is not None
        self.audit_log.refused(record)


def token_matches(candidate: str | None, token: str) -> bool:
    return candidate is not None and hmac.compare_digest(candidate.encode("utf-8"), token.encode("utf-8"))


def host_name(host_header: str) -> str:
    """'[::1]:8000' -> '::1', 'LocalHost:80' -> 'localhost'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


# ---------------------------------------------------------------------------- security middleware


class CockpitGuard:
    """Pure ASGI middleware: Host allowlist, token (query / cookie / bearer), and for POST the
    same-origin and CSRF checks. Runs before routing, so no route can forget them."""

    def __init__(self, app: ASGIApp, settings: CockpitSettings):
        self.app = app
        self.settings = settings
        self.s = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = Headers(scope=scope)
        refusal = self._check(scope, headers)
        if refusal is not None:
            status, reason = refusal
            self.s.refused({"event": "refused", "status": status, "reason": reason, "method": scope["method"],
                            "path": scope["path"], "client": (scope.get("client") or ("?",))[0]})
            await JSONResponse({"error": reason}, status_code=status, headers=SECURITY_HEADERS)(scope, receive, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        from_query = token_matches(query.get("token"), self.s.token)
        cookie = f"{self.s.cookie_name}={self.s.token}; HttpOnly; SameSite=Strict; Path=/"
        if from_query and scope["method"] == "GET" and scope["path"] == "/":
            # First visit: set the cookie and drop the token from the address bar (and history).
            rest = urlencode([(k, v) for k, v in parse_qsl(scope["query_string"].decode("latin-1")) if k != "token"])
            location = "/" + (f"?{rest}" if rest else "")
            await Response(status_code=303, headers={"location": location, "set-cookie": cookie,
                                                      **SECURITY_HEADERS})(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in h:
                        h[k] = v
                if from_query:
                    h.append("set-cookie", cookie)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if host_name(host) not in self.s.allowed_hosts:
            return 403, f"Host header {host[:80]!r} is not allowed (DNS rebinding protection)."
        if not self._authenticated(scope, headers):
            return 401, "A valid cockpit token is required: open the URL printed by `scaler-wizard cockpit`."
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            if not self._same_origin(headers, host):
                return 403, "Cross-origin request refused: Origin/Referer must be this cockpit."
            if not token_matches(headers.get(CSRF_HEADER), self.s.csrf_token):
                return 403, "Missing or wrong CSRF token (X-CSRF-Token from /api/session)."
        return None

    def _authenticated(self, scope: Scope, headers: Headers) -> bool:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        cookies = _parse_cookies(headers.get("cookie", ""))
        auth = headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        return any(token_matches(c, self.s.token) for c in (query.get("token"), cookies.get(self.s.cookie_name), bearer))

    @staticmethod
    def _same_origin(headers: Headers, host: str) -> bool:
        expected = {f"http://{host}", f"https://{host}"}
        origin = headers.get("origin")
        if origin is not None:
            return origin in expected
        referer = headers.get("referer")
        if referer:
            parts = urlsplit(referer)
            return f"{parts.scheme}://{parts.netloc}" in expected
        return False


def _parse_cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------- server-sent events


def sse_event(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False, default=str)}\n\n"


async def run_events(run_dir: Path, s: CockpitSettings, max_seconds: float | None) -> AsyncIterator[str]:
    """Everything of a run as it happens: the history first, then new lines as they are completed.

    Events: ``hello`` (a new stream: the page resets), ``metric``, ``telegram``, ``alert``,
    ``control`` (one per JSON Lines record), ``status`` (status.json when it changes), ``end``.
    """
    root = run_dir.parent  # every file is opened beneath the runs folder, no symlink followed
    tails = {"metric": SafeJsonlTail(run_dir / "metrics.jsonl", root),
             "telegram": SafeJsonlTail(run_dir / "telegrams.jsonl", root),
             "alert": SafeJsonlTail(run_dir / "alerts.jsonl", root),
             "control": SafeJsonlTail(run_dir / "control.jsonl", root)}
    yield "retry: 2000\n" + sse_event("hello", {"run_id": run_dir.name, "time": utc_now()})
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    last_status: dict | None = None
    last_telegram: dict | None = None
    signatures: dict[str, tuple[int, int, int] | None] = {"status.json": None, "telegram.json": None}
    last_sent = time.monotonic()
    while not s.stopping.is_set():
        chunks = []
        for name, tail in tails.items():
            for record in tail.poll():
                chunks.append(sse_event(name, record))
                if name == "telegram":
                    last_telegram = record
        # JSON files replaced atomically: re-read only when their (inode, size, mtime) changed
        if _changed(run_dir / "status.json", signatures):
            status = read_json(run_dir / "status.json", root)
            if status is not None and status != last_status:
                last_status = status
                chunks.append(sse_event("status", status))
        if _changed(run_dir / "telegram.json", signatures):  # a writer may keep only the latest telegram
            latest = read_json(run_dir / "telegram.json", root)
            if latest is not None and latest != last_telegram:
                last_telegram = latest
                chunks.append(sse_event("telegram", latest))
        now = time.monotonic()
        if chunks:
            last_sent = now
            yield "".join(chunks)
        elif now - last_sent >= s.heartbeat_s:
            last_sent = now
            yield ": keep-alive\n\n"
        if deadline is not None and now >= deadline:
            yield sse_event("end", {"reason": "max_seconds reached"})
            return
        await asyncio.sleep(s.poll_interval_s)


def _changed(path: Path, signatures: dict[str, tuple[int, int, int] | None]) -> bool:
    try:
        st = path.lstat()  # the signature of the entry itself; reading goes through open_beneath
        sig: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        sig = None
    if sig == signatures.get(path.name):
        return False
    signatures[path.name] = sig
    return sig is not None


# ---------------------------------------------------------------------------- the app


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    args: dict[str, Any] = Field(default_factory=dict)


def _static_dir() -> Path:
    return Path(str(resources.files("scaler_wizard.cockpit") / "static"))


def create_app(runs_dir: Path | str, token: str, allowed_hosts: list[str] | tuple[str, ...] | None = None, *,
               cache_root: Path | str | None = None, poll_interval_s: float = 0.25,
               rollback_handler: RollbackHandler | None = None) -> CockpitGuard:
    """The cockpit ASGI app: the FastAPI routes (``.app``) behind :class:`CockpitGuard`.
    ``allowed_hosts``: host names (no port) the Host header may carry; default: the loopback names."""
    if not token or len(token) < 16:
        raise InputError("The cockpit token must be at least 16 characters (use secrets.token_urlsafe(32)).")
    settings = CockpitSettings(
        runs_dir=Path(runs_dir), token=token,
        allowed_hosts=frozenset(h.lower() for h in (allowed_hosts or LOOPBACK_HOSTS)),
        cache_root=Path(cache_root) if cache_root is not None else None,
        poll_interval_s=poll_interval_s, rollback_handler=rollback_handler,
    )
    app = FastAPI(title="Scaler Wizard cockpit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    static = _static_dir()
    static_files = {p.name: p for p in static.iterdir() if p.is_file() and p.suffix in STATIC_TYPES}

    @app.exception_handler(ScalerWizardError)
    async def _typed_error(request: Request, exc: ScalerWizardError) -> JSONResponse:
        status = 404 if isinstance(exc, RunNotFoundError) else (400 if isinstance(exc, InputError) else 409)
        return JSONResponse({"error": str(exc)}, status_code=status)

    def run_dir_of(run_id: str) -> Path:
        return resolve_run_dir(settings.runs_dir, run_id)

    @app.get("/")
    async def index() -> Response:
        return Response(static_files["index.html"].read_bytes(), media_type=STATIC_TYPES[".html"])

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        path = static_files.get(name)
        if path is None:
            return JSONResponse({"error": f"No static file {name!r}."}, status_code=404)
        return Response(path.read_bytes(), media_type=STATIC_TYPES[path.suffix])

    @app.get("/api/session")
    async def session() -> dict[str, Any]:
        return {"csrf_token": settings.csrf_token, "runs_dir": str(settings.runs_dir.resolve()),
                "actions": list(ACTIONS)}

    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        return {"runs": list_runs(settings.runs_dir)}

    @app.get("/api/runs/{run_id}")
    async def run(run_id: str) -> dict[str, Any]:
        return run_detail(run_dir_of(run_id), settings.cache_root)

    @app.get("/api/runs/{run_id}/files/{name}")
    async def run_file(run_id: str, name: str) -> dict[str, Any]:
        """The records of one of the run's JSON Lines files (metrics, telegrams, alerts, control)."""
        allowed = {"metrics.jsonl", "telegrams.jsonl", "alerts.jsonl", "control.jsonl"}
        check_name("file name", name)
        if name not in allowed:
            raise InputError(f"File {name!r} is not served; choose one of {sorted(allowed)}.")
        run_dir = run_dir_of(run_id)
        return {"records": read_records(run_dir / name, run_dir.parent)}

    @app.get("/api/runs/{run_id}/snapshots")
    async def snapshots(run_id: str) -> dict[str, Any]:
        return {"snapshots": list_snapshots(run_dir_of(run_id), settings.cache_root)}

    @app.get("/api/runs/{run_id}/events")
    async def events(run_id: str, max_seconds: float | None = None) -> StreamingResponse:
        if max_seconds is not None and not 0 < max_seconds <= 86_400:
            raise InputError("max_seconds must be in (0, 86400].")
        return StreamingResponse(run_events(run_dir_of(run_id), settings, max_seconds),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @app.post("/api/runs/{run_id}/actions/{action}")
    async def act(run_id: str, action: str, request: Request) -> JSONResponse:
        run_dir = run_dir_of(run_id)
        if action not in ACTIONS:
            raise InputError(f"Unknown action {action!r}; use one of {', '.join(ACTIONS)}.")
        body = await _action_body(request)
        result = perform_action(settings, run_dir, action, body.args)
        settings.audit({"event": "action", "run_id": run_id, "action": action, "args": result["record"]["args"],
                        "client": request.client.host if request.client else "?",
                        "user_agent": request.headers.get("user-agent", ""), "applied": result.get("applied")})
        return JSONResponse(result)

    return CockpitGuard(app, settings)


async def _action_body(request: Request) -> ActionBody:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InputError(f"Request body over {MAX_BODY_BYTES} bytes.")
    if not raw.strip():
        return ActionBody()

    def _no_constant(name: str) -> Any:
        raise InputError(f"Action body contains {name}; JSON has no NaN or Infinity. Send finite numbers.")

    def _finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise InputError(f"Action body contains the number {text[:40]}, which is not finite.")
        return value

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"Action body is not JSON ({str(exc)[:120]}). Send {{\"args\": {{...}}}}.") from None
    try:
        return ActionBody.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"Action body is invalid: {problems}. Send {{\"args\": {{...}}}}.") from None


def perform_action(s: CockpitSettings, run_dir: Path, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Check an operator action against the run's state, then append it to control.jsonl."""
    state = (read_json(run_dir / "status.json", run_dir.parent) or {}).get("state", "unknown")
    running = state == "running"
    if action in ("approve", "abort") and not running:
        raise ScalerWizardError(f"Cannot {action} run {run_dir.name}: it is {state}, not running.")
    applied: bool | None = None
    note = "queued: the job applies it within one training step"
    result_extra: dict[str, Any] = {}
    if action == "rollback":
        snaps = list_snapshots(run_dir, s.cache_root)
        if not snaps:
            raise ScalerWizardError(f"Run {run_dir.name} has no cached snapshots to roll back to.")
        wanted = args.get("snapshot_id")
        if wanted is None:
            raise InputError(f"Rollback needs args.snapshot_id; one of {[x['snapshot_id'] for x in snaps]}.")
        check_name("snapshot id", str(wanted))
        snap = next((x for x in snaps if x["snapshot_id"] == wanted), None)
        if snap is None:
            raise InputError(f"Snapshot {wanted!r} is not a cached snapshot of run {run_dir.name}.")
        args = {"snapshot_id": snap["snapshot_id"], "step": snap["step"], "stage": snap["stage"], "path": snap["path"]}
        if not running:
            if s.rollback_handler is not None:
                result_extra["restored"] = s.rollback_handler(run_dir, snap)
                applied, note = True, "restored by the cockpit (no job was running)"
            else:
                applied, note = False, "recorded; no job is running to apply it"
    record = append_control(run_dir, action, args, source="cockpit")
    return {"ok": True, "record": record, "applied": applied, "note": note, **result_extra}


# ---------------------------------------------------------------------------- serving


def resolve_bind_host(host: str) -> list[tuple[int, str]]:
    """(address family, numeric address) for every address ``host`` resolves to (a literal in any
    spelling the C library accepts -- ``0``, ``0x0``, ``0.0.0``, ``::0`` -- or a name)."""
    if not host or not host.strip():
        return [(socket.AF_INET, "0.0.0.0")]
    try:
        infos = socket.getaddrinfo(host.strip(), None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise InputError(f"Cannot resolve the cockpit host {host!r}: {exc}.",
                         hint="Bind 127.0.0.1 (the default).") from None
    out: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in out:
            out.append((family, sockaddr[0]))
    if not out:
        raise InputError(f"The cockpit host {host!r} resolves to no IPv4/IPv6 address.")
    return out


def is_wildcard_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_unspecified:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(mapped is not None and mapped.is_unspecified)


def is_wildcard_host(host: str) -> bool:
    """Whether ``host`` resolves to an address that binds every interface."""
    return any(is_wildcard_address(a) for _, a in resolve_bind_host(host))


def default_allowed_hosts(host: str) -> list[str]:
    if is_wildcard_host(host):
        raise InputError(f"Binding the cockpit to {host!r} (a wildcard address: every interface) exposes it to the "
                         "network; pass --allowed-host with the name(s) clients will use, or bind 127.0.0.1.")
    return sorted({*LOOPBACK_HOSTS, host.lower()})


class CockpitServer:
    """uvicorn on a socket bound in the constructor, so ``port=0`` gives a known free port and the
    URL can be printed before serving. ``start()`` runs it in a daemon thread (tests, ``run --cockpit``)."""

    def __init__(self, runs_dir: Path | str, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 allowed_hosts: list[str] | None = None, **app_kwargs: Any):
        import uvicorn

        self.host = host
        self.token = token or secrets.token_urlsafe(32)
        hosts = allowed_hosts or default_allowed_hosts(host)
        family, address = resolve_bind_host(host)[0]  # bind what was checked, not a second resolution
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
        except OSError as exc:
            self.sock.close()
            raise InputError(f"Cannot bind the cockpit to {host}:{port}: {exc.strerror or exc}.",
                             hint="Choose another --port (0 picks a free one).") from None
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(runs_dir, self.token, hosts, **app_kwargs)
        self.settings: CockpitSettings = self.app.settings
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/?token={self.token}"

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout_s: float = 10.0) -> CockpitServer:
        self._thread = threading.Thread(target=self.run, name="scaler-wizard-cockpit", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise ScalerWizardError(f"The cockpit did not start within {timeout_s:g} s.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.settings.stopping.set()  # ends open event streams
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()


def serve(runs_dir: Path | str, host: str = "127.0.0.1", port: int = 0, *, allowed_hosts: list[str] | None = None,
          open_browser: bool = False, echo: Callable[[str], None] = print, **app_kwargs: Any) -> None:
    """Serve the cockpit until interrupted; prints the URL with its one-time token first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise InputError(f"Runs folder {runs_dir} does not exist.",
                         hint="Pass the folder your recipe's run.output_dir points to (default: runs).")
    server = CockpitServer(runs_dir, host, port, allowed_hosts=allowed_hosts, **app_kwargs)
    echo(f"Scaler Wizard cockpit for {runs_dir.resolve()}")
    echo(f"    {server.url}")
    echo("Open the URL above (it carries the access token). Ctrl+C stops the cockpit.")
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    server.run()
