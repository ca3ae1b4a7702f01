"""Human Contract Gatekeeper, part 2: the run-time checker (spec module 5, output side).

``authorize_run`` is called by the pipeline *before the model is loaded*. It verifies the
contract (``safety/contract.py``: signatures from trusted, unrevoked approvers under the one trust
resolution ``resolve_trust_policy``, k-of-n, version, signoff, validity window and its maximum)
and that it binds exactly this run, recipe and every input file (model folder, data, teacher,
offline cache, probe code); or, with no contract, takes the explicit approval of the person at the
keyboard (typed signoff sentence or ``--self-approve``) where the user's trust file does not forbid
it. It records the contract as consumed in the user's state folder (replay protection that does
not live in a run folder) and returns an :class:`ApprovalGrant`. Every result, pass or fail, goes
to ``<run>/contract/audit.jsonl`` (mode 0600; digests, never secrets).

**No bearer token.** Earlier versions issued a PASETO token signed with a key generated in the
same process and verified by that process: it bound nothing an attacker in the process could not
re-issue, so it was removed (issue 14). What binds a running run instead:

* the *signed contract itself*, kept in the grant and re-verified at every stage boundary
  (``check_scope``) against the trust files as they are then: a key revoked mid-run stops the run
  at the next stage; the contract digest must be unchanged;
* the *approved bytes*: ``grant.verified`` (:class:`~.contract.VerifiedScope`) hands the loader
  exactly the bytes whose sha256 is in the signed scope (``read_verified`` / ``materialize``),
  and ``check_scope(recheck_files=True)`` re-hashes every bound file;
* the *work budget*: ``grant.work`` (:class:`WorkBudget`) counts optimizer steps and training
  tokens actually done, across rollbacks and gate extensions, and refuses the step that would pass
  the approved ``max_steps`` / ``max_tokens``;
* the *wall time*: ``grant.expires_at`` = approval time + the approved ``max_wall_time_s``;
* the *replay ledger* (:class:`ReplayLedger`) in ``$SCALER_WIZARD_HOME/state``: a contract id
  authorises one run (its own resumes included), whatever happens to the runs folder.

What the pipeline does with a grant (issue 14; tests/test_contract_battery_run.py lists the cases
each step unlocks):

1. load the model and tokenizer from ``grant.materialize("model", recipe.model.path,
   run_dir / ".verified" / "model")`` (a 0700 copy of exactly the approved bytes, hashed while
   copied), the teacher from ``grant.materialize("teacher", ...)``, the offline cache from
   ``grant.materialize("distill_cache", ...)`` and the drop-in probes from
   ``grant.materialize("probe_code", d)`` for each ``evaluation.probe_dirs`` entry;
2. data read before the approval is read with ``contract.read_and_hash`` and checked after it
   with ``grant.verified.verify_read(path, size, sha256)`` (or read after it with
   ``grant.read_verified``);
3. charge ``grant.work.charge(1, tokens_per_step)`` before every optimizer step (restore it from
   the position on resume: ``grant.work.restore(...)``);
4. at every stage boundary ``check_scope(grant, ..., steps_so_far=<work done>,
   tokens_so_far=grant.work.tokens, stage_tokens=..., data_sha256=..., recheck_files=True,
   require_counts=True)``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ContractError
from ..recipe import Recipe
from .contract import (
    SIGNOFF_SENTENCE,
    Approver,
    Contract,
    Scope,
    TrustPolicy,
    VerifiedContract,
    VerifiedScope,
    check_bindings,
    check_run_id,
    config_home,
    contract_summary,
    draft_contract,
    dump_contract,
    ensure_local_key,
    format_time,
    load_contract,
    local_approver_name,
    normalise_signoff,
    parse_contract,
    read_limited,
    read_regular,
    resolve_trust_policy,
    sha256_hex,
    sign_contract,
    utc_now,
    valid_run_id,
    verify_contract,
    write_text_atomic,
)

AUDIT_SCHEMA_VERSION = 2
SIGNOFF_ATTEMPTS = 3
LEDGER_NAME = "consumed-contracts.jsonl"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------
# Audit trail
# ------------------------------------------------------------------------------------------


def _append_private(path: Path, line: bytes, *, fsync: bool = True) -> None:
    """Append one line to a file created 0600, never through a symlink (O_NOFOLLOW) and only to a
    regular file (checked on the descriptor)."""
    import stat as _stat

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK, 0o600)
    try:
        if not _stat.S_ISREG(os.fstat(fd).st_mode):
            raise ContractError(f"{path} is not a regular file; refusing to write to it.")
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        raise ContractError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    finally:
        os.close(fd)


class AuditLog:
    """Append-only JSON Lines, mode 0600; each record is flushed and fsynced (it is evidence).
    Records carry digests and ids, never a secret."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, event: str, result: str, **details: Any) -> dict[str, Any]:
        entry = {"schema_version": AUDIT_SCHEMA_VERSION, "timestamp": format_time(utc_now()), "event": event,
                 "result": result}
        entry.update({k: v for k, v in details.items() if v is not None})
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _append_private(self.path, (json.dumps(entry, sort_keys=False, default=str) + "\n").encode("utf-8"))
        except OSError as exc:  # ELOOP: a planted symlink
            raise ContractError(f"Cannot write the audit log {self.path}: {exc.strerror or exc}.") from None
        return entry

    def entries(self) -> list[dict[str, Any]]:
        return read_audit(self.path)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Complete records only: a torn last line (crash mid-write) is skipped. The file is read
    without following a symlink (a planted link is refused)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return []
    data = read_regular(path, "audit log")
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def audit_path(run_dir: Path) -> Path:
    return Path(run_dir) / "contract" / "audit.jsonl"


