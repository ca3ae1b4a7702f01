"""Human Contract Gatekeeper, part 1: the signed contract (spec module 5, input side).

A scaling run spends hours of someone's hardware and can ship a degraded model, so a named person
accepts responsibility for it before it starts. This module holds everything that concerns the
*document*: approver keys, the trusted-approvers file (with revocation and the k-of-n policy),
the contract model, its canonical serialisation, signing and verification, and the identities
(content hashes) of the model and the data it binds. The run-time half (approval token, scope
checks at stage boundaries, audit log) is ``safety/gatekeeper.py``.

Choices, and why:

* **Ed25519** signatures (``cryptography``): one algorithm, nothing to negotiate, deterministic
  signatures, 32-byte keys that fit on one line of YAML (RFC 8032).
* **Canonical serialisation**: the YAML is parsed into the typed model and the *model* is
  serialised as JSON with sorted keys, no whitespace and UTF-8 (the JSON subset of RFC 8785's
  idea; no floats appear in a contract, so number formatting cannot differ). Whitespace,
  comments or quoting style in the YAML therefore never matter; every value does.
* A signature signs a small statement -- domain string, contract digest, approver name, key id,
  time -- so that every field of a signature block except the signature bytes is itself signed.
* YAML is read with a loader that refuses aliases (billion-laughs documents) and duplicate keys
  (two readers could disagree on which value counts), after a size limit.
* Every rejection is a :class:`~scaler_wizard.errors.ContractError` (exit code 3) whose message
  is one paragraph: what is wrong, in which file or field, and what to do.
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import json
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import ContractError
from ..recipe import Recipe, resolve_path

CONTRACT_VERSION = 2
SUPPORTED_CONTRACT_VERSIONS = (2,)
# version 1 bound only config.json and *.safetensors: tokenizer, chat templates, teacher, offline cache
# and probe code could change after signing (issue 14). Its contracts are refused with that reason.
LEGACY_CONTRACT_VERSIONS = (1,)
APPROVERS_VERSION = 1
SIGNOFF_SENTENCE = "I accept responsibility for this run"
MAX_DOCUMENT_BYTES = 64 * 1024
CLOCK_SKEW = timedelta(seconds=60)
SIGNATURE_CONTEXT = "scaler-wizard/contract-signature/v1"
PUBLIC_KEY_PREFIX = "ed25519:"

HOME_ENV = "SCALER_WIZARD_HOME"
APPROVERS_ENV = "SCALER_WIZARD_APPROVERS"
PASSPHRASE_ENV = "SCALER_WIZARD_KEY_PASSPHRASE"
PROJECT_APPROVERS_FILE = Path(".scaler-wizard") / "approvers.yaml"
LOCAL_KEY_NAME = "local"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
# a run id / session_id is one plain folder name: never a path, never '..'
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MAX_VALIDITY_DAYS = 90
MAX_VALIDITY_DAYS_LIMIT = 3650
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------
# Small helpers: time, hashing, canonical JSON, the config folder
# ------------------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def format_time(t: datetime) -> str:
    """RFC 3339, UTC, whole seconds: the one spelling of a time in a contract."""
    if t.tzinfo is None:
        raise ValueError("time must carry a time zone")
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)


def _normalise_time(value: Any) -> Any:
    """YAML turns unquoted timestamps into datetimes; both spellings become one canonical string."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("a time needs a time zone (write it in UTC with a trailing Z)")
        return format_time(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("must be an RFC 3339 time such as 2025-01-31T12:00:00Z") from None
        if parsed.tzinfo is None:
            raise ValueError("a time needs a time zone (write it in UTC with a trailing Z)")
        return format_time(parsed)
    return value


Timestamp = Annotated[str, BeforeValidator(_normalise_time)]


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8, no NaN: one byte string per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_regular(path: Path | str, what: str = "file") -> int:
    """A read-only descriptor of a *regular file*: the last path component is never followed
    (``O_NOFOLLOW``: a symlink is refused), opening never blocks (``O_NONBLOCK``: a FIFO cannot
    hang us), and the type is checked on the opened descriptor (``fstat``), so what is checked is
    what is read. Directories, FIFOs, sockets and devices are refused. Raises ContractError."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ContractError(f"The {what} {path} does not exist.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP or (os.path.islink(path)):
            raise ContractError(
                f"The {what} {path} is a symbolic link; it is refused (a link can be re-pointed after it was "
                "checked). Use the real file.") from None
        raise ContractError(f"The {what} {path} cannot be opened: {exc.strerror or exc}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ContractError(f"The {what} {path} is {kind}; only regular files are read.")
        if getattr(os, "O_NONBLOCK", 0):  # a regular file: back to ordinary blocking reads
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, what: str = "file", limit: int | None = None) -> bytes:
    """The whole content of a regular file, read once through :func:`open_regular`."""
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if limit is not None and size > limit:
            raise ContractError(
                f"The {what} {path} is {size} bytes, over the {limit}-byte limit for contract documents; "
                "it is refused unread. A contract is a page of YAML: regenerate it with `scaler-wizard contract draft`."
            )
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:  # grew between fstat and read
        raise ContractError(f"The {what} {path} is over the {limit}-byte limit; it is refused unread.")
    return data


def sha256_file(path: Path, what: str = "file") -> str:
    return hash_regular(path, what)[1]


def hash_regular(path: Path | str, what: str = "file") -> tuple[int, str]:
    """(bytes, sha256) of a regular file, hashed while reading one descriptor (no symlinks, no FIFOs)."""
    h = hashlib.sha256()
    n = 0
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def config_home() -> Path:
    """The user's Scaler Wizard folder: $SCALER_WIZARD_HOME, else $XDG_CONFIG_HOME/scaler-wizard."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "scaler-wizard"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64url: only the one canonical spelling of the bytes is accepted (the unused low
    bits of the last character must be zero), so a signature cannot be re-spelt."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def check_name(name: str, what: str = "approver name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ContractError(
            f"The {what} {name!r} is not usable: use 1-64 letters, digits, '.', '_', '@', '+' or '-', "
            "starting with a letter or digit."
        )
    return name


def valid_run_id(value: Any) -> bool:
    return isinstance(value, str) and bool(RUN_ID_RE.match(value)) and ".." not in value


def check_run_id(value: Any, what: str = "run id") -> str:
    """A run id is one folder name under the runs folder: never a path, never '..'."""
    if not valid_run_id(value):
        raise ContractError(
            f"The {what} {str(value)[:80]!r} is not a plain run name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or path separators. Nothing was written.")
    return value


# ------------------------------------------------------------------------------------------
# Safe YAML: size limit, no aliases, no duplicate keys
# ------------------------------------------------------------------------------------------


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when available: fast
    """A SafeLoader that refuses aliases (exponential expansion: every node is constructed once) and
    duplicate or non-scalar mapping keys (two readers could disagree on which value counts)."""

    def construct_object(self, node, deep=False):  # type: ignore[override]
        if node in self.constructed_objects or node in self.recursive_objects:
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed in this document", node.start_mark
            )
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain names", key_node.start_mark
                )
            if key_node.tag == "tag:yaml.org,2002:merge" or key_node.value == "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not allowed in this document: every value must be written "
                    "out where it applies", key_node.start_mark
                )
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(ident)
        return super().construct_mapping(node, deep=deep)


