"""Tokenized corpora on disk: tokenized once, memory-mapped ever after.

Why this module exists: ``data.token_stream`` holds the whole corpus as one Python list of ints
(about 36 bytes per token, built serially) and its training windows are random slices across
document boundaries. That is right for the embedded demo and wrong for real corpora of
gigabytes. Here the corpus is tokenized through Hugging Face ``datasets`` (batched ``map`` in
``num_proc`` processes) into two flat arrays -- 2 or 4 bytes per token -- kept in a
content-addressed cache and memory-mapped on every later run, and windows respect documents.

Cache layout, one folder per key::

    <cache_dir>/<key>/tokens.u16 | tokens.u32    every token, documents back to back (uint16 when the
                                                 vocabulary has <= 65535 entries, else uint32)
    <cache_dir>/<key>/doc_offsets.i64            int64 start of each document, plus the end (docs + 1)
    <cache_dir>/<key>/meta.json                  dtype, counts, key, per-source documents and tokens

``key`` is a sha256 over the tokenizer's identity (class name, ``backend_tokenizer.to_str()`` or
vocabulary and special tokens, the EOS id) and, per source in order, the sha256 of its bytes and
the text field. A folder is built as ``<key>.<pid>.partial`` and renamed into place when
complete, so a half-written cache is never read: a cache is complete when its ``meta.json`` has
the key and the arrays have the sizes it states. Each document is the tokenizer's ids for one
non-empty text (``add_special_tokens=False``) followed by EOS, exactly the documents and ids of
``data.load_texts`` + ``data.token_stream``.

Several processes (``torch.distributed`` initialized, or ``RANK``/``LOCAL_RANK`` set): rank 0
tokenizes, the others wait on a barrier (torch.distributed) or poll for ``meta.json``; the
corpus is tokenized once. ``cache_dir`` must be visible to every process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .fsutil import fsync_dir, utc_now, write_json_atomic

CACHE_FORMAT = 1
META_FILE = "meta.json"
OFFSETS_FILE = "doc_offsets.i64"
_TOKEN_FILES = {"uint16": "tokens.u16", "uint32": "tokens.u32"}
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}  # as data.py
_CHUNK = 8 << 20
_MAP_BATCH = 64  # documents per tokenizer call and per Arrow write: bounds each worker's memory
_DOCS_PER_PROC = 2000  # fewer documents than this per process: tokenized without a process pool
DEFAULT_WAIT_TIMEOUT_S = 7200.0


def default_num_proc() -> int:
    """min(4, usable CPU cores): more processes rarely pay for the copies they make."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


# ------------------------------------------------------------------------------------------
# The corpus and its windows
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """``length`` training tokens: one chunk of one document, or several whole documents /
    document chunks back to back. ``segment_ids[t]`` numbers the piece token ``t`` belongs to
    (0, 1, ...), so a caller can restart position ids or block attention per document."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    docs: tuple[int, ...]

    def pieces(self) -> list[np.ndarray]:
        """The tokens split at the segment boundaries, in row order."""
        cuts = np.flatnonzero(np.diff(self.segment_ids)) + 1
        return np.split(self.tokens, cuts)


@dataclass(frozen=True)
class TokenCorpus:
    """A tokenized corpus: ``tokens`` (memory-mapped, every document followed by EOS),
    ``doc_offsets`` (int64, document ``i`` is ``tokens[doc_offsets[i]:doc_offsets[i + 1]]``),
    ``sources`` (the index into ``source_names`` of each document's file). ``built`` says whether
    this call tokenized it (False: read from the cache, or built by another process)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    sources: np.ndarray
    source_names: list[str]
    path: Path
    meta: dict[str, Any]
    built: bool = False

    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]

    def windows(self, length: int, rng: random.Random, weights: np.ndarray | None = None) -> Iterator[Window]:
        """Endless document-respecting windows of ``length`` tokens (see :class:`CorpusSampler`)."""
        sampler = CorpusSampler(self, weights)
        while True:
            yield sampler.window(length, rng)


