"""`scaler-wizard contract ...`: keys, drafting, signing, verifying and reading the audit trail.

Register with ``app.add_typer(contract_app, name="contract")``. Commands raise ContractError;
``cli.main`` turns it into a one-paragraph message and exit code 3.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import typer
from rich.console import Console

from ..errors import ContractError
from .contract import (
    PASSPHRASE_ENV,
    RollbackPlan,
    add_trusted_approver,
    check_bindings,
    config_home,
    contract_summary,
    detached_path,
    draft_contract,
    dump_contract,
    dump_detached,
    find_approvers_file,
    generate_keypair,
    load_contract,
    load_private_key,
    local_approver_name,
    parse_time,
    private_key_is_encrypted,
    resolve_trust_policy,
    revoke_key,
    sign_contract,
    verify_contract,
    write_text_atomic,
)
from .gatekeeper import audit_path, read_audit

contract_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Signed human contracts: no run starts without one (keygen, draft, sign, verify, audit).",
)
console = Console(soft_wrap=True)


def _user_approvers_file(explicit: Path | None) -> Path:
    return find_approvers_file(None, explicit) or (config_home() / "approvers.yaml")


@contract_app.command()
def keygen(
    name: str = typer.Option(..., "--name", help="approver name, e.g. alice"),
    out: Path | None = typer.Option(None, "--out", help="folder for NAME.key/NAME.pub (default: config folder/keys)"),
    passphrase: bool = typer.Option(False, "--passphrase", help="encrypt the private key; asks for the passphrase"),
    trust: bool = typer.Option(False, "--trust", help="also add the public key to the trusted approvers file"),
    approvers: Path | None = typer.Option(None, "--approvers", help="trusted approvers file for --trust"),
) -> None:
    """Create an Ed25519 key pair (private key mode 0600)."""
    secret = None
    if passphrase:
        secret = os.environ.get(PASSPHRASE_ENV) or typer.prompt("Passphrase", hide_input=True,
                                                                 confirmation_prompt=True)
    files = generate_keypair(name, out or (config_home() / "keys"), secret)
    console.print(f"private key  {files.private}  (mode 0600{', encrypted' if secret else ''})")
    console.print(f"public key   {files.public}")
    console.print(f"key id       {files.key_id}")
    if trust:
        path = _user_approvers_file(approvers)
        add_trusted_approver(path, name, files.public_key)
        console.print(f"trusted      {name} added to {path}")
    else:
        console.print("Give the .pub file to whoever keeps the trusted approvers file "
                      "(`scaler-wizard contract trust NAME FILE.pub`).")


@contract_app.command()
def draft(
    recipe: Path = typer.Argument(..., help="YAML recipe the contract approves"),
    out: Path | None = typer.Option(None, "--out", "-o", help="contract file (default: <recipe>.contract.yaml)"),
    approver: list[str] | None = typer.Option(None, "--approver", help="a person who signs (repeat for k-of-n)"),
    required: int = typer.Option(1, "--required", min=1, help="signatures needed (k of k-of-n)"),
    valid_days: float = typer.Option(7.0, "--valid-days", min=0.001, help="validity from now (or --not-before)"),
    not_before: str | None = typer.Option(None, "--not-before", help="RFC 3339 UTC start of validity"),
    max_wall_hours: float = typer.Option(24.0, "--max-wall-hours", min=0.001, help="approved wall time of the run"),
    run_id: str | None = typer.Option(None, "--run-id", help="the run it approves (default: recipe run_id or generated)"),
    rollback: str = typer.Option("last_passed_stage", "--rollback", help="last_passed_stage | base_model | snapshot"),
    snapshot: str | None = typer.Option(None, "--snapshot", help="snapshot to roll back to (with --rollback snapshot)"),
) -> None:
    """Fill in an unsigned contract from a recipe (model and data are hashed now)."""
    from ..recipe import load_recipe

    parsed, folder = load_recipe(str(recipe))
    if rollback not in ("last_passed_stage", "base_model", "snapshot"):
        raise ContractError(f"--rollback {rollback!r} is not one of last_passed_stage, base_model, snapshot.")
    start = None
    if not_before:
        try:
            start = parse_time(not_before)
        except ValueError:
            raise ContractError(f"--not-before {not_before!r} is not an RFC 3339 time (2025-01-31T12:00:00Z).") from None
    trust = resolve_trust_policy(folder)
    if not valid_days <= trust.max_validity_days:  # also NaN and values timedelta cannot hold
        raise ContractError(
            f"--valid-days {valid_days:g} is longer than the maximum of {trust.max_validity_days} days set by the "
            f"trust policy ({trust.describe_source()}); an approval is for a run soon, not for years.",
            hint="Pass a shorter --valid-days (max_validity_days in your approvers file sets the limit).")
    if not 0 < max_wall_hours <= 24 * 366:
        raise ContractError(f"--max-wall-hours {max_wall_hours:g} must be between 0 and {24 * 366}.")
    contract = draft_contract(
        parsed, folder, authorized_by=list(approver or [local_approver_name()]), run_id=run_id,
        required_signatures=required, valid_for=timedelta(days=valid_days), not_before=start,
        max_validity=trust.max_validity,
        max_wall_time_s=int(max_wall_hours * 3600), rollback=RollbackPlan(to=rollback, snapshot=snapshot),
    )
    target = out or recipe.with_name(recipe.stem + ".contract.yaml")
    if target.exists():
        raise ContractError(f"{target} already exists; a drafted contract is not overwritten.", hint="Pass --out.")
    write_text_atomic(target, dump_contract(contract))
    console.print(contract_summary(contract.body))
    console.print(f"\ncontract     {target}  (digest {contract.digest()[:16]}...)")
    console.print(f"next         scaler-wizard contract sign {target} --key KEY")


@contract_app.command()
def sign(
    contract: Path = typer.Argument(..., help="contract file"),
    key: Path = typer.Option(..., "--key", help="your private key (NAME.key)"),
    name: str | None = typer.Option(None, "--name", help="your approver name (default: the key file's name)"),
    detached: bool = typer.Option(False, "--detached", help="write the signature to CONTRACT.sig instead"),
) -> None:
    """Sign the canonical form of a contract (embedded, or detached in CONTRACT.sig)."""
    passphrase = None
    if private_key_is_encrypted(key) and not os.environ.get(PASSPHRASE_ENV):
        passphrase = typer.prompt("Passphrase", hide_input=True)
    private = load_private_key(key, passphrase)
    approver = name or (local_approver_name() if key.stem == "local" else key.stem)
    doc = load_contract(contract)
    signed = sign_contract(doc, private, approver)
    if detached:
        write_text_atomic(detached_path(contract), dump_detached(signed))
        where = detached_path(contract)
    else:
        write_text_atomic(contract, dump_contract(signed))
        where = contract
    console.print(f"signed by {approver} (key {signed.signatures[-1].key_id}) -> {where}")
    console.print(f"{len(signed.signatures)} of {doc.body.required_signatures} required signature(s) present")


@contract_app.command()
def verify(
    contract: Path = typer.Argument(..., help="contract file"),
    recipe: Path | None = typer.Option(None, "--recipe", help="also check the recipe, model and data still match"),
    run_id: str | None = typer.Option(None, "--run-id", help="with --recipe: the run (default: the contract's)"),
    approvers: Path | None = typer.Option(None, "--approvers", help="trusted approvers file"),
    signature: Path | None = typer.Option(None, "--signature", help="detached signature file"),
) -> None:
    """Check signatures, trust, k-of-n, signoff and validity (and with --recipe, the bindings)."""
    folder = None
    parsed = None
    if recipe is not None:
        from ..recipe import load_recipe

        parsed, folder = load_recipe(str(recipe))
    # the same resolution as `scaler-wizard run`: the user's file, restricted by the recipe's project file
    trust = resolve_trust_policy(folder if folder is not None else _project_dir_of(contract), approvers)
    console.print(f"trusted approvers: {trust.describe_source()}", highlight=False, markup=False)
    for note in trust.notes:
        console.print(f"  note: {note}", highlight=False, markup=False)
    doc = load_contract(contract, signature)
    verified = verify_contract(doc, trust)
    if parsed is not None:
        check_bindings(doc.body, parsed, folder, run_id or doc.body.session_id)
    console.print(f"[green]valid[/] {contract}: signed by {', '.join(verified.approvers)} "
                  f"({len(verified.approvers)} of {verified.required} required)")
    console.print(f"contract digest {verified.digest}")
    if parsed is not None:
        console.print("recipe, model and data match the contract")


def _project_dir_of(contract: Path) -> Path | None:
    """Without --recipe, the project whose restrictions apply is the contract's own folder (a run
    applies the recipe folder's; pass --recipe to check exactly what `run` will)."""
    return Path(contract).parent