def read_limited(path: Path, what: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a small document: a regular file (no symlink, FIFO, device or directory), refused
    unread when larger than ``limit``."""
    return read_regular(Path(path), what, limit)


def _refuse_anchors(text: str) -> None:
    """Anchors (&name) and aliases (*name) are refused at the event level, before any object is
    built: a signed value must be written where it applies, never shared or merged in."""
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not allowed in this document",
                                                    event.start_mark)
        if getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(None, None, "anchors (&name) are not allowed in this document",
                                                    event.start_mark)


def safe_yaml(data: bytes | str, source: str, what: str = "contract") -> Any:
    if isinstance(data, bytes):
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ContractError(
                f"The {what} {source} is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES}-byte limit; refused unread."
            )
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContractError(f"The {what} {source} is not UTF-8 text (byte {exc.start}).") from None
    elif len(data.encode()) > MAX_DOCUMENT_BYTES:
        raise ContractError(f"The {what} {source} is over the {MAX_DOCUMENT_BYTES}-byte limit; refused unread.")
    try:
        _refuse_anchors(data)
        return yaml.load(data, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ContractError(
            f"The {what} {source} is not valid YAML at {where}: {problem}. It was probably edited by hand or "
            "truncated; restore the signed copy or draft and sign a new one."
        ) from None


def _validation_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(document)'}: {e['msg']}" for e in exc.errors())


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + _b64(raw)


def key_id(key: Ed25519PublicKey) -> str:
    """128-bit fingerprint of the raw public key (hex): how signatures name their key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:32]


def parse_public_key(text: str, source: str = "public key") -> Ed25519PublicKey:
    """``ed25519:<base64url of the 32 raw bytes>``, optionally followed by a comment (the name)."""
    token = text.strip().split()[0] if isinstance(text, str) and text.strip() else ""
    if not token.startswith(PUBLIC_KEY_PREFIX):
        raise ContractError(
            f"The {source} {token[:40]!r} is not an Ed25519 public key: expected 'ed25519:<base64url>' as written "
            "by `scaler-wizard contract keygen` (the .pub file)."
        )
    try:
        raw = _unb64(token[len(PUBLIC_KEY_PREFIX) :])
        if len(raw) != 32:
            raise ValueError("wrong length")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ContractError(f"The {source} is not a valid 32-byte Ed25519 public key (bad base64url or length).") from None


@dataclass(frozen=True)
class KeyFiles:
    private: Path
    public: Path
    key_id: str
    public_key: str


