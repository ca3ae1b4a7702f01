"""Human Contract Gatekeeper, part 2: the run-time checker (spec module 5, output side).

``authorize_run`` is called by the pipeline *before the model is loaded*. It verifies the
contract (``safety/contract.py``: signatures from trusted, unrevoked approvers, k-of-n, version,
signoff, validity window) and that it binds exactly this run, recipe, model and data; or, with
no contract, lets the person at the keyboard approve (typing the signoff sentence) or takes an
explicit self-approval flag. It then issues an **approval token** and returns an
:class:`ApprovalGrant`. ``check_scope`` re-verifies the token at every stage boundary and stops a
run that would go beyond the approved scope. Every result, pass or fail, goes to
``<run>/contract/audit.jsonl``.

The token is PASETO v4.public (Ed25519; pyseto). A PASETO version+purpose fixes the algorithm,
so there is no ``alg`` header to forge -- the class of bug behind JWT ``alg: none`` and
RS256/HS256 confusion (see docs REFERENCES: "Tokens"). Its claims bind the run id, the contract
digest and the recipe digest; its expiry is the approved maximum wall time, so the wall-time
limit is enforced by the token itself. The signing key is generated per run in memory and never
written; its public half is saved beside the token so that the audit trail can be checked later.
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

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ContractError
from ..recipe import Recipe
from .contract import (
    CLOCK_SKEW,
    SIGNOFF_SENTENCE,
    Approver,
    Contract,
    Scope,
    VerifiedContract,
    check_bindings,
    contract_summary,
    draft_contract,
    dump_contract,
    ensure_local_key,
    find_approvers_file,
    format_time,
    load_contract,
    load_trust_policy,
    local_approver_name,
    normalise_signoff,
    parse_contract,
    parse_time,
    public_key_text,
    read_limited,
    sign_contract,
    utc_now,
    verify_contract,
    write_text_atomic,
)

TOKEN_PREFIX = "v4.public."
TOKEN_ISSUER = "scaler-wizard/gatekeeper"
TOKEN_AUDIENCE = "scaler-wizard/pipeline"
TOKEN_IMPLICIT_ASSERTION = b"scaler-wizard/approval-token/v1"
MAX_TOKEN_CHARS = 16 * 1024
AUDIT_SCHEMA_VERSION = 1
SIGNOFF_ATTEMPTS = 3

T = TypeVar("T")


# ------------------------------------------------------------------------------------------
# Audit trail
# ------------------------------------------------------------------------------------------


class AuditLog:
    """Append-only JSON Lines; each record is flushed and fsynced (it is evidence)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, event: str, result: str, **details: Any) -> dict[str, Any]:
        entry = {"schema_version": AUDIT_SCHEMA_VERSION, "timestamp": format_time(utc_now()), "event": event,
                 "result": result}
        entry.update({k: v for k, v in details.items() if v is not None})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=False, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    def entries(self) -> list[dict[str, Any]]:
        return read_audit(self.path)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Complete records only: a torn last line (crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
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
# Approval token (PASETO v4.public)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenClaims:
    token_id: str
    run_id: str
    contract_digest: str
    recipe_digest: str
    issued_at: datetime
    not_before: datetime
    expires_at: datetime
    approvers: tuple[str, ...]
    self_approved: bool
    scope: dict[str, Any]


class TokenIssuer:
    """Issues approval tokens with an Ed25519 key that lives only in this process."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._key = private_key or Ed25519PrivateKey.generate()
        self.public_key: Ed25519PublicKey = self._key.public_key()

    def issue(self, *, run_id: str, contract_digest: str, recipe_digest: str, scope: dict[str, Any],
              approvers: tuple[str, ...], self_approved: bool, lifetime_s: int, now: datetime | None = None) -> str:
        import pyseto

        now = now or utc_now()
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": run_id,
            "jti": str(uuid.uuid4()),
            "iat": format_time(now),
            "nbf": format_time(now),
            "exp": format_time(now + timedelta(seconds=lifetime_s)),
            "run_id": run_id,
            "contract_digest": contract_digest,
            "recipe_digest": recipe_digest,
            "approvers": list(approvers),
            "self_approved": self_approved,
            "scope": scope,
        }
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        token = pyseto.encode(pyseto.Key.new(4, "public", pem), json.dumps(claims, sort_keys=True).encode(),
                              implicit_assertion=TOKEN_IMPLICIT_ASSERTION)
        return token.decode("ascii")


def _paseto_public_key(key: Ed25519PublicKey):
    import pyseto

    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pyseto.Key.new(4, "public", pem)


def _looks_like_jwt(token: str) -> str | None:
    """The ``alg`` of a JWS compact token, if that is what this is."""
    import base64

    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return str(header.get("alg")) if isinstance(header, dict) and "alg" in header else None


def _token_rejected(message: str, hint: str | None = None) -> ContractError:
    return ContractError(f"Approval token rejected: {message}", hint=hint)


def decode_token(token: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Signature and format only (PASETO v4.public, our implicit assertion, issuer, audience)."""
    import pyseto

    if not isinstance(token, str) or not token:
        raise _token_rejected("there is no token; the pipeline does not start without one.")
    if len(token) > MAX_TOKEN_CHARS:
        raise _token_rejected(f"it is {len(token)} characters long, over the {MAX_TOKEN_CHARS} limit.")
    if not token.startswith(TOKEN_PREFIX):
        alg = _looks_like_jwt(token)
        if alg is not None:
            raise _token_rejected(
                f"it is a JWT with alg={alg!r}. Only PASETO v4.public tokens (Ed25519, no algorithm field to "
                "negotiate) are accepted, so 'alg: none' and algorithm-confusion tokens never reach a check."
            )
        raise _token_rejected(f"it does not start with {TOKEN_PREFIX!r}; only PASETO v4.public tokens are accepted.")
    try:
        decoded = pyseto.decode(_paseto_public_key(public_key), token, implicit_assertion=TOKEN_IMPLICIT_ASSERTION)
    except (pyseto.PysetoError, ValueError, TypeError):  # VerifyError/DecodeError/... for each malformation
        raise _token_rejected(
            "its signature does not verify: the token was modified or was not issued by this run's gatekeeper."
        ) from None
    try:
        claims = json.loads(decoded.payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _token_rejected("its payload is not JSON.") from None
    if not isinstance(claims, dict) or claims.get("iss") != TOKEN_ISSUER or claims.get("aud") != TOKEN_AUDIENCE:
        raise _token_rejected("it was not issued by the Scaler Wizard gatekeeper for the pipeline (iss/aud).")
    return claims


def verify_token(
    token: str,
    public_key: Ed25519PublicKey,
    *,
    run_id: str,
    contract_digest: str | None = None,
    recipe_digest: str | None = None,
    audit: AuditLog | None = None,
    now: datetime | None = None,
) -> TokenClaims:
    """A valid token for *this* run: signature, run id, digests, validity time, not closed (replay)."""
    claims = decode_token(token, public_key)
    now = now or utc_now()
    try:
        parsed = TokenClaims(
            token_id=str(claims["jti"]), run_id=str(claims["run_id"]), contract_digest=str(claims["contract_digest"]),
            recipe_digest=str(claims["recipe_digest"]), issued_at=parse_time(claims["iat"]),
            not_before=parse_time(claims["nbf"]), expires_at=parse_time(claims["exp"]),
            approvers=tuple(claims["approvers"]), self_approved=bool(claims["self_approved"]),
            scope=dict(claims["scope"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _token_rejected(f"its claims are incomplete ({exc}).") from None
    if parsed.run_id != run_id or claims.get("sub") != run_id:
        raise _token_rejected(f"it was issued for run {parsed.run_id!r}, not for this run {run_id!r}.")
    if contract_digest is not None and parsed.contract_digest != contract_digest:
        raise _token_rejected("it is bound to another contract (contract digest differs).")
    if recipe_digest is not None and parsed.recipe_digest != recipe_digest:
        raise _token_rejected(
            f"it is bound to recipe {parsed.recipe_digest[:16]}..., but the recipe is now {recipe_digest[:16]}...: "
            "the recipe changed during the run."
        )
    if now + CLOCK_SKEW < parsed.not_before:
        raise _token_rejected(f"it is not valid before {format_time(parsed.not_before)}.")
    if now >= parsed.expires_at:
        raise _token_rejected(
            f"it expired at {format_time(parsed.expires_at)}: the approved maximum wall time "
            f"({parsed.scope.get('max_wall_time_s')} s) is used up.",
            hint="Resume under a new contract if the run should continue.",
        )
    if audit is not None:
        for rec in audit.entries():
            if rec.get("event") == "run_closed" and rec.get("token_id") == parsed.token_id:
                raise _token_rejected(
                    f"it belongs to run {run_id!r}, which ended at {rec.get('timestamp')}; a token is good for one "
                    "run and is never replayed.",
                    hint="Start a new run under a new contract.",
                )
    return parsed


# ------------------------------------------------------------------------------------------
# The grant and the two calls the pipeline makes
# ------------------------------------------------------------------------------------------


@dataclass
class ApprovalGrant:
    """What ``authorize_run`` returns: the token and what it takes to re-check it."""

    token: str
    public_key: Ed25519PublicKey
    claims: TokenClaims
    scope: Scope
    run_id: str
    run_dir: Path
    audit: AuditLog
    contract: Contract
    checks: int = field(default=0)

    @property
    def approvers(self) -> tuple[str, ...]:
        return self.claims.approvers


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
    rejection is recorded in that run's audit log by :func:`authorize_run`."""
    if contract_path is not None:
        try:
            return parse_contract(read_limited(Path(contract_path), "contract"), str(contract_path)).body.session_id
        except ContractError:
            return recipe.run.run_id
    return recipe.run.run_id


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
) -> ApprovalGrant:
    """The gate at run start (and at every resume: continuing a run needs a new approval). Call before the model is loaded; raises ContractError (exit 3).

    With ``contract_path``: the contract must verify and bind this run/recipe/model/data.
    Without it: ``interactive`` (a terminal) shows the summary and asks for the signoff sentence;
    ``self_approve`` (e.g. ``make demo``) approves without asking, printed and recorded. Both
    sign with the local key and need a trust policy that allows self-approval with k = 1.
    ``max_wall_time_s`` only applies to contracts drafted here (a signed one carries its own).
    """
    audit = AuditLog(audit_path(run_dir))
    try:
        if resuming:
            _refuse_completed_run(audit, run_id)
            audit.record("resume_requested", "pass", run_id=run_id)
        else:
            _refuse_used_run_dir(audit, run_id)
        trust_file = find_approvers_file(recipe_dir, approvers_path)
        trust = load_trust_policy(trust_file)
        if contract_path is not None:
            contract = load_contract(Path(contract_path), signature_path)
            verified = verify_contract(contract, trust, now=now)
            check_bindings(contract.body, recipe, recipe_dir, run_id)
            self_approved = False
        elif interactive or self_approve:
            verified = _self_approve(recipe, recipe_dir, run_id, trust, interactive=interactive, audit=audit,
                                     max_wall_time_s=max_wall_time_s, echo=echo, ask=ask, now=now)
            self_approved = True
        else:
            raise ContractError(
                "No contract for this run, and no one at a terminal to approve it: a run starts only with a signed "
                "contract or the explicit approval of the person running it.",
                hint="Pass --contract FILE (scaler-wizard contract draft/sign), run it from a terminal, or pass "
                "--self-approve to approve it yourself (recorded in the audit log).",
            )
    except ContractError as exc:
        audit.record("contract_rejected", "fail", run_id=run_id, reason=str(exc),
                     contract=str(contract_path) if contract_path else None)
        raise
    return _issue_grant(verified, recipe, run_id, Path(run_dir), audit, self_approved, trust_file, now)


def _refuse_used_run_dir(audit: AuditLog, run_id: str) -> None:
    for rec in audit.entries():
        if rec.get("event") in ("token_issued", "run_closed"):
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


def _self_approve(recipe, recipe_dir, run_id, trust, *, interactive, audit, max_wall_time_s, echo, ask,
                  now) -> VerifiedContract:
    if not trust.allow_self_approval:
        raise ContractError(
            f"Self-approval is not allowed by the trust policy in {trust.describe_source()}; this project needs a "
            "contract signed by its approvers.",
            hint="Draft one with `scaler-wizard contract draft RECIPE` and have it signed.",
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
                              max_wall_time_s=max_wall_time_s, now=now)
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
    return verify_contract(signed, trust.with_extra([local]), now=now)


def _issue_grant(verified: VerifiedContract, recipe: Recipe, run_id: str, run_dir: Path, audit: AuditLog,
                 self_approved: bool, trust_file: Path | None, now: datetime | None) -> ApprovalGrant:
    body = verified.contract.body
    contract_dir = run_dir / "contract"
    # a resumed run is approved again; every approval's contract is kept (contract.yaml, contract-2.yaml, ...)
    contract_file, n = contract_dir / "contract.yaml", 1
    while contract_file.exists():
        n += 1
        contract_file = contract_dir / f"contract-{n}.yaml"
    write_text_atomic(contract_file, dump_contract(verified.contract))
    audit.record(
        "contract_verified", "pass", run_id=run_id, contract_id=body.contract_id, contract_digest=verified.digest,
        approvers=list(verified.approvers), key_ids=list(verified.key_ids), required_signatures=verified.required,
        signatures=[s.model_dump(mode="json") for s in verified.contract.signatures], self_approved=self_approved,
        trust_file=str(trust_file) if trust_file else None, scope=_scope_summary(body.scope),
        approved_at=body.approved_at, expires_at=body.expires_at, rollback_plan=body.rollback_plan.model_dump(),
    )
    issuer = TokenIssuer()
    scope = _scope_summary(body.scope)
    token = issuer.issue(run_id=run_id, contract_digest=verified.digest, recipe_digest=recipe.digest(), scope=scope,
                         approvers=verified.approvers, self_approved=self_approved,
                         lifetime_s=body.scope.max_wall_time_s, now=now)
    claims = verify_token(token, issuer.public_key, run_id=run_id, now=now)
    write_text_atomic(contract_dir / "approval_token", token + "\n")
    os.chmod(contract_dir / "approval_token", 0o600)
    write_text_atomic(contract_dir / "token_key.pub", public_key_text(issuer.public_key) + " gatekeeper\n")
    audit.record("token_issued", "pass", run_id=run_id, token_id=claims.token_id, token=token,
                 token_public_key=public_key_text(issuer.public_key), expires_at=format_time(claims.expires_at),
                 approvers=list(claims.approvers), self_approved=self_approved)
    return ApprovalGrant(token, issuer.public_key, claims, body.scope, run_id, run_dir, audit, verified.contract)


def _scope_summary(scope: Scope) -> dict[str, Any]:
    return {
        "model": scope.model.path, "model_sha256": scope.model.sha256, "data_sha256": scope.data.sha256,
        "strategy": scope.strategy, "context_method": scope.context_method, "base_length": scope.base_length,
        "target_length": scope.target_length, "stage_lengths": scope.stage_lengths, "max_steps": scope.max_steps,
        "max_tokens": scope.max_tokens, "max_wall_time_s": scope.max_wall_time_s,
    }


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
) -> TokenClaims:
    """Re-check at a stage boundary, *before* the stage trains ``stage_steps`` more steps at
    ``stage_length`` tokens: the token is still valid for this run and unexpired (wall time), and
    the run stays within the approved context, stage lengths, steps, tokens, recipe and data.
    Call it again before a gate extension re-trains a stage. Raises ContractError."""
    try:
        claims = verify_token(grant.token, grant.public_key, run_id=grant.run_id,
                              contract_digest=grant.claims.contract_digest,
                              recipe_digest=recipe.digest() if recipe is not None else None,
                              audit=grant.audit, now=now)
        _check_stage_within(grant.scope, stage_length, steps_so_far, stage_steps, tokens_so_far, stage_tokens,
                            data_sha256)
    except ContractError as exc:
        grant.audit.record("scope_rejected", "fail", run_id=grant.run_id, stage=stage_index, stage_length=stage_length,
                           steps_so_far=steps_so_far, stage_steps=stage_steps, reason=str(exc))
        raise
    grant.checks += 1
    grant.audit.record("scope_checked", "pass", run_id=grant.run_id, stage=stage_index, stage_length=stage_length,
                       steps_so_far=steps_so_far, stage_steps=stage_steps, token_id=claims.token_id)
    return claims


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
    if tokens_so_far is not None and stage_tokens is not None and tokens_so_far + stage_tokens > scope.max_tokens:
        raise ContractError(
            f"Scope exceeded: {tokens_so_far + stage_tokens} training tokens would pass the approved "
            f"{scope.max_tokens}. The run stops here."
        )
    if data_sha256 is not None and data_sha256 != scope.data.sha256:
        raise ContractError(
            f"Scope exceeded: the training data now hashes to {data_sha256[:16]}..., not the approved "
            f"{scope.data.sha256[:16]}.... The run stops here."
        )


def close_run(grant: ApprovalGrant, outcome: str) -> None:
    """Mark the run ended (completed, failed, halted): its token is dead from now on."""
    grant.audit.record("run_closed", "pass", run_id=grant.run_id, token_id=grant.claims.token_id, outcome=outcome)


def run_if_authorized(authorize: Callable[[], ApprovalGrant], body: Callable[[ApprovalGrant], T]) -> T:
    """``body`` (everything that loads a model or trains) runs only with a grant in hand: when
    ``authorize`` raises, ``body`` is never called, so a rejected run takes 0 training steps.
    The tampering battery drives every rejection through this."""
    grant = authorize()
    if not isinstance(grant, ApprovalGrant):
        raise ContractError("Internal: the gate returned no approval grant; refusing to start.")
    return body(grant)


__all__ = [
    "ApprovalGrant", "AuditLog", "TokenClaims", "TokenIssuer", "ask_for_signoff", "audit_path", "authorize_run",
    "check_scope", "close_run", "decode_token", "planned_run_id", "read_audit", "run_if_authorized", "verify_token",
]