# ------------------------------------------------------------------------------------------
# Replay protection outside the run folder
# ------------------------------------------------------------------------------------------


def state_home() -> Path:
    """Where Scaler Wizard keeps per-user state: ``$SCALER_WIZARD_HOME/state`` (or the config folder's)."""
    return config_home() / "state"


class ReplayLedger:
    """Consumed contract ids, one JSON line each, in the user's state folder (0700 folder, 0600 file).

    ``consume`` holds an exclusive ``flock`` on a lock file while it reads the ledger and appends
    (fsynced), so two runs started at once with one contract cannot both pass. A contract id (and
    digest) authorises one run; only a resume of *that* run may use it again."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else state_home()
        self.path = self.folder / LEDGER_NAME
        self.lock_path = self.folder / (LEDGER_NAME + ".lock")

    def entries(self) -> list[dict[str, Any]]:
        if not (self.path.exists() or self.path.is_symlink()):
            return []
        out = []
        for line in read_regular(self.path, "replay ledger").decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def find(self, contract_id: str, contract_digest: str) -> dict[str, Any] | None:
        for rec in self.entries():
            if rec.get("contract_id") == contract_id or rec.get("contract_digest") == contract_digest:
                return rec
        return None

    def consume(self, contract_id: str, contract_digest: str, run_id: str, *, run_dir: Path, resuming: bool = False,
                self_approved: bool = False) -> dict[str, Any]:
        import fcntl

        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            previous = self.find(contract_id, contract_digest)
            if previous is not None:
                same_run = previous.get("run_id") == run_id and previous.get("run_dir") == str(Path(run_dir).resolve())
                if not (resuming and same_run):
                    raise ContractError(
                        f"Contract {contract_id} was already used at {previous.get('timestamp')} for run "
                        f"{previous.get('run_id')!r} ({previous.get('run_dir')}); a contract authorises one run, "
                        f"wherever it is started and even after its run folder is deleted (ledger {self.path}).",
                        hint="Draft and sign a new contract for a new run.",
                    )
            entry = {"timestamp": format_time(utc_now()), "contract_id": contract_id,
                     "contract_digest": contract_digest, "run_id": run_id, "run_dir": str(Path(run_dir).resolve()),
                     "resume": bool(resuming and previous is not None), "self_approved": self_approved}
            _append_private(self.path, (json.dumps(entry) + "\n").encode("utf-8"))
            return entry
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)


# ------------------------------------------------------------------------------------------
# The work budget: steps and tokens actually done
# ------------------------------------------------------------------------------------------


@dataclass
class WorkBudget:
    """Optimizer steps and training tokens *done* over the whole run. Monotonic: a rollback that
    resets the Trainer's ``global_step`` does not give steps back, nor does a gate extension.
    ``charge`` is called once per optimizer step (before the step is taken, so the step that would
    pass the approval never runs); ``to_dict``/``from_dict`` carry it across a resume."""

    max_steps: int
    max_tokens: int
    steps: int = 0
    tokens: int = 0

    def check(self, steps: int = 1, tokens: int = 0) -> None:
        if steps < 0 or tokens < 0:
            raise ContractError("Internal: negative work charged to the approval.")
        if self.steps + steps > self.max_steps:
            raise ContractError(
                f"Scope exceeded: {self.steps} optimizer steps done (rollbacks and extensions included); {steps} more "
                f"would pass the approved {self.max_steps}. The run stops here.",
                hint="Draft and sign a contract with a larger step budget.")
        if self.tokens + tokens > self.max_tokens:
            raise ContractError(
                f"Scope exceeded: {self.tokens} training tokens done; {tokens} more would pass the approved "
                f"{self.max_tokens}. The run stops here.")

    def charge(self, steps: int = 1, tokens: int = 0) -> None:
        self.check(steps, tokens)
        self.steps += steps
        self.tokens += tokens

    @property
    def steps_left(self) -> int:
        return self.max_steps - self.steps

    def to_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "tokens": self.tokens}

    def restore(self, data: dict[str, Any]) -> None:
        """Carry the counts of an interrupted run into its resume (never lowers them)."""
        self.steps = max(self.steps, int(data.get("steps", 0)))
        self.tokens = max(self.tokens, int(data.get("tokens", 0)))


# ------------------------------------------------------------------------------------------
# The grant and the calls the pipeline makes
# ------------------------------------------------------------------------------------------


@dataclass
class ApprovalGrant:
    """What ``authorize_run`` returns: the verified contract and what it takes to re-check it."""

    grant_id: str
    run_id: str
    run_dir: Path
    audit: AuditLog
    contract: Contract
    contract_digest: str
    scope: Scope
    approvers: tuple[str, ...]
    self_approved: bool
    issued_at: datetime
    expires_at: datetime
    recipe_digest: str
    recipe_dir: Path
    approvers_path: Path | None
    verified: VerifiedScope
    work: WorkBudget
    extra_approvers: tuple[Approver, ...] = ()
    checks: int = field(default=0)
    closed: str | None = None

    def read_verified(self, path: Path | str) -> bytes:
        """The approved bytes of ``path`` (see :class:`~.contract.VerifiedScope`)."""
        return self.verified.read_verified(path)

    def materialize(self, role: str, root: str, dest: Path | None = None) -> Path:
        return self.verified.materialize(role, root, dest)


def _echo_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ask_for_signoff(
    summary: str,
    *,
    ask: Callable[[str], str] = input,
    echo: Callable[[str], None] = _echo_stderr,
    attempts: int = SIGNOFF_ATTEMPTS,
) -> str:
    """Show the contract summary and ask the person to type the signoff sentence (exactly, up to a
    final full stop). Works with a real terminal or a pseudo-terminal; EOF or Ctrl-C cancels."""
    echo("This run needs a person to accept responsibility for it:\n")
    echo(summary)
    echo("")
    for attempt in range(1, attempts + 1):
        try:
            answer = ask(f'Type "{SIGNOFF_SENTENCE}" to approve (Ctrl-C to cancel): ')
        except (EOFError, KeyboardInterrupt):
            raise ContractError("Approval cancelled at the prompt; the run did not start.") from None
        if normalise_signoff(answer) == SIGNOFF_SENTENCE:
            return SIGNOFF_SENTENCE
        left = attempts - attempt
        if left:
            echo(f"That is not the sentence. {left} attempt(s) left.")
    raise ContractError(
        f"The signoff sentence was not typed after {attempts} attempts; the run did not start.",
        hint=f'Type exactly: {SIGNOFF_SENTENCE}',
    )


def planned_run_id(recipe: Recipe, contract_path: Path | None) -> str | None:
    """The run id the pipeline should create the run folder with: the contract's session_id when a
    contract is given (it names the one run it approves), else the recipe's run.run_id (None: the
    pipeline generates one). A contract that cannot be read gives the recipe's id, so that the
    rejection is recorded in that run's audit log by :func:`authorize_run`. The id is validated as
    a plain name before anything is written (a session_id such as ``../x`` or ``/tmp/x`` is refused
    by the contract parser, and checked again here)."""
    chosen = recipe.run.run_id
    if contract_path is not None:
        try:
            chosen = parse_contract(read_limited(Path(contract_path), "contract"), str(contract_path)).body.session_id
        except ContractError:
            chosen = recipe.run.run_id
    if chosen is not None:
        check_run_id(chosen, "run id (contract session_id or recipe run.run_id)")
    return chosen


def authorize_run(
    recipe: Recipe,
    recipe_dir: Path,
    *,
    run_id: str,
    run_dir: Path,
    contract_path: Path | None = None,
    self_approve: bool = False,
    interactive: bool = False,
    approvers_path: Path | None = None,
    signature_path: Path | None = None,
    max_wall_time_s: int = 24 * 3600,
    echo: Callable[[str], None] = _echo_stderr,
    ask: Callable[[str], str] = input,
    now: datetime | None = None,
    resuming: bool = False,
    ledger: ReplayLedger | None = None,
) -> ApprovalGrant:
    """The gate at run start (and at every resume: continuing a run needs a new approval). Call
    before the model is loaded and before any user code (probe files) runs; raises ContractError
    (exit 3).

    With ``contract_path``: the contract must verify under :func:`~.contract.resolve_trust_policy`
    and bind this run, recipe and every bound input file; it is then recorded as consumed in the
    user's replay ledger. Without it: ``interactive`` (a terminal) shows the summary and asks for
    the signoff sentence; ``self_approve`` (e.g. ``make demo``) approves without asking, printed
    and recorded. Both sign with the local key. Self-approval is off by default wherever there is
    someone else to ask: refused when a trust file says ``allow_self_approval: false``, when the
    user's approvers file names approvers and does not say ``true`` (only the user's own file can
    allow it; a project file can only turn it off), or when more than one signature is needed.
    With no approvers file (a fresh install, ``make demo``) the explicit flag or the typed sentence
    is accepted. ``max_wall_time_s`` only applies to contracts drafted here."""
    check_run_id(run_id)  # before anything is written
    if Path(run_dir).name != run_id:
        raise ContractError(f"Internal: run folder {run_dir} does not match run id {run_id!r}.")
    audit = AuditLog(audit_path(run_dir))
    ledger = ledger or ReplayLedger()
    try:
        if resuming:
            _refuse_completed_run(audit, run_id)
            audit.record("resume_requested", "pass", run_id=run_id)
        else:
            _refuse_used_run_dir(audit, run_id)
        trust = resolve_trust_policy(recipe_dir, approvers_path)
        echo(f"trusted approvers: {trust.describe_source()}")
        for note in trust.notes:
            echo(f"  note: {note}")
        extra: tuple[Approver, ...] = ()
        if contract_path is not None:
            contract = load_contract(Path(contract_path), signature_path)
            verified = verify_contract(contract, trust, now=now)
            check_bindings(contract.body, recipe, recipe_dir, run_id)
            self_approved = False
        elif interactive or self_approve:
            verified, extra = _self_approve(recipe, recipe_dir, run_id, trust, interactive=interactive, audit=audit,
                                            max_wall_time_s=max_wall_time_s, echo=echo, ask=ask, now=now)
            self_approved = True
        else:
            raise ContractError(
                "No contract for this run, and no one at a terminal to approve it: a run starts only with a signed "
                "contract or the explicit approval of the person running it.",
                hint="Pass --contract FILE (scaler-wizard contract draft/sign), run it from a terminal, or pass "
                "--self-approve to approve it yourself (recorded in the audit log).",
            )
        body = verified.contract.body
        ledger.consume(body.contract_id, verified.digest, run_id, run_dir=Path(run_dir), resuming=resuming,
                       self_approved=self_approved)
    except ContractError as exc:
        audit.record("contract_rejected", "fail", run_id=run_id, reason=str(exc),
                     contract=str(contract_path) if contract_path else None)
        raise
    return _issue_grant(verified, recipe, recipe_dir, run_id, Path(run_dir), audit, self_approved, trust,
                        approvers_path, extra, ledger, now)


def _refuse_used_run_dir(audit: AuditLog, run_id: str) -> None:
    for rec in audit.entries():
        if rec.get("event") in ("grant_issued", "token_issued", "run_closed"):
            raise ContractError(
                f"Run {run_id!r} was already authorised at {rec.get('timestamp')} (see {audit.path}); an approval "
                "covers one run and is not reused.",
                hint="Start a new run with a new contract.",
            )


def _refuse_completed_run(audit: AuditLog, run_id: str) -> None:
    for rec in audit.entries():
        if rec.get("event") == "run_closed" and rec.get("outcome") == "completed":
            raise ContractError(f"Run {run_id!r} completed at {rec.get('timestamp')}; it cannot be resumed.",
                                hint="Start a new run with a new contract.")


def _self_approve(recipe, recipe_dir, run_id, trust: TrustPolicy, *, interactive, audit, max_wall_time_s, echo, ask,
                  now) -> tuple[VerifiedContract, tuple[Approver, ...]]:
    if trust.allow_self_approval is False:
        raise ContractError(
            f"Self-approval is not allowed by the trust policy ({trust.describe_source()}): it says "
            "`allow_self_approval: false`, or your approvers file names approvers and does not say "
            "`allow_self_approval: true` (then runs need their signatures); only your own file can allow it.",
            hint="Draft a contract with `scaler-wizard contract draft RECIPE` and have it signed, or set "
            "allow_self_approval: true in your own approvers file.",
        )
    if trust.required_signatures > 1:
        raise ContractError(
            f"The trust policy in {trust.describe_source()} requires {trust.required_signatures} signatures per run; "
            "one person approving their own run cannot meet it.",
            hint="Collect signatures on a drafted contract instead.",
        )
    key, files = ensure_local_key()
    if files.key_id in trust.revoked:
        raise ContractError(f"Your local key {files.key_id} ({files.private}) is revoked in {trust.describe_source()}.")
    name = local_approver_name()
    contract = draft_contract(recipe, recipe_dir, authorized_by=[name], run_id=run_id,
                              max_wall_time_s=max_wall_time_s, now=now, max_validity=trust.max_validity)
    if interactive:
        ask_for_signoff(contract_summary(contract.body), ask=ask, echo=echo)
        mode = "interactive"
    else:
        echo(f"SELF-APPROVAL: {name} approves run {run_id!r} without a signed contract (--self-approve); "
             f"this is recorded in {audit.path}.")
        mode = "flag"
    audit.record("self_approval", "pass", run_id=run_id, approver=name, key_id=files.key_id, mode=mode,
                 public_key=files.public_key)
    signed = sign_contract(contract, key, name, now=now)
    local = Approver(name, key.public_key(), files.key_id)
    return verify_contract(signed, trust.with_extra([local]), now=now), (local,)


def _issue_grant(verified: VerifiedContract, recipe: Recipe, recipe_dir: Path, run_id: str, run_dir: Path,
                 audit: AuditLog, self_approved: bool, trust: TrustPolicy, approvers_path: Path | None,
                 extra: tuple[Approver, ...], ledger: ReplayLedger, now: datetime | None) -> ApprovalGrant:
    body = verified.contract.body
    contract_dir = run_dir / "contract"
    contract_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # a resumed run is approved again; every approval's contract is kept (contract.yaml, contract-2.yaml, ...)
    contract_file, n = contract_dir / "contract.yaml", 1
    while contract_file.exists() or contract_file.is_symlink():
        n += 1
        contract_file = contract_dir / f"contract-{n}.yaml"
    write_text_atomic(contract_file, dump_contract(verified.contract))
    issued = now or utc_now()
    grant_id = str(uuid.uuid4())
    scope = _scope_summary(body.scope)
    audit.record(
        "contract_verified", "pass", run_id=run_id, contract_id=body.contract_id, contract_digest=verified.digest,
        approvers=list(verified.approvers), key_ids=list(verified.key_ids), required_signatures=verified.required,
        signature_digests=[sha256_hex(s.signature.encode()) for s in verified.contract.signatures],
        self_approved=self_approved, trust_files=list(trust.sources), trust_notes=list(trust.notes) or None,
        scope=scope, bound_files=len(body.scope.files), approved_at=body.approved_at, expires_at=body.expires_at,
        rollback_plan=body.rollback_plan.model_dump(), replay_ledger=str(ledger.path),
    )
    expires = issued + timedelta(seconds=body.scope.max_wall_time_s)
    audit.record("grant_issued", "pass", run_id=run_id, grant_id=grant_id, contract_digest=verified.digest,
                 expires_at=format_time(expires), approvers=list(verified.approvers), self_approved=self_approved)
    return ApprovalGrant(
        grant_id=grant_id, run_id=run_id, run_dir=run_dir, audit=audit, contract=verified.contract,
        contract_digest=verified.digest, scope=body.scope, approvers=verified.approvers, self_approved=self_approved,
        issued_at=issued, expires_at=expires, recipe_digest=recipe.digest(), recipe_dir=Path(recipe_dir),
        approvers_path=Path(approvers_path) if approvers_path else None,
        verified=VerifiedScope.of(body.scope, recipe_dir),
        work=WorkBudget(body.scope.max_steps, body.scope.max_tokens), extra_approvers=extra,
    )


def _scope_summary(scope: Scope) -> dict[str, Any]:
    return {
        "model": scope.model.path, "model_sha256": scope.model.sha256, "data_sha256": scope.data.sha256,
        "strategy": scope.strategy, "context_method": scope.context_method, "base_length": scope.base_length,
        "target_length": scope.target_length, "stage_lengths": scope.stage_lengths, "max_steps": scope.max_steps,
        "max_tokens": scope.max_tokens, "max_wall_time_s": scope.max_wall_time_s,
        "files_sha256": sha256_hex(json.dumps([f.model_dump() for f in scope.files], sort_keys=True).encode()),
    }


def verify_grant(grant: ApprovalGrant, *, recipe: Recipe | None = None, now: datetime | None = None) -> None:
    """The grant still stands: not closed, within the approved wall time, the contract unchanged and
    still signed by keys the trust files (re-read now) trust and have not revoked."""
    now = now or utc_now()
    if grant.closed is not None:
        raise ContractError(f"The approval of run {grant.run_id!r} was closed ({grant.closed}); it is never reused.",
                            hint="Start a new run with a new contract.")
    for rec in grant.audit.entries():
        if rec.get("event") == "run_closed" and rec.get("grant_id") == grant.grant_id:
            raise ContractError(
                f"The approval of run {grant.run_id!r} ended at {rec.get('timestamp')}; an approval is good for one run "
                "and is never replayed.", hint="Start a new run under a new contract.")
    if now >= grant.expires_at:
        raise ContractError(
            f"The approval expired at {format_time(grant.expires_at)}: the approved maximum wall time "
            f"({grant.scope.max_wall_time_s} s) is used up.",
            hint="Resume under a new contract if the run should continue.")
    if grant.contract.digest() != grant.contract_digest or grant.contract.body.scope != grant.scope:
        raise ContractError("The approved contract held by the run was changed (digest differs); the run stops.")
    if grant.contract.body.session_id != grant.run_id:
        raise ContractError(f"The approval is for run {grant.contract.body.session_id!r}, not {grant.run_id!r}.")
    trust = resolve_trust_policy(grant.recipe_dir, grant.approvers_path).with_extra(grant.extra_approvers)
    verify_contract(grant.contract, trust, now=grant.issued_at)  # signatures, trust and revocation as of now
    if recipe is not None and recipe.digest() != grant.recipe_digest:
        raise ContractError(
            f"The recipe changed during the run (digest now {recipe.digest()[:16]}..., approved "
            f"{grant.recipe_digest[:16]}...).")


def check_scope(
    grant: ApprovalGrant,
    *,
    stage_length: int,
    steps_so_far: int,
    stage_steps: int,
    tokens_so_far: int | None = None,
    stage_tokens: int | None = None,
    recipe: Recipe | None = None,
    data_sha256: str | None = None,
    stage_index: int | None = None,
    now: datetime | None = None,
    recheck_files: bool = False,
    require_counts: bool = False,
) -> ApprovalGrant:
    """Re-check at a stage boundary, *before* the stage trains ``stage_steps`` more steps at
    ``stage_length`` tokens: the grant stands (:func:`verify_grant`), and the run stays within the
    approved context, stage lengths, steps, tokens, recipe and data. Steps and tokens count the
    larger of what the caller says and what ``grant.work`` has counted (work done, rollbacks
    included). ``recheck_files`` re-hashes every bound input file; ``require_counts`` makes token
    counts and the data hash mandatory (the pipeline passes both). Call it again before a gate
    extension re-trains a stage. Raises ContractError."""
    steps_done = max(steps_so_far, grant.work.steps)
    tokens_done = None if tokens_so_far is None and not grant.work.tokens else max(tokens_so_far or 0,
                                                                                    grant.work.tokens)
    try:
        if require_counts and (stage_tokens is None or data_sha256 is None):
            raise ContractError("Internal: the stage scope check needs the stage's token count and the data hash.")
        verify_grant(grant, recipe=recipe, now=now)
        _check_stage_within(grant.scope, stage_length, steps_done, stage_steps, tokens_done, stage_tokens,
                            data_sha256)
        if recheck_files:
            grant.verified.check_all()
    except ContractError as exc:
        grant.audit.record("scope_rejected", "fail", run_id=grant.run_id, stage=stage_index, stage_length=stage_length,
                           steps_so_far=steps_done, stage_steps=stage_steps, reason=str(exc))
        raise
    grant.checks += 1
    grant.audit.record("scope_checked", "pass", run_id=grant.run_id, stage=stage_index, stage_length=stage_length,
                       steps_so_far=steps_done, stage_steps=stage_steps, tokens_so_far=tokens_done,
                       stage_tokens=stage_tokens, grant_id=grant.grant_id, files_rechecked=recheck_files or None)
    return grant


def _check_stage_within(scope: Scope, stage_length: int, steps_so_far: int, stage_steps: int,
                        tokens_so_far: int | None, stage_tokens: int | None, data_sha256: str | None) -> None:
    if stage_length > scope.target_length:
        raise ContractError(
            f"Scope exceeded: the next stage trains at {stage_length} tokens, beyond the approved target context of "
            f"{scope.target_length}. The run stops here.",
            hint="Draft and sign a contract for the longer context.",
        )
    if stage_length not in scope.stage_lengths:
        raise ContractError(
            f"Scope exceeded: a stage at {stage_length} tokens is not one of the approved stages "
            f"{scope.stage_lengths}. The run stops here."
        )
    if steps_so_far + stage_steps > scope.max_steps:
        raise ContractError(
            f"Scope exceeded: {steps_so_far} steps done and {stage_steps} more planned would make "
            f"{steps_so_far + stage_steps}, over the approved {scope.max_steps} steps. The run stops here.",
            hint="Draft and sign a contract with a larger step budget.",
        )
    if stage_tokens is not None and (tokens_so_far or 0) + stage_tokens > scope.max_tokens:
        raise ContractError(
            f"Scope exceeded: {(tokens_so_far or 0) + stage_tokens} training tokens would pass the approved "
            f"{scope.max_tokens}. The run stops here."
        )
    if data_sha256 is not None and data_sha256 != scope.data.sha256:
        raise ContractError(
            f"Scope exceeded: the training data now hashes to {data_sha256[:16]}..., not the approved "
            f"{scope.data.sha256[:16]}.... The run stops here."
        )


def close_run(grant: ApprovalGrant, outcome: str) -> None:
    """Mark the run ended (completed, failed, halted): its grant is dead from now on."""
    grant.closed = outcome
    grant.audit.record("run_closed", "pass", run_id=grant.run_id, grant_id=grant.grant_id, outcome=outcome,
                       steps_done=grant.work.steps, tokens_done=grant.work.tokens)


def run_if_authorized(authorize: Callable[[], ApprovalGrant], body: Callable[[ApprovalGrant], T]) -> T:
    """``body`` (everything that loads a model, runs user code or trains) runs only with a grant in
    hand: when ``authorize`` raises, ``body`` is never called, so a rejected run takes 0 training
    steps and runs no probe code."""
    grant = authorize()
    if not isinstance(grant, ApprovalGrant):
        raise ContractError("Internal: the gate returned no approval grant; refusing to start.")
    return body(grant)


__all__ = [
    "ApprovalGrant", "AuditLog", "ReplayLedger", "WorkBudget", "ask_for_signoff", "audit_path", "authorize_run",
    "check_scope", "close_run", "planned_run_id", "read_audit", "run_if_authorized", "state_home", "valid_run_id",
    "verify_grant",
]