def _write_private(path: Path, data: bytes) -> None:
    """Create the file with mode 0600 from the start (no window where others could read it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def generate_keypair(name: str, out_dir: Path, passphrase: str | None = None) -> KeyFiles:
    """Write ``<name>.key`` (PKCS#8 PEM, mode 0600, encrypted when a passphrase is given) and
    ``<name>.pub`` (one line: ``ed25519:<key> <name>``). Existing keys are never overwritten."""
    check_name(name, "key name")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists():
            raise ContractError(
                f"{p} already exists; a key is never overwritten (its signatures would become unverifiable).",
                hint="Choose another --name or --out folder, or revoke and remove the old key first.",
            )
    key = Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_private(priv_path, pem)
    pub = key.public_key()
    pub_path.write_text(f"{public_key_text(pub)} {name}\n", encoding="utf-8")
    return KeyFiles(priv_path, pub_path, key_id(pub), public_key_text(pub))


def load_private_key(path: Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 private key; refuses keys that others can read (like ssh does)."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"The private key {path} does not exist.", hint="Create one with `scaler-wizard contract keygen`.")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ContractError(
            f"The private key {path} can be read by other users (mode {oct(path.stat().st_mode & 0o777)}); "
            "it is refused because anyone who can read it can sign in your name.",
            hint=f"Run `chmod 600 {path}`.",
        )
    data = read_limited(path, "private key", 16 * 1024)
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV) or None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError:
        raise ContractError(
            f"The private key {path} is encrypted and no passphrase was given.",
            hint=f"Enter it when asked, or set {PASSPHRASE_ENV} for non-interactive use.",
        ) from None
    except ValueError:
        raise ContractError(f"The private key {path} could not be read: wrong passphrase or not a PEM key.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ContractError(f"The private key {path} is not an Ed25519 key; create one with `contract keygen`.")
    return key


def private_key_is_encrypted(path: Path) -> bool:
    try:
        return b"ENCRYPTED" in Path(path).read_bytes()[:64]
    except OSError:
        return False


def ensure_local_key(home: Path | None = None) -> tuple[Ed25519PrivateKey, KeyFiles]:
    """The person's own key for self-approval, created unencrypted (mode 0600) on first use in the
    config folder (``$SCALER_WIZARD_HOME/keys/local.key``)."""
    keys = (home or config_home()) / "keys"
    priv, pub = keys / f"{LOCAL_KEY_NAME}.key", keys / f"{LOCAL_KEY_NAME}.pub"
    if not priv.exists():
        generate_keypair(LOCAL_KEY_NAME, keys)
    key = load_private_key(priv, passphrase=None)
    pk = key.public_key()
    return key, KeyFiles(priv, pub, key_id(pk), public_key_text(pk))


def local_approver_name() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user database entry (containers)
        user = "user"
    user = re.sub(r"[^A-Za-z0-9._+-]", "-", user)[:40] or "user"
    return f"{user}@local"


# ------------------------------------------------------------------------------------------
# Trusted approvers (the trust root) with revocation and the k-of-n policy
# ------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ApproverEntry(_Strict):
    name: str
    public_key: str


class RevokedEntry(_Strict):
    key_id: str
    reason: str = ""
    revoked_at: Timestamp | None = None


class ApproversFile(_Strict):
    approvers_version: Literal[1] = APPROVERS_VERSION
    required_signatures: int = Field(1, ge=1, le=64, description="k of k-of-n: signatures every contract needs")
    allow_self_approval: bool | None = Field(
        None, description="may a person approve their own run with their local key (--self-approve or the typed "
        "signoff); unset: false as soon as the file names approvers (there is someone else to ask), else only "
        "an explicit self-approval")
    max_validity_days: int | None = Field(
        None, ge=1, le=MAX_VALIDITY_DAYS_LIMIT,
        description=f"longest validity window a contract may have (default {DEFAULT_MAX_VALIDITY_DAYS} days)")
    approvers: list[ApproverEntry] = Field(default_factory=list)
    revoked: list[RevokedEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Approver:
    name: str
    public_key: Ed25519PublicKey
    key_id: str


@dataclass
class TrustPolicy:
    """Who may approve, which keys are revoked, how many signatures a contract needs.

    ``allow_self_approval``: True (the user's file allows it), False (forbidden: said so by a file,
    or the user's file names approvers and does not say), None (nobody to ask: no user file, or one
    that names no approvers -- an *explicit* self-approval by the person at the keyboard,
    ``--self-approve`` or the typed signoff sentence, is accepted)."""

    approvers: dict[str, Approver] = field(default_factory=dict)  # by key id
    revoked: dict[str, RevokedEntry] = field(default_factory=dict)
    required_signatures: int = 1
    allow_self_approval: bool | None = None
    source: Path | None = None
    max_validity_days: int = DEFAULT_MAX_VALIDITY_DAYS
    sources: tuple[str, ...] = ()  # every file this policy was resolved from, with its role
    notes: tuple[str, ...] = ()  # what a project file tried and was not allowed to do

    def describe_source(self) -> str:
        if self.sources:
            return " + ".join(self.sources)
        return str(self.source) if self.source else "(no approvers file: only explicit self-approval is possible)"

    @property
    def max_validity(self) -> timedelta:
        return timedelta(days=self.max_validity_days)

    def with_extra(self, extra: Iterable[Approver]) -> TrustPolicy:
        approvers = dict(self.approvers)
        for a in extra:
            if a.key_id not in self.revoked:
                approvers.setdefault(a.key_id, a)
        return TrustPolicy(approvers, dict(self.revoked), self.required_signatures, self.allow_self_approval,
                           self.source, self.max_validity_days, self.sources, self.notes)


def user_approvers_file(explicit: Path | None = None) -> Path | None:
    """The user's own trust file, the authoritative one: ``--approvers`` > $SCALER_WIZARD_APPROVERS >
    ``$SCALER_WIZARD_HOME/approvers.yaml`` (when it exists) > none. A project folder never supplies it."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(APPROVERS_ENV):
        return Path(os.environ[APPROVERS_ENV]).expanduser()
    user = config_home() / "approvers.yaml"
    return user if user.exists() or user.is_symlink() else None


def project_approvers_file(recipe_dir: Path | None) -> Path | None:
    """``<recipe folder>/.scaler-wizard/approvers.yaml`` when present: it may only add restrictions."""
    if recipe_dir is None:
        return None
    path = Path(recipe_dir) / PROJECT_APPROVERS_FILE
    return path if path.exists() or path.is_symlink() else None


def find_approvers_file(recipe_dir: Path | None = None, explicit: Path | None = None) -> Path | None:
    """The user's trust file (kept for callers that edit it; see :func:`resolve_trust_policy` for
    what a run and ``contract verify`` use). ``recipe_dir`` is ignored: a project file is never the
    trust root."""
    return user_approvers_file(explicit)


def read_approvers_file(path: Path) -> ApproversFile:
    data = safe_yaml(read_limited(Path(path), "approvers file"), str(path), "approvers file")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ContractError(f"The approvers file {path} must be a YAML mapping (approvers, revoked, ...).")
    try:
        return ApproversFile.model_validate(data)
    except ValidationError as exc:
        raise ContractError(f"The approvers file {path} is invalid: {_validation_problems(exc)}.") from None


def _approvers_of(doc: ApproversFile, path: Path) -> dict[str, Approver]:
    out: dict[str, Approver] = {}
    for entry in doc.approvers:
        check_name(entry.name)
        pk = parse_public_key(entry.public_key, f"public key of {entry.name!r} in {path}")
        kid = key_id(pk)
        out[kid] = Approver(entry.name, pk, kid)
    return out


def load_trust_policy(path: Path | None) -> TrustPolicy:
    """One trust file on its own, as the user's file (an unset ``allow_self_approval`` is false when
    the file names approvers, else None: explicit self-approval only)."""
    if path is None:
        return TrustPolicy()
    doc = read_approvers_file(path)
    allow = doc.allow_self_approval
    if allow is None and doc.approvers:
        allow = False
    policy = TrustPolicy(required_signatures=doc.required_signatures, allow_self_approval=allow,
                         source=Path(path), max_validity_days=doc.max_validity_days or DEFAULT_MAX_VALIDITY_DAYS,
                         sources=(f"{path} (user)",))
    for entry in doc.revoked:
        policy.revoked[entry.key_id] = entry
    for kid, approver in _approvers_of(doc, Path(path)).items():
        if kid not in policy.revoked:
            policy.approvers[kid] = approver
    return policy


def resolve_trust_policy(recipe_dir: Path | None = None, explicit: Path | None = None) -> TrustPolicy:
    """The one trust resolution that ``run`` and ``contract verify`` share.

    The user's file (:func:`user_approvers_file`) is authoritative. A project file
    (``<recipe folder>/.scaler-wizard/approvers.yaml``, which anyone who can write the project can
    create) is merged in only as *restrictions*: its ``required_signatures`` can raise k, its
    ``approvers`` list can narrow who counts (keys the user does not trust are ignored, never
    added), ``allow_self_approval: false`` switches self-approval off (true never switches it on),
    ``max_validity_days`` can shorten the validity window, and its revocations are added (a
    revocation is never undone by any file). ``sources`` names every file read; ``notes`` lists
    what the project file asked for and was not granted."""
    user_path = user_approvers_file(explicit)
    policy = load_trust_policy(user_path)
    project = project_approvers_file(recipe_dir)
    if project is None:
        return policy
    doc = read_approvers_file(project)
    notes: list[str] = []
    revoked = dict(policy.revoked)
    for entry in doc.revoked:
        revoked.setdefault(entry.key_id, entry)
    approvers = {k: a for k, a in policy.approvers.items() if k not in revoked}
    if doc.approvers:
        listed = _approvers_of(doc, project)
        for kid, a in listed.items():
            if kid not in approvers:
                notes.append(f"{project} lists {a.name!r} (key {kid}), who is not trusted by the user's file: ignored")
        approvers = {k: a for k, a in approvers.items() if k in listed}
    allow = policy.allow_self_approval
    if doc.allow_self_approval is False:
        allow = False
    elif doc.allow_self_approval and not allow:
        notes.append(f"{project} asks to allow self-approval; only the user's own file can allow it: ignored")
    validity = policy.max_validity_days
    if doc.max_validity_days is not None:
        if doc.max_validity_days > validity:
            notes.append(f"{project} asks for a longer maximum validity ({doc.max_validity_days} days): ignored")
        validity = min(validity, doc.max_validity_days)
    return TrustPolicy(
        approvers=approvers, revoked=revoked, required_signatures=max(policy.required_signatures, doc.required_signatures),
        allow_self_approval=allow, source=policy.source, max_validity_days=validity,
        sources=(*(policy.sources or ("(no user approvers file)",)), f"{project} (project: restrictions only)"),
        notes=tuple(notes),
    )


def write_approvers_file(path: Path, doc: ApproversFile) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Trusted approvers of Scaler Wizard contracts. Whoever can edit this file decides who may approve runs.\n"
    data = doc.model_dump(mode="json")
    for optional in ("allow_self_approval", "max_validity_days"):
        if data.get(optional) is None:
            data.pop(optional, None)
    write_text_atomic(path, header + yaml.safe_dump(data, sort_keys=False), mode=0o644)


def add_trusted_approver(path: Path, name: str, public_key: str) -> Approver:
    check_name(name)
    pk = parse_public_key(public_key, f"public key for {name!r}")
    doc = read_approvers_file(path) if Path(path).is_file() else ApproversFile()
    kid = key_id(pk)
    if kid in {r.key_id for r in doc.revoked}:
        raise ContractError(f"Key {kid} was revoked in {path}; a revoked key cannot be trusted again.")
    entries = [e for e in doc.approvers if not (e.name == name and e.public_key == public_key_text(pk))]
    entries.append(ApproverEntry(name=name, public_key=public_key_text(pk)))
    write_approvers_file(path, doc.model_copy(update={"approvers": entries}))
    return Approver(name, pk, kid)


def revoke_key(path: Path, kid: str, reason: str = "", now: datetime | None = None) -> None:
    """Revoke a key id: it stays listed under ``revoked`` forever and leaves ``approvers``."""
    if not _KEY_ID_RE.match(kid):
        raise ContractError(f"{kid!r} is not a key id (32 hex digits, as printed by `contract keygen`/`verify`).")
    doc = read_approvers_file(path) if Path(path).is_file() else ApproversFile()
    approvers = [e for e in doc.approvers if key_id(parse_public_key(e.public_key)) != kid]
    revoked = [r for r in doc.revoked if r.key_id != kid]
    revoked.append(RevokedEntry(key_id=kid, reason=reason, revoked_at=format_time(now or utc_now())))
    write_approvers_file(path, doc.model_copy(update={"approvers": approvers, "revoked": revoked}))


# ------------------------------------------------------------------------------------------
# The contract document
# ------------------------------------------------------------------------------------------


class FileDigest(_Strict):
    name: str
    bytes: int = Field(ge=0)
    sha256: str


class ModelIdentity(_Strict):
    """What model was approved: its config and every weight file, by content."""

    path: str
    config_sha256: str
    weights: list[FileDigest] = Field(min_length=1)
    sha256: str = Field(description="sha256 of the canonical JSON of config_sha256 + weights")


class DataIdentity(_Strict):
    files: list[FileDigest] = Field(min_length=1)
    sha256: str = Field(description="sha256 of the canonical JSON of files")


BOUND_ROLES = ("model", "teacher", "data", "distill_cache", "probe_code")


class BoundFile(_Strict):
    """One file whose bytes decide what is trained or evaluated. Its path is ``root`` (the value as
    written in the recipe: model.path, a data entry, distillation.teacher_path / cache, a probe
    dir) resolved like the recipe resolves it, then ``rel`` inside it ('' when root is a file)."""

    role: Literal["model", "teacher", "data", "distill_cache", "probe_code"]
    root: str
    rel: str = ""
    bytes: int = Field(ge=0)
    sha256: str

    @property
    def label(self) -> str:
        return f"{self.role} {self.root}{'/' + self.rel if self.rel else ''}"


class Scope(_Strict):
    """What the run may do. Enforced at start and again at every stage boundary."""

    model: ModelIdentity
    data: DataIdentity
    strategy: str
    context_method: str
    base_length: int = Field(gt=0)
    target_length: int = Field(gt=0)
    stage_lengths: list[int] = Field(min_length=1)
    max_steps: int = Field(ge=1, description="optimizer steps over the whole run, gate extensions included")
    max_tokens: int = Field(ge=1, description="training tokens over the whole run")
    max_wall_time_s: int = Field(ge=1)
    files: list[BoundFile] = Field(
        min_length=1, description="every file that decides what is trained and evaluated, by content: all "
        "loadable files of the model folder, the data, the teacher folder, the offline cache, drop-in probe code")


class RollbackPlan(_Strict):
    to: Literal["last_passed_stage", "base_model", "snapshot"] = "last_passed_stage"
    snapshot: str | None = None
    note: str = ""


class ContractBody(_Strict):
    """Everything that is signed."""

    contract_version: Literal[2] = CONTRACT_VERSION
    contract_id: str
    session_id: str = Field(description="the run id this contract authorises (one run)")
    authorized_by: list[str] = Field(min_length=1, description="the people whose signatures count")
    required_signatures: int = Field(1, ge=1, description="k of k-of-n")
    approved_at: Timestamp = Field(description="start of validity")
    expires_at: Timestamp
    recipe_digest: str
    scope: Scope
    rollback_plan: RollbackPlan = Field(default_factory=RollbackPlan)
    signoff: str

    @model_validator(mode="after")
    def _coherent(self) -> ContractBody:
        problems = []
        if not valid_run_id(self.session_id):
            problems.append(
                "session_id must be a plain run name (1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit, no '..'), never a path")
        if not _HEX64_RE.match(self.recipe_digest):
            problems.append("recipe_digest must be 64 lowercase hex digits (Recipe.digest())")
        if len(set(self.authorized_by)) != len(self.authorized_by):
            problems.append("authorized_by lists a name twice")
        if self.required_signatures > len(self.authorized_by):
            problems.append(
                f"required_signatures ({self.required_signatures}) exceeds the {len(self.authorized_by)} "
                "people in authorized_by, so it could never be met"
            )
        if parse_time(self.expires_at) <= parse_time(self.approved_at):
            problems.append("expires_at must be after approved_at")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def digest(self) -> str:
        return sha256_hex(canonical_json(self.model_dump(mode="json")))


class Signature(_Strict):
    approver: str
    key_id: str
    algorithm: Literal["ed25519"] = "ed25519"
    signed_at: Timestamp
    signature: str


class Contract(BaseModel):
    model_config = ConfigDict(frozen=True)
    body: ContractBody
    signatures: tuple[Signature, ...] = ()

    def digest(self) -> str:
        return self.body.digest()


class DetachedSignatures(_Strict):
    contract_sha256: str
    signatures: list[Signature] = Field(min_length=1)


def parse_contract(data: bytes | str, source: str = "<contract>") -> Contract:
    """Parse a contract document (body fields + optional ``signatures``) with every safety check."""
    doc = safe_yaml(data, source)
    if not isinstance(doc, dict):
        raise ContractError(f"The contract {source} must be a YAML mapping; got {type(doc).__name__}.")
    version = doc.get("contract_version")
    if version is None:
        raise ContractError(f"The contract {source} has no contract_version; it is not a Scaler Wizard contract.")
    if version in LEGACY_CONTRACT_VERSIONS and not isinstance(version, bool):
        raise ContractError(
            f"The contract {source} has contract_version {version}, whose scope binds only config.json and the "
            "*.safetensors weights (not the tokenizer, chat templates, teacher, offline cache or probe code); this "
            f"Scaler Wizard accepts version {CONTRACT_VERSION} only.",
            hint="Draft it again with `scaler-wizard contract draft RECIPE` and have it signed.",
        )
    if version not in SUPPORTED_CONTRACT_VERSIONS or isinstance(version, bool):
        raise ContractError(
            f"The contract {source} has contract_version {version!r}; this Scaler Wizard reads versions "
            f"{', '.join(map(str, SUPPORTED_CONTRACT_VERSIONS))}.",
            hint="Upgrade scaler-wizard to read it, or draft and sign the contract again with this version.",
        )
    raw_sigs = doc.pop("signatures", None) or []
    if not isinstance(raw_sigs, list):
        raise ContractError(f"The contract {source}: signatures must be a list of signature blocks.")
    try:
        body = ContractBody.model_validate(doc)
        sigs = tuple(Signature.model_validate(s) for s in raw_sigs)
    except ValidationError as exc:
        raise ContractError(
            f"The contract {source} does not match contract version {version}: {_validation_problems(exc)}.",
            hint="Draft a new one with `scaler-wizard contract draft RECIPE` rather than editing by hand.",
        ) from None
    return Contract(body=body, signatures=sigs)


def detached_path(contract_path: Path) -> Path:
    return Path(str(contract_path) + ".sig")


def load_contract(path: Path, signature_path: Path | None = None) -> Contract:
    """Read a contract file; signatures in ``<contract>.sig`` (or ``signature_path``) are added."""
    path = Path(path)
    contract = parse_contract(read_limited(path, "contract"), str(path))
    sig_file = Path(signature_path) if signature_path else detached_path(path)
    if signature_path is not None or sig_file.is_file():
        contract = _merge_detached(contract, sig_file)
    return contract


def _merge_detached(contract: Contract, sig_file: Path) -> Contract:
    data = safe_yaml(read_limited(sig_file, "signature file"), str(sig_file), "signature file")
    try:
        detached = DetachedSignatures.model_validate(data)
    except ValidationError as exc:
        raise ContractError(f"The signature file {sig_file} is invalid: {_validation_problems(exc)}.") from None
    if detached.contract_sha256 != contract.digest():
        raise ContractError(
            f"The signature file {sig_file} was made for contract {detached.contract_sha256[:16]}..., but the "
            f"contract now hashes to {contract.digest()[:16]}...: the contract was changed after signing.",
            hint="Ask the approvers to sign the current contract again.",
        )
    return contract.model_copy(update={"signatures": contract.signatures + tuple(detached.signatures)})


_CONTRACT_HEADER = (
    "# Scaler Wizard run contract. The signatures cover every value below (canonical JSON of the\n"
    "# parsed document); any change invalidates them. Check: scaler-wizard contract verify FILE\n"
)


def dump_contract(contract: Contract, *, with_signatures: bool = True) -> str:
    doc = contract.body.model_dump(mode="json")
    if with_signatures and contract.signatures:
        doc["signatures"] = [s.model_dump(mode="json") for s in contract.signatures]
    return _CONTRACT_HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)