class CorpusSampler:
    """Training windows of a :class:`TokenCorpus` that never cross a document boundary unseen.

    ``weights`` (one per document, default 1; 0 leaves a document out, e.g. the held-out split)
    are *token* weights: a window's tokens come from document ``d`` with probability
    proportional to ``weights[d] * len(d)``, so all-ones weights give every token the same
    chance -- the distribution of the old random slices of the token stream. To get there a
    window's first document is drawn with probability ``∝ weights[d] * max(len(d), length)``
    (a long document offers ``len(d) / length`` windows, a short one its whole self), then:

    * a document of at least ``length`` tokens gives one window inside it at a random offset
      (one segment);
    * a shorter one is taken whole and the row is filled with further documents drawn the same
      way, whole while they fit, the last one as a random chunk of the space left (several
      segments). The cut last piece makes token shares approximate, not exact.

    For code written for token streams (the replay rows) the sampler also reads as one flat
    sequence: ``len()`` and slices run over the documents with a positive weight, in corpus
    order.
    """

    def __init__(self, corpus: TokenCorpus, weights: np.ndarray | None = None):
        lengths = corpus.doc_lengths()
        w = np.ones(len(lengths)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != lengths.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise DataError(f"Window weights must be {len(lengths)} finite non-negative numbers, one per document.")
        self.corpus, self.weights, self._lengths = corpus, w, lengths
        self._drawable = np.where(lengths > 0, w, 0.0)
        self._included = np.flatnonzero(self._drawable > 0)
        self._starts = np.concatenate([[0], np.cumsum(lengths[self._included])])
        self._cdfs: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: slice) -> list[int]:
        """Tokens ``index`` of the included documents read back to back (slices only)."""
        if not isinstance(index, slice):
            raise TypeError("CorpusSampler supports slices only")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("CorpusSampler slices take step 1")
        out: list[int] = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            doc = int(self._included[i])
            inside = start - int(self._starts[i])
            n = min(stop - start, int(self._lengths[doc]) - inside)
            out.extend(self.corpus.doc(doc)[inside : inside + n].tolist())
            start, i = start + n, i + 1
        return out

    def window(self, length: int, rng: random.Random) -> Window:
        if length < 1:
            raise ValueError("window length must be positive")
        parts: list[np.ndarray] = []
        docs: list[int] = []
        space = length
        while space:
            doc = self._draw(length, rng)
            tokens = self.corpus.doc(doc)
            if len(tokens) > space:
                offset = rng.randrange(0, len(tokens) - space + 1)
                tokens = tokens[offset : offset + space]
            parts.append(np.asarray(tokens, dtype=np.int64))
            docs.append(doc)
            space -= len(tokens)
        segments = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
        return Window(np.concatenate(parts), segments, tuple(docs))

    def draw(self, length: int, rng: random.Random) -> list[list[int]]:
        """One window as its document pieces (``data.DocumentWindows``, used by ``build_stage_rows``)."""
        return [piece.tolist() for piece in self.window(length, rng).pieces()]

    def upsampled(self, min_length: int, factor: float) -> tuple[CorpusSampler, dict[str, dict[str, float]]]:
        """This sampler with :func:`long_document_upsampling` applied on top of its weights."""
        weights, mix = long_document_upsampling(self.corpus, min_length, factor, base_weights=self.weights)
        return CorpusSampler(self.corpus, weights), mix

    def _draw(self, length: int, rng: random.Random) -> int:
        cdf = self._cdfs.get(length)
        if cdf is None:
            cdf = self._cdfs[length] = np.cumsum(self._drawable * np.maximum(self._lengths, length))
            if not len(self._included):
                raise DataError("No training document is left to draw windows from (all weights are 0).",
                                hint="Check the training data and data.eval_fraction.")
        doc = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return min(doc, int(self._included[-1]))  # rounding at the very top of the cdf


