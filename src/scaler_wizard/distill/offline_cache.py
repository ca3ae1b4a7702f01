"""Offline teacher cache: the teacher's top-k log-probabilities over fixed token rows, computed
once and reused across epochs and runs with no teacher in memory.

Layout of a cache folder::

    manifest.json               what the cache is and what it was made from (below)
    shard-00000.safetensors     input_ids [n, L] int32, topk_ids [n, L, k] int32,
    shard-00001.safetensors     topk_logprobs [n, L, k] float32|float16
    ...

``topk_logprobs[r, p]`` are the k largest teacher log-probabilities (log-softmax of logits/T at
the manifest's ``temperature``) of the token following position ``p`` of row ``r``, with their
token ids in ``topk_ids``; the distillation loss renormalises them over the support and can
re-temper them exactly (see :mod:`scaler_wizard.distill.losses`).

The manifest records ``rows_sha256`` (a hash of the token rows the cache was made from), ``k``,
``temperature``, ``length``, the teacher's identity (id given by the user, a hash of its config,
vocabulary size) and each shard's sha256. :meth:`OfflineCache.open` re-hashes every shard and the
rows stored in them, and :meth:`OfflineCache.verify_rows` checks the rows a run intends to train on:
a cache silently reused with other data, another length, or edited shards is an error, never a
wrong teacher. Files are safetensors and JSON only (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

CACHE_FORMAT = "scaler-wizard/distill-topk-cache"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOGPROB_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------------------------
# Hashing (pure)
# --------------------------------------------------------------------------------------------


def rows_sha256(rows: Iterable[Sequence[int]]) -> str:
    """sha256 over the token rows: each row as its length then its ids, int32 little-endian, so
    that the same ids split into different rows hash differently."""
    digest = hashlib.sha256()
    for row in rows:
        ids = array("i", row)
        if sys.byteorder == "big":
            ids.byteswap()
        digest.update(_le(len(ids)))
        digest.update(ids.tobytes())
    return digest.hexdigest()


def _le(n: int) -> bytes:
    return int(n).to_bytes(4, "little", signed=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: Any) -> str:
    """Hash of a transformers config (its JSON form) — part of the teacher's identity."""
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def stream_windows(stream: Sequence[int], length: int, max_rows: int | None = None) -> list[list[int]]:
    """Consecutive, non-overlapping ``length``-token windows of a token stream (the rows a cache is
    built over; no seed involved, so the same data always gives the same rows)."""
    if length <= 0:
        raise DataError(f"length={length} must be positive.")
    n = len(stream) // length if max_rows is None else min(len(stream) // length, max_rows)
    if n == 0:
        raise DataError(f"The data has {len(stream)} tokens, fewer than one {length}-token row.",
                        hint="Add more text or lower --length.")
    return [list(stream[i * length : (i + 1) * length]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def teacher_topk(hidden, weight, bias, *, k: int, temperature: float, chunk_size: int = 512):
    """Top-k log-probabilities ``[b, t, k]`` and ids from hidden states ``[b, t, h]``, in sequence
    chunks so the full-vocabulary logits exist for one chunk at a time."""
    import torch
    import torch.nn.functional as F

    ids_out, lp_out = [], []
    for start in range(0, hidden.size(1), chunk_size):
        logits = F.linear(hidden[:, start : start + chunk_size], weight, bias).float()
        logprobs = F.log_softmax(logits / temperature, dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
        ids_out.append(ids)
        lp_out.append(values)
    return torch.cat(ids_out, dim=1), torch.cat(lp_out, dim=1)


def _check_rows(rows: Sequence[Sequence[int]], vocab_size: int) -> int:
    if not rows:
        raise DataError("No token rows to cache.", hint="Give more data or a smaller --length.")
    length = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != length:
            raise DataError(f"Token row {i} has {len(row)} tokens, row 0 has {length}; cache rows must be equal.")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise DataError(f"Token row {i} holds id {bad[0]} outside the teacher's vocabulary of {vocab_size}.")
    return length


def build_cache(
    model: Any,
    rows: Sequence[Sequence[int]],
    output_dir: Path,
    *,
    k: int,
    teacher_id: str,
    temperature: float = 1.0,
    batch_size: int = 4,
    rows_per_shard: int = 256,
    chunk_size: int = 512,
    logprob_dtype: str = "float32",
    overwrite: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Run ``model`` (a causal LM, the teacher) over ``rows`` and write the cache; returns the
    manifest. The folder is written under a temporary name and renamed when complete, so an
    interrupted build never leaves a folder that looks valid."""
    import torch

    from .. import __version__
    from ..fsutil import utc_now, write_json_atomic
    from ..models import decoder_and_head, frozen_output_head

    output_dir = Path(output_dir)
    decoder, head = decoder_and_head(model)[0], frozen_output_head(model)
    vocab = int(head.weight.shape[0])
    if not 0 < k <= vocab:
        raise DataError(f"k={k} must be between 1 and the teacher's vocabulary size {vocab}.")
    if not temperature > 0:
        raise DataError(f"temperature={temperature} must be positive.")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise DataError(f"logprob dtype {logprob_dtype!r} is not one of {list(LOGPROB_DTYPES)}.")
    length = _check_rows(rows, vocab)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise DataError(f"Cache folder {output_dir} exists and is not empty.",
                            hint="Choose another output folder or pass overwrite (--overwrite).")
    tmp = output_dir.with_name(output_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shards = [
                _write_shard(decoder, head, rows[start : start + rows_per_shard], start, tmp / shard_name(index),
                             k=k, temperature=temperature, batch_size=batch_size, chunk_size=chunk_size,
                             store_dtype=getattr(torch, logprob_dtype), progress=progress)
                for index, start in enumerate(range(0, len(rows), rows_per_shard))
            ]
    finally:
        model.train(was_training)

    manifest = {
        "format": CACHE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created_at": utc_now(),
        "scaler_wizard_version": __version__,
        "teacher": {"id": teacher_id, "config_sha256": config_sha256(model.config), "vocab_size": vocab},
        "k": k,
        "temperature": float(temperature),
        "length": length,
        "n_rows": len(rows),
        "logprob_dtype": logprob_dtype,
        "rows_sha256": rows_sha256(rows),
        "shards": shards,
    }
    write_json_atomic(tmp / MANIFEST_NAME, manifest)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    return manifest


def _write_shard(decoder: Any, head: Any, shard_rows: Sequence[Sequence[int]], shard_start: int, path: Path, *,
                 k: int, temperature: float, batch_size: int, chunk_size: int, store_dtype: Any,
                 progress: Any) -> dict[str, Any]:
    """One safetensors shard of the cache: the rows, the teacher's top-k ids and log-probs."""
    import torch
    from safetensors.torch import save_file

    device = head.weight.device
    ids_parts, lp_parts = [], []
    for b in range(0, len(shard_rows), batch_size):
        input_ids = torch.tensor(shard_rows[b : b + batch_size], dtype=torch.long, device=device)
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        ids, lps = teacher_topk(hidden, head.weight, head.bias, k=k, temperature=temperature, chunk_size=chunk_size)
        ids_parts.append(ids.to("cpu", torch.int32))
        lp_parts.append(lps.to("cpu", store_dtype))
        if progress is not None:
            progress(len(input_ids))
    tensors = {
        "input_ids": torch.tensor(shard_rows, dtype=torch.int32),
        "topk_ids": torch.cat(ids_parts).contiguous(),
        "topk_logprobs": torch.cat(lp_parts).contiguous(),
    }
    save_file(tensors, str(path), metadata={"format": CACHE_FORMAT})
    return {"file": path.name, "rows": [shard_start, shard_start + len(shard_rows)], "sha256": file_sha256(path)}


# --------------------------------------------------------------------------------------------
# Loading and verification
# --------------------------------------------------------------------------------------------

_REQUIRED = {"format": str, "schema_version": int, "teacher": dict, "k": int, "temperature": (int, float),
             "length": int, "n_rows": int, "logprob_dtype": str, "rows_sha256": str, "shards": list}


@dataclass
class CacheRows:
    """Rows looked up from the cache, as torch tensors: ``input_ids [n, L]`` (long),
    ``topk_ids [n, L, k]`` (long), ``topk_logprobs [n, L, k]`` (float32)."""

    input_ids: Any
    topk_ids: Any
    topk_logprobs: Any


class OfflineCache:
    """A verified cache folder. Open with :meth:`open`; every check runs there, once."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest
        self._handles: dict[str, Any] = {}
        self._row_to_shard = [(s["rows"][0], s["rows"][1], s["file"]) for s in manifest["shards"]]

    # -- properties of the cache
    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def length(self) -> int:
        return int(self.manifest["length"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["teacher"]["vocab_size"])

    def __len__(self) -> int:
        return self.n_rows

    @classmethod
    def open(cls, folder: Path, *, verify_shards: bool = True) -> OfflineCache:
        folder = Path(folder)
        manifest = _read_manifest(folder)
        cache = cls(folder, manifest)
        if verify_shards:
            cache._verify_shards()
        return cache

    def _verify_shards(self) -> None:
        from safetensors import safe_open

        expected_start = 0
        stored_rows: list[list[int]] = []
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise DataError(f"Cache shard {path} is missing.", hint="Rebuild the cache with `scaler-wizard distill cache`.")
            actual = file_sha256(path)
            if actual != shard["sha256"]:
                raise DataError(
                    f"Cache shard {path} was modified: sha256 {actual[:12]}... does not match the manifest "
                    f"({shard['sha256'][:12]}...).",
                    hint="Rebuild the cache with `scaler-wizard distill cache`; do not edit shards by hand.",
                )
            start, end = shard["rows"]
            if start != expected_start or end <= start:
                raise DataError(f"Cache manifest {self.folder / MANIFEST_NAME}: shard {shard['file']} covers rows "
                                f"{start}..{end}, expected to start at {expected_start}.")
            expected_start = end
            with safe_open(str(path), framework="pt") as fh:
                shapes = {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}  # noqa: SIM118 - safe_open, not a dict
                n = end - start
                want = {"input_ids": (n, self.length), "topk_ids": (n, self.length, self.k),
                        "topk_logprobs": (n, self.length, self.k)}
                if shapes != want:
                    raise DataError(f"Cache shard {path} holds tensors {shapes}, the manifest implies {want}.",
                                    hint="Rebuild the cache; the manifest and the shards disagree.")
                stored_rows.extend(fh.get_tensor("input_ids").tolist())
        if expected_start != self.n_rows:
            raise DataError(f"Cache manifest {self.folder / MANIFEST_NAME}: shards cover {expected_start} rows, "
                            f"n_rows says {self.n_rows}.")
        if rows_sha256(stored_rows) != self.manifest["rows_sha256"]:
            raise DataError(f"Cache {self.folder}: the token rows in the shards do not match rows_sha256 of the manifest.",
                            hint="Rebuild the cache with `scaler-wizard distill cache`.")

    def verify_rows(self, rows: Sequence[Sequence[int]]) -> None:
        """Raise DataError unless ``rows`` are exactly the rows this cache was made from."""
        digest = rows_sha256(rows)
        if digest != self.manifest["rows_sha256"]:
            lengths = sorted({len(r) for r in rows})
            raise DataError(
                f"The offline teacher cache {self.folder} was made from other data: {self.n_rows} rows of "
                f"{self.length} tokens (sha256 {self.manifest['rows_sha256'][:12]}...), given {len(rows)} rows of "
                f"length {lengths} (sha256 {digest[:12]}...).",
                hint="Rebuild the cache for this data (`scaler-wizard distill cache`) or use the data it was made from.",
            )

    def verify_teacher(self, *, vocab_size: int) -> None:
        """Raise DataError unless the cache's teacher shares the student's vocabulary size."""
        if vocab_size != self.vocab_size:
            raise DataError(
                f"The offline teacher cache {self.folder} was made with a vocabulary of {self.vocab_size} tokens; "
                f"the student has {vocab_size}.",
                hint="Build the cache with a teacher that shares the student's tokenizer.",
            )

    def token_rows(self) -> list[list[int]]:
        """The rows the cache was made from (read back from the shards)."""
        out: list[list[int]] = []
        for _, _, name in self._row_to_shard:
            out.extend(self._handle(name).get_tensor("input_ids").tolist())
        return out

    def lookup(self, indices: Sequence[int]) -> CacheRows:
        """The cached rows ``indices`` (stacked in that order)."""
        import torch

        parts: dict[str, list[Any]] = {"input_ids": [], "topk_ids": [], "topk_logprobs": []}
        for index in indices:
            if not 0 <= index < self.n_rows:
                raise DataError(f"Row {index} is outside the offline cache {self.folder} ({self.n_rows} rows).")
            start, name = self._shard_of(index)
            fh = self._handle(name)
            for key, values in parts.items():
                values.append(fh.get_slice(key)[index - start : index - start + 1])
        return CacheRows(
            input_ids=torch.cat(parts["input_ids"]).long(),
            topk_ids=torch.cat(parts["topk_ids"]).long(),
            topk_logprobs=torch.cat(parts["topk_logprobs"]).float(),
        )

    def _shard_of(self, index: int) -> tuple[int, str]:
        for start, end, name in self._row_to_shard:
            if start <= index < end:
                return start, name
        raise DataError(f"Row {index} is in no shard of {self.folder}.")

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{folder} is not an offline teacher cache (no {MANIFEST_NAME}).",
                        hint="Build one with `scaler-wizard distill cache MODEL DATA... --output FOLDER`.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}).", hint="Rebuild the cache.") from None
    problems = [f"{key} ({'missing' if key not in manifest else 'wrong type'})"
                for key, kind in _REQUIRED.items()
                if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool)]
    if problems:
        raise DataError(f"{path} is malformed: {', '.join(problems)}.", hint="Rebuild the cache.")
    if manifest["format"] != CACHE_FORMAT:
        raise DataError(f"{path} has format {manifest['format']!r}, expected {CACHE_FORMAT!r}.")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise DataError(f"{path} has schema_version {manifest['schema_version']}; this Scaler Wizard reads up to "
                        f"{SCHEMA_VERSION}.", hint="Upgrade scaler-wizard or rebuild the cache.")
    return manifest