def dump_detached(contract: Contract) -> str:
    doc = {"contract_sha256": contract.digest(), "signatures": [s.model_dump(mode="json") for s in contract.signatures]}
    return yaml.safe_dump(doc, sort_keys=False)


def write_text_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a temporary file created exclusively (never through a planted symlink) with ``mode``,
    fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------------------
# Identities of the model and the data
# ------------------------------------------------------------------------------------------


def _file_digest(path: Path, name: str) -> FileDigest:
    size, digest = hash_regular(path, f"file {name}")
    return FileDigest(name=name, bytes=size, sha256=digest)


# Weight formats Scaler Wizard never loads (safetensors only): not part of a model folder's identity.
# .gguf is loadable (model.path may name a GGUF file), so it is bound like the safetensors
UNLOADED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx", ".ot")


def tree_files(root: Path, what: str, *, skip_suffixes: tuple[str, ...] = (), skip_dirs: tuple[str, ...] = ()
               ) -> list[tuple[str, Path]]:
    """(relative posix name, path) of every regular file under ``root`` (or ``("", root)`` for a file),
    sorted. Hidden entries (``.git``, ``.cache``...) and ``skip_dirs`` are left out. A symlink, FIFO,
    socket or device inside is refused: what is bound must be a plain file that cannot be re-pointed."""
    root = Path(root)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise ContractError(f"Cannot identify the {what}: {root} does not exist.") from None
    if stat.S_ISREG(st.st_mode):
        return [("", root)]
    if not stat.S_ISDIR(st.st_mode):
        raise ContractError(f"Cannot identify the {what}: {root} is neither a file nor a folder.")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or d in skip_dirs:
                continue
            if (here / d).is_symlink():
                raise ContractError(f"The {what} contains a symbolic link {here / d}; it is refused (a link can be "
                                    "re-pointed after signing). Copy the real folder in.")
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith(".") or f.endswith(skip_suffixes):
                continue
            path = here / f
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ContractError(f"The {what} contains a symbolic link {path}; it is refused (a link can be "
                                    "re-pointed after signing). Copy the real file in.")
            if not stat.S_ISREG(mode):
                raise ContractError(f"The {what} contains {path}, which is not a regular file; it is refused.")
            out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def model_identity(model_dir: Path, path_value: str) -> ModelIdentity:
    """sha256 of config.json plus name, size and sha256 of every weight file (``*.safetensors`` and the
    shard index). Weights are hashed in full: an edited shard of the same size must not pass. (The
    scope's ``files`` bind every other loadable file of the folder too.)"""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise ContractError(f"Cannot identify the model: {config} does not exist.")
    weight_files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_files.append(index)
    if not weight_files:
        raise ContractError(f"Cannot identify the model: {model_dir} holds no *.safetensors weights.")
    config_sha = sha256_file(config, "model config")
    weights = [_file_digest(p, p.name) for p in weight_files]
    digest = sha256_hex(canonical_json({"config_sha256": config_sha, "weights": [w.model_dump() for w in weights]}))
    return ModelIdentity(path=path_value, config_sha256=config_sha, weights=weights, sha256=digest)