def long_document_upsampling(
    corpus: TokenCorpus, min_length: int, factor: float, *, base_weights: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Per-source length upsampling (Fu et al. 2024, "Data Engineering for Scaling Language
    Models to 128K Context"): within each source, documents of at least ``min_length`` tokens
    get ``factor`` times the weight of the others, then each source's weights are rescaled so
    that its share of the tokens stays what it was. Long-context ability comes from more long
    documents; keeping the domain mix keeps what the model knows.

    Returns the token weights per document (for :class:`CorpusSampler`; ``base_weights`` --
    e.g. 0 for held-out documents -- are applied first) and the mix per source name:
    ``token_share_before/after``, ``long_doc_share_before/after`` (share of the source's tokens
    in long documents), ``docs`` and ``long_docs``. Callers log it.
    """
    if min_length < 1 or not factor > 0:
        raise DataError(f"Long-document upsampling needs min_length >= 1 and factor > 0 (got {min_length}, {factor}).",
                        hint="Fix data.long_document_upsampling in the recipe.")
    lengths = corpus.doc_lengths().astype(np.float64)
    base = np.ones_like(lengths) if base_weights is None else np.asarray(base_weights, dtype=np.float64)
    long = corpus.doc_lengths() >= min_length
    boosted = base * np.where(long, factor, 1.0)
    weights = np.zeros_like(lengths)
    total_before = float(np.sum(base * lengths)) or 1.0
    mix: dict[str, dict[str, float]] = {}
    for s, name in enumerate(corpus.source_names):
        mine = corpus.sources == s
        before = float(np.sum((base * lengths)[mine]))
        after = float(np.sum((boosted * lengths)[mine]))
        if after > 0:
            weights[mine] = boosted[mine] * (before / after)
        long_before = float(np.sum((base * lengths)[mine & long]))
        mix[name] = {
            "token_share_before": before / total_before,
            "token_share_after": float(np.sum((weights * lengths)[mine])) / total_before,
            "long_doc_share_before": long_before / before if before else 0.0,
            "long_doc_share_after": long_before * factor / after if after else 0.0,
            "docs": float(np.count_nonzero(mine & (base > 0))),
            "long_docs": float(np.count_nonzero(mine & long & (base > 0))),
        }
    return weights, mix


# ------------------------------------------------------------------------------------------
# Sources and the cache key
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One data input: a file (``builder`` names its ``datasets`` builder) or a saved datasets folder."""

    path: Path
    builder: str | None  # None: a Dataset.save_to_disk folder
    text_field: str
    sha256: str
    size: int


def describe_sources(paths: Sequence[str | Path], text_field: str) -> list[Source]:
    """Each input checked like ``data.load_texts`` (exists, a known format) and hashed."""
    if not paths:
        raise DataError("No training data files were given.", hint="Set data.train in the recipe.")
    return [_describe(Path(p), text_field) for p in paths]


def _describe(path: Path, text_field: str) -> Source:
    if not path.exists():
        raise DataError(f"Data file {path} does not exist.", hint="Fix the path in data.train / data.eval.")
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            raise DataError(f"Data folder {path} is not a saved `datasets` folder (no dataset_info.json/state.json).",
                            hint="Point data.train at files (.jsonl/.txt/.parquet) or a Dataset.save_to_disk folder.")
        digest, size = _hash_folder(path)
        return Source(path, None, text_field, digest, size)
    if not path.is_file():
        raise DataError(f"Data file {path} is not a regular file.", hint="Point data.train / data.eval at regular files.")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"Data file {path} has an unsupported extension '{path.suffix}'.",
                        hint=f"Use one of {', '.join(sorted(_BUILDERS))} or a saved datasets folder.")
    digest, size = _hash_file(path)
    return Source(path, builder, "text" if builder == "text" else text_field, digest, size)


def _hash_file(path: Path, copy_to: Path | None = None) -> tuple[str, int]:
    """(sha256, size) of the bytes read; with ``copy_to`` those very bytes are also written there."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as src, (open(copy_to, "wb") if copy_to else nullcontext()) as dst:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            if dst is not None:
                dst.write(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _hash_folder(path: Path) -> tuple[str, int]:
    h, total = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest, size = _hash_file(file)
        h.update(f"{file.relative_to(path).as_posix()}\0{size}\0{digest}\n".encode())
        total += size
    return h.hexdigest(), total


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the ids: the class, the fast tokenizer's full definition (else the
    vocabulary and special tokens), and the EOS id appended to every document."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps({"vocab": tokenizer.get_vocab(), "special": tokenizer.special_tokens_map},
                          sort_keys=True, default=str)
    head = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\0eos={tokenizer.eos_token_id}\0"
    return hashlib.sha256((head + body).encode()).hexdigest()


def corpus_key(tokenizer: Any, sources: Sequence[Source]) -> str:
    payload = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
               "sources": [{"sha256": s.sha256, "text_field": s.text_field} for s in sources]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# tokenize_corpus: the cache, and who builds it
# ------------------------------------------------------------------------------------------


def tokenize_corpus(
    paths: Sequence[str | Path],
    text_field: str,
    tokenizer: Any,
    cache_dir: str | Path,
    num_proc: int | None = None,
    *,
    verify: Callable[[Path, int, str], None] | None = None,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
) -> TokenCorpus:
    """The corpus of ``paths`` (the formats of ``data.load_texts``) tokenized by ``tokenizer``,
    from the cache under ``cache_dir`` or built into it (``num_proc`` processes, default
    :func:`default_num_proc`). On rank 0, ``verify(path, size, sha256)`` is called for every file
    as hashed, before the cache is read or built (the run checks the bytes against its
    approval); the bytes tokenized are the bytes hashed (a private copy made while hashing)."""
    sources = describe_sources(paths, text_field)
    key = corpus_key(tokenizer, sources)
    cache = Path(cache_dir)
    target = cache / key
    rank, collective = process_rank()
    built = False
    if rank == 0:
        error: BaseException | None = None
        try:
            for s in sources:
                if verify is not None and s.builder is not None:
                    verify(s.path, s.size, s.sha256)
            built = _ensure_built(target, key, sources, tokenizer, num_proc or default_num_proc())
        except BaseException as exc:  # noqa: BLE001 - the waiting processes are told, then it is re-raised
            error = exc
            if not collective:
                _write_failure(cache, key, exc)
        if collective:
            _barrier()
        if error is not None:
            raise error
    elif collective:
        _barrier()
    else:
        _wait_for(target, key, rank, wait_timeout_s)
    return open_corpus(target, key, [str(s.path) for s in sources], built=built)


def open_corpus(folder: Path, key: str | None = None, source_names: list[str] | None = None, *,
                built: bool = False) -> TokenCorpus:
    """Memory-map a complete cache folder (DataError when it is not one)."""
    meta = _complete_meta(folder, key)
    if meta is None:
        raise DataError(f"{folder} is not a complete tokenized-corpus cache (no meta.json with a matching key, or "
                        "arrays of the wrong size).",
                        hint="The process that tokenizes (rank 0) failed or has not finished: see its log.")
    n_tokens, n_docs = meta["num_tokens"], meta["num_docs"]
    tokens = (np.memmap(folder / meta["tokens_file"], dtype=meta["dtype"], mode="r", shape=(n_tokens,))
              if n_tokens else np.zeros(0, dtype=meta["dtype"]))
    offsets = np.memmap(folder / OFFSETS_FILE, dtype=np.int64, mode="r", shape=(n_docs + 1,))
    per_source = [s["docs"] for s in meta["sources"]]
    sources = np.repeat(np.arange(len(per_source), dtype=np.int32), per_source)
    names = source_names or [s["name"] for s in meta["sources"]]
    return TokenCorpus(tokens, offsets, sources, names, folder, meta, built=built)


def process_rank() -> tuple[int, bool]:
    """(this process's rank, whether torch.distributed is initialized). Without a process group
    the rank comes from ``RANK`` (else ``LOCAL_RANK``); none set: 0."""
    dist = sys.modules.get("torch.distributed")  # never imports torch: not imported, not initialized
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), True
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return int(value), False
            except ValueError:
                raise DataError(f"Environment variable {var}={value!r} is not a process rank.",
                                hint=f"Unset {var} or set it to an integer.") from None
    return 0, False


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _complete_meta(folder: Path, key: str | None) -> dict[str, Any] | None:
    """The folder's meta.json if it is a complete cache for ``key`` (None otherwise)."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = (meta.get("format") == CACHE_FORMAT and (key is None or meta.get("key") == key)
                    and (folder / meta["tokens_file"]).stat().st_size == meta["num_tokens"] * itemsize
                    and (folder / OFFSETS_FILE).stat().st_size == (meta["num_docs"] + 1) * 8)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def _failure_file(cache: Path, key: str) -> Path:
    return cache / f"{key}.failed"


def _write_failure(cache: Path, key: str, exc: BaseException) -> None:
    try:
        _failure_file(cache, key).write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
    except OSError:
        pass  # the waiting processes then time out, with their own message


def _wait_for(target: Path, key: str, rank: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll until rank 0 has renamed a complete cache into place, it reported a failure, or the
    timeout passes (DataError)."""
    started = time.time()
    failure = _failure_file(target.parent, key)
    while _complete_meta(target, key) is None:
        try:
            if failure.stat().st_mtime >= started - 1:  # an older marker is a previous run's
                raise DataError(f"Rank 0 failed to tokenize the corpus for {target}: "
                                f"{failure.read_text(encoding='utf-8')}", hint="See rank 0's error.")
        except FileNotFoundError:
            pass
        if time.time() - started > timeout_s:
            raise DataError(f"Rank {rank} waited {timeout_s:.0f} s for rank 0 to tokenize the corpus into {target}; "
                            f"no complete {META_FILE} appeared.",
                            hint="Check that rank 0 runs and sees the same cache folder (data.cache_dir), or allow "
                            "a longer wait for a very large corpus.")
        time.sleep(poll_s)


def _ensure_built(target: Path, key: str, sources: list[Source], tokenizer: Any, num_proc: int) -> bool:
    """Build the cache unless a complete one is there; True when this call built it."""
    if _complete_meta(target, key) is not None:
        return False
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create the tokenized-corpus cache folder {cache}: {exc.strerror}.",
                        hint="Set data.cache_dir to a writable folder.") from None
    _failure_file(cache, key).unlink(missing_ok=True)
    partial = cache / f"{key}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _build(partial, key, sources, tokenizer, num_proc)
        _publish(partial, target, key)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return True


def _publish(partial: Path, target: Path, key: str) -> None:
    """Rename the finished folder into place; a complete cache that another process published
    first wins (ours is dropped), an incomplete leftover is replaced."""
    try:
        os.rename(partial, target)
    except OSError:
        if _complete_meta(target, key) is not None:
            return
        shutil.rmtree(target, ignore_errors=True)
        os.rename(partial, target)
    fsync_dir(target.parent)


# ------------------------------------------------------------------------------------------
# Building: private copies, datasets map, flat arrays
# ------------------------------------------------------------------------------------------


def _build(folder: Path, key: str, sources: list[Source], tokenizer: Any, num_proc: int) -> None:
    started = time.time()
    dtype = "uint16" if len(tokenizer) <= 65535 else "uint32"
    work = folder / "work"
    work.mkdir()
    per_source: list[dict[str, Any]] = []
    with open(folder / _TOKEN_FILES[dtype], "wb") as tok_fh, open(folder / OFFSETS_FILE, "wb") as off_fh:
        np.zeros(1, dtype=np.int64).tofile(off_fh)
        total = 0
        for i, source in enumerate(sources):
            ds = _tokenized(source, _private_copy(source, work / str(i)), tokenizer, dtype, num_proc, work / "hf")
            docs, tokens = _append(ds, tok_fh, off_fh, dtype, total)
            total += tokens
            per_source.append({"name": str(source.path), "sha256": source.sha256, "bytes": source.size,
                               "text_field": source.text_field, "docs": docs, "tokens": tokens})
            del ds
        _sync(tok_fh)
        _sync(off_fh)
    shutil.rmtree(work)
    n_docs = sum(s["docs"] for s in per_source)
    if not n_docs:
        raise DataError(f"No text found in {[str(s.path) for s in sources]}.", hint="The data files are empty.")
    write_json_atomic(folder / META_FILE, {
        "format": CACHE_FORMAT, "key": key, "dtype": dtype, "tokens_file": _TOKEN_FILES[dtype],
        "offsets_file": OFFSETS_FILE, "num_tokens": total, "num_docs": n_docs,
        "eos_token_id": tokenizer.eos_token_id, "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer), "num_proc": num_proc, "sources": per_source,
        "created_at": utc_now(), "build_seconds": round(time.time() - started, 3)})


def _sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _private_copy(source: Source, dest: Path) -> Path:
    """A file is copied while hashed, and the copy is tokenized: the tokens come from exactly
    the bytes the key (and the run's approval) names. A saved datasets folder is used in place
    (the run passes its approved private copy) and re-hashed after tokenizing (``_tokenized``)."""
    if source.builder is None:
        return source.path
    dest.mkdir(parents=True)
    copy = dest / source.path.name
    digest, size = _hash_file(source.path, copy_to=copy)
    if (digest, size) != (source.sha256, source.size):
        raise DataError(f"Data file {source.path} changed while it was being read (sha256 {source.sha256[:12]}... "
                        f"before, {digest[:12]}... now).", hint="Do not modify the data files during a run.")
    return copy


def _tokenized(source: Source, path: Path, tokenizer: Any, dtype: str, num_proc: int, hf_cache: Path) -> Any:
    """The source's documents as a ``datasets`` column ``input_ids`` (on disk, in ``hf_cache``)."""
    import datasets

    ds = _load(source, path, hf_cache)
    feature = ds.features.get(source.text_field)
    if feature is None:
        raise DataError(f"Data file {source.path} has no '{source.text_field}' field (columns: {ds.column_names}).",
                        hint="Set data.text_field to the column holding the text.")
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")):
        raise DataError(f"Data file {source.path}: field '{source.text_field}' is not text (its type is {feature}).",
                        hint="Set data.text_field to the column holding the text.")
    procs = max(1, min(num_proc, len(ds) // _DOCS_PER_PROC))
    out = ds.map(
        _Encoder(tokenizer, source.text_field), batched=True, batch_size=_MAP_BATCH, writer_batch_size=_MAP_BATCH,
        remove_columns=ds.column_names,
        num_proc=procs if procs > 1 else None,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value(dtype))}),
        cache_file_name=str(hf_cache / f"tokens-{source.sha256[:16]}.arrow"),
        new_fingerprint=f"tokens-{source.sha256[:16]}", desc=f"tokenizing {source.path.name}")
    if source.builder is None and _hash_folder(source.path) != (source.sha256, source.size):
        raise DataError(f"Data folder {source.path} changed while it was being read.",
                        hint="Do not modify the data files during a run.")
    return out


def _load(source: Source, path: Path, hf_cache: Path) -> Any:
    import datasets

    try:
        if source.builder is None:
            ds = datasets.load_from_disk(str(path))
            return ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source.builder, data_files=str(path), split="train", cache_dir=str(hf_cache))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for malformed files
        raise DataError(
            f"Could not read data file {source.path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            hint="Check that the file is valid (one JSON object per line for .jsonl).",
        ) from None


@dataclass
class _Encoder:
    """The batched ``map`` function (picklable for the worker processes): the ids of each
    non-empty text, then EOS; empty and whitespace-only texts are dropped, as ``load_texts`` does."""

    tokenizer: Any
    text_field: str
    eos: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.eos = self.tokenizer.eos_token_id

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts = [t for t in batch[self.text_field] if t and t.strip()]
        ids = self._encode(texts) if texts else []
        if self.eos is not None:
            for row in ids:
                row.append(self.eos)
        return {"input_ids": ids}

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """The fast tokenizer's ``encode_batch_fast`` (the same ids as ``tokenizer(texts)``, without
        offsets: about 1.5x faster) where there is one, else the tokenizer's own call."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def _append(ds: Any, tok_fh: Any, off_fh: Any, dtype: str, start: int) -> tuple[int, int]:
    """Stream the tokenized column into the flat files; returns (documents, tokens) added.
    The Arrow files are read batch by batch (not memory-mapped), so memory stays one batch."""
    import pyarrow.compute as pc

    docs, tokens = 0, 0
    for batch in _record_batches(ds):
        column = batch.column(0)
        column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).tofile(tok_fh)
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        (start + tokens + np.cumsum(lengths)).tofile(off_fh)
        docs += len(lengths)
        tokens += int(lengths.sum())
    return docs, tokens


def _record_batches(ds: Any) -> Iterator[Any]:
    import pyarrow as pa

    files = [f["filename"] for f in ds.cache_files]
    if not files:  # an in-memory dataset
        yield from ds.data.to_batches()
        return
    for name in files:  # in order: the map's shards are contiguous slices of the documents
        with pa.OSFile(name) as src:
            yield from pa.ipc.open_stream(src)