@contract_app.command()
def audit(run: Path = typer.Argument(..., help="run directory (runs/<run-id>)")) -> None:
    """Who approved what, when, for which scope; every verification result of the run."""
    path = audit_path(run)
    records = read_audit(path)
    if not records:
        raise ContractError(f"No audit records in {path}: this run never reached the contract gate.")
    console.print(f"[bold]contract audit[/] {run} ({len(records)} record(s))")
    for rec in records:
        who = ", ".join(rec.get("approvers") or []) or rec.get("approver") or ""
        mark = "[green]pass[/]" if rec.get("result") == "pass" else "[red]FAIL[/]"
        console.print(f"{rec.get('timestamp', '')}  {mark}  {rec.get('event', '')}"
                      f"{'  by ' + who if who else ''}", highlight=False)
        detail = _detail(rec)
        if detail:
            console.print(f"    {detail}", highlight=False, markup=False)


def _detail(rec: dict) -> str:
    event = rec.get("event")
    if rec.get("result") == "fail":
        return str(rec.get("reason", ""))
    if event == "contract_verified":
        s = rec.get("scope") or {}
        return (f"contract {str(rec.get('contract_digest', ''))[:16]}...; {s.get('model')}; context "
                f"{s.get('base_length')} -> {s.get('target_length')} ({s.get('context_method')}), "
                f"<= {s.get('max_steps')} steps, <= {s.get('max_wall_time_s')} s; valid to {rec.get('expires_at')}"
                f"{'; SELF-APPROVED' if rec.get('self_approved') else ''}")
    if event == "self_approval":
        return f"self-approval ({rec.get('mode')}), key {rec.get('key_id')}"
    if event == "token_issued":  # audit logs written before issue 14
        return f"token {rec.get('token_id')} expires {rec.get('expires_at')}"
    if event == "grant_issued":
        return f"grant {rec.get('grant_id')} (contract {str(rec.get('contract_digest', ''))[:16]}...) expires {rec.get('expires_at')}"
    if event == "scope_checked":
        return f"stage {rec.get('stage')} @ {rec.get('stage_length')}: {rec.get('steps_so_far')} + {rec.get('stage_steps')} steps"
    if event == "run_closed":
        return f"run {rec.get('outcome')}; grant {rec.get('grant_id') or rec.get('token_id')} closed"
    return ""


@contract_app.command()
def trust(
    name: str = typer.Argument(..., help="approver name"),
    public_key: Path = typer.Argument(..., help="their NAME.pub file"),
    approvers: Path | None = typer.Option(None, "--approvers", help="trusted approvers file to edit"),
) -> None:
    """Add a public key to the trusted approvers file."""
    path = _user_approvers_file(approvers)
    approver = add_trusted_approver(path, name, public_key.read_text(encoding="utf-8"))
    console.print(f"trusted {approver.name} (key {approver.key_id}) in {path}")


@contract_app.command()
def revoke(
    key_id: str = typer.Argument(..., help="key id (32 hex digits)"),
    reason: str = typer.Option("", "--reason"),
    approvers: Path | None = typer.Option(None, "--approvers", help="trusted approvers file to edit"),
) -> None:
    """Revoke a key: contracts it signed are refused from now on."""
    path = _user_approvers_file(approvers)
    revoke_key(path, key_id, reason)
    console.print(f"revoked {key_id} in {path}")


__all__ = ["contract_app"]