def data_identity(recipe: Recipe, recipe_dir: Path) -> DataIdentity:
    """sha256 over the bytes of every train and eval file (every file of a folder, sorted)."""
    files: list[FileDigest] = []
    for value in [*recipe.data.train, *recipe.data.eval]:
        path = resolve_path(value, recipe_dir)
        if not path.exists():
            raise ContractError(f"Cannot identify the data: {value} ({path}) does not exist.")
        for rel, p in tree_files(path, f"data {value}"):
            files.append(_file_digest(p, f"{value}/{rel}" if rel else value))
    digest = sha256_hex(canonical_json([f.model_dump() for f in files]))
    return DataIdentity(files=files, sha256=digest)


def bound_roots(recipe: Recipe) -> list[tuple[str, str]]:
    """(role, recipe value) of every file or folder whose content decides the run."""
    roots = [("model", recipe.model.path)]
    roots += [("data", v) for v in [*recipe.data.train, *recipe.data.eval]]
    d = recipe.distillation
    if d.teacher_path and (d.enabled or d.teacher == "model"):
        roots.append(("teacher", d.teacher_path))
    if d.cache and (d.enabled or d.teacher == "offline"):
        roots.append(("distill_cache", d.cache))
    roots += [("probe_code", v) for v in recipe.evaluation.probe_dirs]
    return roots


def bound_files(recipe: Recipe, recipe_dir: Path) -> list[BoundFile]:
    """Every file in :func:`bound_roots`, hashed now (read once through a no-follow descriptor).
    Model and teacher folders: every file that can load (config, weights, tokenizer*, special tokens,
    generation config, chat templates, ``*.jinja``...), i.e. all but hidden entries and pickle-format
    weights, which are never loaded. Probe folders: all but ``__pycache__`` (probe code must be
    loaded from the verified source, never from cached bytecode)."""
    out: list[BoundFile] = []
    seen: set[tuple[str, str, str]] = set()
    for role, value in bound_roots(recipe):
        path = resolve_path(value, recipe_dir)
        skip_suffixes = UNLOADED_SUFFIXES if role in ("model", "teacher") else ()
        skip_dirs = ("__pycache__",) if role == "probe_code" else ()
        for rel, p in tree_files(path, f"{role.replace('_', ' ')} {value}", skip_suffixes=skip_suffixes,
                                 skip_dirs=skip_dirs):
            if (role, value, rel) in seen:
                continue
            seen.add((role, value, rel))
            size, digest = hash_regular(p, f"{role} file {p}")
            out.append(BoundFile(role=role, root=value, rel=rel, bytes=size, sha256=digest))
    return out


def bound_path(f: BoundFile, recipe_dir: Path) -> Path:
    base = resolve_path(f.root, recipe_dir)
    return base / f.rel if f.rel else base


def compare_bound_files(approved: list[BoundFile], actual: list[BoundFile]) -> None:
    """Every approved file is present with its approved bytes, and nothing was added."""
    def key(f: BoundFile) -> tuple[str, str, str]:
        return (f.role, f.root, f.rel)

    a, b = {key(f): f for f in approved}, {key(f): f for f in actual}
    for k in sorted(set(a) | set(b)):
        if k not in b:
            raise ContractError(f"The {a[k].label} approved in the contract is missing now.",
                                hint="Restore the approved file, or draft and sign a new contract.")
        if k not in a:
            raise ContractError(f"The {b[k].label} was not part of the approved scope; it was added after signing.",
                                hint="Remove it, or draft and sign a new contract.")
        if a[k].sha256 != b[k].sha256 or a[k].bytes != b[k].bytes:
            raise ContractError(
                f"The {a[k].label} changed after the contract was signed (sha256 {a[k].sha256[:12]}..., "
                f"{a[k].bytes} bytes approved; now {b[k].sha256[:12]}..., {b[k].bytes} bytes). The approval does not "
                "cover it.",
                hint="Restore the approved file, or draft and sign a new contract.",
            )


# ------------------------------------------------------------------------------------------
# Using exactly the approved bytes (time of check = time of use)
# ------------------------------------------------------------------------------------------


class VerifiedScope:
    """The approved files of a run by absolute path, to read them as approved.

    ``read_verified(path)`` opens the file once without following a symlink (regular files only,
    checked on the descriptor), reads it into memory, hashes *those* bytes and returns them only if
    they are the approved ones: the caller parses exactly the bytes that were checked, so swapping
    the file (or a symlinked folder above it) after the check changes nothing. ``materialize``
    copies a whole approved root (model folder, teacher, data, probe dir) into a private folder,
    hashing while copying, for loaders that need a path (``from_pretrained``, ``datasets``)."""

    def __init__(self, files: list[BoundFile], recipe_dir: Path):
        self.recipe_dir = Path(recipe_dir)
        self.files = list(files)
        self._by_path: dict[str, BoundFile] = {}
        for f in self.files:
            self._by_path[os.path.abspath(bound_path(f, self.recipe_dir))] = f
        self.reads: list[tuple[str, str]] = []  # (label, sha256) of every verified read, for the audit

    @classmethod
    def of(cls, scope: Scope, recipe_dir: Path) -> VerifiedScope:
        return cls(scope.files, recipe_dir)

    def entry(self, path: Path | str) -> BoundFile:
        f = self._by_path.get(os.path.abspath(path))
        if f is None:
            raise ContractError(f"{path} is not part of the approved scope; it is not read.",
                                hint="Only files hashed into the signed contract are used by the run.")
        return f

    def read_verified(self, path: Path | str) -> bytes:
        f = self.entry(path)
        data = read_regular(path, f.label)
        digest = sha256_hex(data)
        if len(data) != f.bytes or digest != f.sha256:
            raise ContractError(
                f"The {f.label} changed after the contract was signed (sha256 {f.sha256[:12]}..., {f.bytes} bytes "
                f"approved; read {digest[:12]}..., {len(data)} bytes). The approval does not cover it; the run stops.",
                hint="Restore the approved file, or draft and sign a new contract.",
            )
        self.reads.append((f.label, digest))
        return data

    def verify_read(self, path: Path | str, nbytes: int, sha256: str) -> None:
        """Bytes read *before* the approval (``read_and_hash``, e.g. data parsed by the preflight) are
        the approved ones: same size and sha256 as the signed scope says, or ContractError."""
        f = self.entry(path)
        if nbytes != f.bytes or sha256 != f.sha256:
            raise ContractError(
                f"The {f.label} changed after the contract was signed: the bytes read ({sha256[:12]}..., {nbytes} "
                f"bytes) are not the approved ones ({f.sha256[:12]}..., {f.bytes} bytes). The run stops.",
                hint="Restore the approved file, or draft and sign a new contract.")
        self.reads.append((f.label, sha256))

    def roots(self, role: str) -> list[str]:
        return list(dict.fromkeys(f.root for f in self.files if f.role == role))

    def materialize(self, role: str, root: str, dest: Path | None = None) -> Path:
        """A private copy (folder mode 0700, files 0600) of the approved files under ``root``, made from
        bytes hashed while copying; returns the copy's path (the file itself for a single-file root).
        ``dest``: a folder that does not exist yet, in a real parent folder (default: a new private
        temporary folder). Anything not approved is absent from the copy; any mismatch removes the
        copy and raises ContractError."""
        files = [f for f in self.files if f.role == role and f.root == root]
        if not files:
            raise ContractError(f"No approved {role} files under {root!r}.")
        if dest is None:
            dest = Path(tempfile.mkdtemp(prefix="scaler-wizard-verified-"))
        else:
            # a new folder in a real (not symlinked) parent: nothing planted can receive the copy
            dest = Path(dest)
            parent = dest.parent
            if parent.is_symlink() or not parent.is_dir():
                raise ContractError(f"Cannot copy the approved files into {dest}: {parent} is not a real folder.")
            try:
                os.mkdir(dest, 0o700)
            except FileExistsError:
                raise ContractError(f"Cannot copy the approved files into {dest}: it already exists; "
                                    "pass a new folder (or none for a private temporary one).") from None
        try:
            for f in files:
                name = f.rel or Path(f.root).name or "file"
                target = dest / name
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._copy_verified(f, target)
        except BaseException:
            import shutil

            shutil.rmtree(dest, ignore_errors=True)
            raise
        single = len(files) == 1 and not files[0].rel
        return dest / (Path(files[0].root).name or "file") if single else dest

    def _copy_verified(self, f: BoundFile, target: Path) -> None:
        src = bound_path(f, self.recipe_dir)
        h, n = hashlib.sha256(), 0
        fd = open_regular(src, f.label)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "rb") as fh, os.fdopen(out, "wb") as wh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
                n += len(chunk)
                wh.write(chunk)
        if n != f.bytes or h.hexdigest() != f.sha256:
            raise ContractError(
                f"The {f.label} changed after the contract was signed (read {h.hexdigest()[:12]}..., {n} bytes; "
                f"approved {f.sha256[:12]}..., {f.bytes} bytes). The run stops.",
                hint="Restore the approved file, or draft and sign a new contract.")
        self.reads.append((f.label, f.sha256))

    def check_all(self) -> None:
        """Re-hash every approved file from disk now (stage boundaries): raises on any change."""
        for f in self.files:
            path = bound_path(f, self.recipe_dir)
            size, digest = hash_regular(path, f.label)
            if size != f.bytes or digest != f.sha256:
                raise ContractError(
                    f"The {f.label} changed after the contract was signed (sha256 {f.sha256[:12]}... approved; now "
                    f"{digest[:12]}...). The run stops here.",
                    hint="Restore the approved file, or draft and sign a new contract.")

    @property
    def data_sha256(self) -> str:
        """The data identity of the approved data files, in the order DataIdentity uses."""
        files = [FileDigest(name=f"{f.root}/{f.rel}" if f.rel else f.root, bytes=f.bytes, sha256=f.sha256)
                 for f in self.files if f.role == "data"]
        return sha256_hex(canonical_json([x.model_dump() for x in files]))


def read_and_hash(path: Path | str, what: str = "file") -> tuple[bytes, int, str]:
    """(bytes, size, sha256) of a regular file read once without following a symlink: for input
    read before the approval; pass size and sha256 to :meth:`VerifiedScope.verify_read` after it."""
    data = read_regular(path, what)
    return data, len(data), sha256_hex(data)


def read_verified(scope: Scope | VerifiedScope, path: Path | str, recipe_dir: Path | None = None) -> bytes:
    """The bytes of ``path`` if and only if they are the approved ones (see :class:`VerifiedScope`)."""
    if isinstance(scope, Scope):
        if recipe_dir is None:
            raise ValueError("read_verified(Scope, path) needs recipe_dir")
        scope = VerifiedScope.of(scope, recipe_dir)
    return scope.read_verified(path)


# ------------------------------------------------------------------------------------------
# Drafting: contract from recipe
# ------------------------------------------------------------------------------------------


def planned_base_length(recipe: Recipe, model_dir: Path) -> int:
    if recipe.context.base_length:
        return recipe.context.base_length
    from ..context.methods import base_context_length

    from transformers import AutoConfig

    # the config as the run reads it (AutoConfig normalises old keys such as rope_scaling), so the
    # scope plans the same base length as the run
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ContractError(f"Cannot read {Path(model_dir) / 'config.json'} to plan the scope: {exc}.") from None
    return base_context_length(config)


def plan_scope(recipe: Recipe, recipe_dir: Path, max_wall_time_s: int) -> Scope:
    """The scope a recipe needs: its stages, the steps with gate extensions, tokens, identities."""
    from ..context.schedule import plan_lengths

    model_dir = resolve_path(recipe.model.path, recipe_dir)
    base = planned_base_length(recipe, model_dir)
    lengths = plan_lengths(base, recipe.context.target_length, recipe.context.schedule)
    steps = recipe.training.steps_per_stage
    budgets = steps if isinstance(steps, list) else [steps] * len(lengths)
    # gate_policy "extend" (one extension) and "rollback" (one retry from the stage start) may train
    # each stage a second time; each envelope rollback (safety.policy, on_stop: rollback) may retrain
    # at most one stage. The scope counts work done, not positions (a rollback resets the position).
    attempts = 2 if recipe.context.gate_policy in ("extend", "rollback") else 1
    policy = recipe.safety.policy
    rollbacks = policy.max_rollbacks if policy.on_stop == "rollback" else 0
    from ..distributed import launched_world_size

    # rows per optimizer step over every process of the launch (a contract drafted for one
    # process does not cover the tokens of a launch on several)
    per_step = recipe.training.micro_batch_size * recipe.training.gradient_accumulation_steps * launched_world_size()
    stage_tokens = [b * n * per_step for b, n in zip(budgets, lengths)]
    return Scope(
        model=model_identity(model_dir, recipe.model.path),
        data=data_identity(recipe, recipe_dir),
        strategy=recipe.scaling.strategy,
        context_method=recipe.context.method,
        base_length=base,
        target_length=recipe.context.target_length,
        stage_lengths=list(lengths),
        max_steps=attempts * sum(budgets) + rollbacks * max(budgets),
        max_tokens=attempts * sum(stage_tokens) + rollbacks * max(stage_tokens),
        max_wall_time_s=int(max_wall_time_s),
        files=bound_files(recipe, recipe_dir),
    )


def default_run_id(recipe: Recipe, now: datetime | None = None) -> str:
    """Same spelling as the pipeline's generated run ids: <name>-<UTC yyyymmdd-hhmmss>."""
    return recipe.run.run_id or f"{recipe.run.name}-{(now or utc_now()).strftime('%Y%m%d-%H%M%S')}"


def draft_contract(
    recipe: Recipe,
    recipe_dir: Path,
    *,
    authorized_by: list[str],
    run_id: str | None = None,
    required_signatures: int = 1,
    valid_for: timedelta = timedelta(days=7),
    max_validity: timedelta = timedelta(days=DEFAULT_MAX_VALIDITY_DAYS),
    not_before: datetime | None = None,
    max_wall_time_s: int = 24 * 3600,
    rollback: RollbackPlan | None = None,
    signoff: str = SIGNOFF_SENTENCE,
    now: datetime | None = None,
) -> Contract:
    """An unsigned contract filled in from a recipe (identities hashed now)."""
    now = now or utc_now()
    for name in authorized_by:
        check_name(name)
    if recipe.run.run_id and run_id and run_id != recipe.run.run_id:
        raise ContractError(f"The run id {run_id!r} differs from the recipe's run.run_id {recipe.run.run_id!r}.")
    if run_id is not None:
        check_run_id(run_id, "run id")
    if not isinstance(valid_for, timedelta) or valid_for <= timedelta(0):
        raise ContractError("A contract's validity must be a positive duration.")
    if valid_for > max_validity:
        raise ContractError(
            f"A validity of {valid_for.total_seconds() / 86400:g} days is longer than the maximum of "
            f"{max_validity.days} days (trust policy max_validity_days); an approval is for a run soon, not for "
            "years.", hint="Pass a shorter --valid-days.")
    start = not_before or now
    try:
        start + valid_for
    except OverflowError:
        raise ContractError("The contract's validity window ends beyond the year 9999.") from None
    try:
        body = ContractBody(
            contract_id=str(uuid.uuid4()),
            session_id=run_id or default_run_id(recipe, now),
            authorized_by=list(authorized_by),
            required_signatures=required_signatures,
            approved_at=format_time(start),
            expires_at=format_time(start + valid_for),
            recipe_digest=recipe.digest(),
            scope=plan_scope(recipe, recipe_dir, max_wall_time_s),
            rollback_plan=rollback or RollbackPlan(),
            signoff=signoff,
        )
    except ValidationError as exc:
        raise ContractError(f"Cannot draft the contract: {_validation_problems(exc)}.") from None
    return Contract(body=body)


# ------------------------------------------------------------------------------------------
# Signing and verification
# ------------------------------------------------------------------------------------------


def signature_message(contract_sha256: str, approver: str, kid: str, signed_at: str) -> bytes:
    return canonical_json(
        {"context": SIGNATURE_CONTEXT, "contract_sha256": contract_sha256, "approver": approver, "key_id": kid,
         "signed_at": signed_at}
    )


def sign_contract(contract: Contract, key: Ed25519PrivateKey, approver: str, *, now: datetime | None = None) -> Contract:
    """Add one approver's signature. Refuses expired contracts and a second signature by one key."""
    check_name(approver)
    now = now or utc_now()
    if now >= parse_time(contract.body.expires_at):
        raise ContractError(f"The contract expired at {contract.body.expires_at}; it cannot be signed any more.",
                            hint="Draft a new one.")
    kid = key_id(key.public_key())
    if any(s.key_id == kid for s in contract.signatures):
        raise ContractError(f"Key {kid} has already signed this contract.")
    signed_at = format_time(now)
    sig = key.sign(signature_message(contract.digest(), approver, kid, signed_at))
    entry = Signature(approver=approver, key_id=kid, signed_at=signed_at, signature=_b64(sig))
    return contract.model_copy(update={"signatures": contract.signatures + (entry,)})


@dataclass(frozen=True)
class VerifiedContract:
    contract: Contract
    digest: str
    approvers: tuple[str, ...]
    key_ids: tuple[str, ...]
    required: int


def normalise_signoff(text: str) -> str:
    """Whitespace collapsed and one trailing full stop dropped; case and words must match exactly."""
    text = " ".join(str(text).split())
    return text.removesuffix(".")


def _check_signature(contract: Contract, sig: Signature, trust: TrustPolicy, digest: str) -> Approver:
    if sig.key_id in trust.revoked:
        r = trust.revoked[sig.key_id]
        raise ContractError(
            f"The signature by {sig.approver!r} uses key {sig.key_id}, which was revoked"
            f"{' on ' + r.revoked_at if r.revoked_at else ''}{' (' + r.reason + ')' if r.reason else ''} in "
            f"{trust.describe_source()}. A revoked key approves nothing.",
            hint="Have the approver sign again with their new key.",
        )
    approver = trust.approvers.get(sig.key_id)
    if approver is None:
        raise ContractError(
            f"The signature by {sig.approver!r} uses key {sig.key_id}, which is not a trusted approver key in "
            f"{trust.describe_source()}. Only trusted approvers can authorise a run.",
            hint="If this person should approve runs, add their .pub key with `scaler-wizard contract trust`.",
        )
    try:
        raw = _unb64(sig.signature)
        approver.public_key.verify(raw, signature_message(digest, sig.approver, sig.key_id, sig.signed_at))
    except (InvalidSignature, ValueError):
        raise ContractError(
            f"The signature by {approver.name!r} (key {sig.key_id}) does not match the contract: the contract or "
            "the signature was changed after signing. The run is refused.",
            hint="Restore the signed contract, or have it signed again.",
        ) from None
    if sig.approver != approver.name:
        raise ContractError(
            f"A signature claims to be by {sig.approver!r} but its key {sig.key_id} belongs to {approver.name!r} in "
            f"{trust.describe_source()}."
        )
    if approver.name not in contract.body.authorized_by:
        raise ContractError(
            f"{approver.name!r} signed, but the contract names only {contract.body.authorized_by} in authorized_by; "
            "a signature from someone the contract does not name authorises nothing."
        )
    return approver


def verify_contract(contract: Contract, trust: TrustPolicy, *, now: datetime | None = None) -> VerifiedContract:
    """Signatures (integrity, trust, revocation), k-of-n, signoff sentence, validity window.
    Binding to a concrete recipe, model, data and run is :func:`check_bindings`."""
    now = now or utc_now()
    body = contract.body
    digest = contract.digest()
    if not contract.signatures:
        raise ContractError(
            "The contract carries no signatures: nobody has accepted responsibility for this run.",
            hint="Sign it with `scaler-wizard contract sign CONTRACT --key KEY`.",
        )
    counted: dict[str, Approver] = {}
    for sig in contract.signatures:
        approver = _check_signature(contract, sig, trust, digest)
        counted.setdefault(approver.name, approver)  # one person counts once, whatever keys they hold
    required = max(body.required_signatures, trust.required_signatures)
    if len(counted) < required:
        raise ContractError(
            f"The contract has valid signatures from {len(counted)} approver(s) ({', '.join(sorted(counted))}) but "
            f"needs {required} (contract asks {body.required_signatures}, trust policy "
            f"{trust.describe_source()} asks {trust.required_signatures}).",
            hint=f"Collect signatures from more of: {', '.join(body.authorized_by)}.",
        )
    if normalise_signoff(body.signoff) != SIGNOFF_SENTENCE:
        raise ContractError(
            f"The contract's signoff reads {body.signoff[:80]!r}, not the required sentence {SIGNOFF_SENTENCE!r}; "
            "the approvers did not accept responsibility in the required words.",
            hint="Draft the contract again and sign it.",
        )
    start, end = parse_time(body.approved_at), parse_time(body.expires_at)
    if end - start > trust.max_validity:
        raise ContractError(
            f"The contract is valid from {body.approved_at} to {body.expires_at}, "
            f"{(end - start).total_seconds() / 86400:g} days, longer than the maximum of {trust.max_validity_days} "
            f"days set by the trust policy ({trust.describe_source()}).",
            hint="Draft and sign a contract with a shorter --valid-days.",
        )
    if now + CLOCK_SKEW < start:
        raise ContractError(
            f"The contract is not valid yet: it starts at {body.approved_at} and it is now {format_time(now)}.",
            hint="Wait until then, or draft one whose validity starts now.",
        )
    if now >= end:
        raise ContractError(
            f"The contract expired at {body.expires_at} (now {format_time(now)}); an old approval does not "
            "authorise a new run.",
            hint="Draft and sign a new contract.",
        )
    return VerifiedContract(contract, digest, tuple(sorted(counted)), tuple(a.key_id for a in counted.values()),
                            required)


def _compare_files(kind: str, approved: list[FileDigest], actual: list[FileDigest]) -> None:
    a, b = {f.name: f for f in approved}, {f.name: f for f in actual}
    for name in sorted(set(a) | set(b)):
        if name not in b:
            raise ContractError(f"The {kind} file {name} approved in the contract is missing now.")
        if name not in a:
            raise ContractError(f"The {kind} file {name} was not part of the approved {kind}; it was added after signing.")
        if a[name] != b[name]:
            raise ContractError(
                f"The {kind} file {name} changed after the contract was signed (sha256 {a[name].sha256[:12]}..., "
                f"{a[name].bytes} bytes approved; now {b[name].sha256[:12]}..., {b[name].bytes} bytes). "
                "The approval does not cover it.",
                hint="Restore the approved file, or draft and sign a new contract.",
            )


def check_bindings(body: ContractBody, recipe: Recipe, recipe_dir: Path, run_id: str) -> Scope:
    """The contract approves exactly this run, this recipe, this model and this data.
    Returns the scope the recipe needs (checked to lie within the approved one)."""
    check_run_id(run_id)
    if body.session_id != run_id:
        raise ContractError(
            f"The contract authorises run {body.session_id!r}, not this run {run_id!r}; a contract is good for one run.",
            hint="Draft and sign a contract for this run.",
        )
    if recipe.run.run_id and recipe.run.run_id != body.session_id:
        raise ContractError(f"The recipe's run.run_id {recipe.run.run_id!r} differs from the contract's "
                            f"session_id {body.session_id!r}.")
    digest = recipe.digest()
    if digest != body.recipe_digest:
        raise ContractError(
            f"The recipe changed after the contract was signed (recipe digest now {digest[:16]}..., approved "
            f"{body.recipe_digest[:16]}...). The approval covers the recipe as it was.",
            hint="Undo the change, or draft and sign a new contract for the changed recipe.",
        )
    approved = body.scope
    needed = plan_scope(recipe, recipe_dir, approved.max_wall_time_s)
    if needed.model.config_sha256 != approved.model.config_sha256:
        raise ContractError(
            f"The model's config.json changed after the contract was signed (sha256 {needed.model.config_sha256[:12]}"
            f"..., approved {approved.model.config_sha256[:12]}...).",
            hint="Restore the approved model, or draft and sign a new contract.",
        )
    _compare_files("model weight", approved.model.weights, needed.model.weights)
    _compare_files("data", approved.data.files, needed.data.files)
    compare_bound_files(approved.files, needed.files)
    _check_plan_within(needed, approved)
    return needed


def _check_plan_within(needed: Scope, approved: Scope) -> None:
    problems = []
    if needed.strategy != approved.strategy:
        problems.append(f"strategy {needed.strategy} (approved {approved.strategy})")
    if needed.context_method != approved.context_method:
        problems.append(f"context method {needed.context_method} (approved {approved.context_method})")
    if needed.target_length > approved.target_length:
        problems.append(f"target context {needed.target_length} (approved {approved.target_length})")
    if not set(needed.stage_lengths) <= set(approved.stage_lengths):
        problems.append(f"stage lengths {needed.stage_lengths} (approved {approved.stage_lengths})")
    if needed.max_steps > approved.max_steps:
        problems.append(f"up to {needed.max_steps} steps (approved {approved.max_steps})")
    if needed.max_tokens > approved.max_tokens:
        problems.append(f"up to {needed.max_tokens} training tokens (approved {approved.max_tokens})")
    if problems:
        raise ContractError("The recipe plans more than the contract approves: " + "; ".join(problems) + ".")


def contract_summary(body: ContractBody) -> str:
    """A few lines a person can read before typing the signoff sentence."""
    s = body.scope
    hours = s.max_wall_time_s / 3600
    return "\n".join(
        [
            f"Run               {body.session_id}",
            f"Model             {s.model.path}  (sha256 {s.model.sha256[:16]}..., {len(s.model.weights)} weight file(s))",
            (f"Data              {len(s.data.files)} file(s), {sum(f.bytes for f in s.data.files)} bytes "
            f"(sha256 {s.data.sha256[:16]}...)"),
            (f"Strategy          {s.strategy}; context {s.base_length} -> {s.target_length} tokens with "
            f"{s.context_method}, stages {s.stage_lengths}"),
            (f"Bound files       {len(s.files)} file(s) by sha256 ("
             + ", ".join(f"{r.replace('_', ' ')} {sum(f.role == r for f in s.files)}" for r in BOUND_ROLES
                         if any(f.role == r for f in s.files)) + ")"),
            (f"Limits            {s.max_steps} steps (work done, rollbacks included), {s.max_tokens} training "
             f"tokens, {hours:.2f} h wall time"),
            f"Rollback          {body.rollback_plan.to}{' ' + body.rollback_plan.snapshot if body.rollback_plan.snapshot else ''}",
            f"Recipe digest     {body.recipe_digest}",
            f"Valid             {body.approved_at} to {body.expires_at}",
            f"Approvers         {', '.join(body.authorized_by)} ({body.required_signatures} needed)",
        ]
    )


__all__ = [
    "APPROVERS_ENV",
    "CONTRACT_VERSION",
    "HOME_ENV",
    "MAX_DOCUMENT_BYTES",
    "PASSPHRASE_ENV",
    "SIGNOFF_SENTENCE",
    "Approver",
    "ApproversFile",
    "BoundFile",
    "Contract",
    "ContractBody",
    "DataIdentity",
    "KeyFiles",
    "ModelIdentity",
    "RollbackPlan",
    "Scope",
    "Signature",
    "TrustPolicy",
    "VerifiedContract",
    "VerifiedScope",
    "add_trusted_approver",
    "bound_files",
    "canonical_json",
    "check_bindings",
    "check_run_id",
    "compare_bound_files",
    "config_home",
    "contract_summary",
    "data_identity",
    "default_run_id",
    "draft_contract",
    "dump_contract",
    "dump_detached",
    "ensure_local_key",
    "find_approvers_file",
    "generate_keypair",
    "hash_regular",
    "key_id",
    "load_contract",
    "load_private_key",
    "load_trust_policy",
    "local_approver_name",
    "model_identity",
    "open_regular",
    "parse_contract",
    "parse_public_key",
    "plan_scope",
    "project_approvers_file",
    "public_key_text",
    "read_and_hash",
    "read_regular",
    "read_verified",
    "resolve_trust_policy",
    "revoke_key",
    "sign_contract",
    "user_approvers_file",
    "valid_run_id",
    "verify_contract",
]
