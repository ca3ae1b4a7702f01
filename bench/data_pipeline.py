"""The tokenized-corpus cache on a large corpus (issue 15, item 3: data pipeline for real corpora).

Generates a seeded synthetic jsonl corpus of ``--size-mb`` MiB in a temporary folder (words drawn
from the shipped demo text's vocabulary with their frequencies; 90% of the documents short --
median ~300 words -- and 10% long -- median ~8,000 words, at most 100,000), then, each step in a
fresh subprocess whose whole process tree (the ``datasets`` map workers included) is sampled
every 0.1 s for its memory, three ways (see ``memory``): Rss (summed over the processes: pages
that forked workers share with their parent, and clean pages of the memory-mapped Arrow files,
counted in every process that maps them), Pss (shared pages split: the tree's real footprint)
and Pss_Anon (without file-backed pages, which the kernel can drop):

1. the first ``tokenize_corpus`` with the demo tokenizer (builds the cache): wall time, the
   three peaks, the child's own figures after its imports (the baseline), the token array's
   bytes, and each peak / token bytes (target <= 2x; at small sizes the ~0.4 GB Python
   baseline dominates, so the peaks above the baseline are reported beside them);
2. the second call, read from the cache (target <= 5 s for 1 GB): the call's own wall time;
3. two processes (``RANK=0`` and ``RANK=1``, no process group: rank 1 polls) on a fresh cache:
   how many of them tokenized (target: 1).

Prints one JSON object and writes it to ``--out`` (default bench/results/data_pipeline.json).

    OMP_NUM_THREADS=1 .venv/bin/python bench/data_pipeline.py                   # 1 GiB (minutes)
    OMP_NUM_THREADS=1 .venv/bin/python bench/data_pipeline.py --size-mb 50 --num-proc 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DEMO = ROOT / "src" / "scaler_wizard" / "assets"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
SEED = 15


# ------------------------------------------------------------------------------------------
# the corpus
# ------------------------------------------------------------------------------------------


def generate_corpus(path: Path, size_bytes: int, seed: int = SEED) -> dict[str, Any]:
    """A jsonl file of about ``size_bytes``: documents of random words, unigram frequencies of
    the demo text, lengths from a short/long log-normal mixture. Deterministic for a seed."""
    import numpy as np

    counts: Counter[str] = Counter()
    for line in (DEMO / "demo_data" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        counts.update(json.loads(line)["text"].split())
    words = np.array(sorted(counts))
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    cdf = np.cumsum(freq / freq.sum())
    rng = np.random.default_rng(seed)
    written = docs = long_docs = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_bytes:
            is_long = rng.random() < 0.1
            n = int(min(100_000, max(5, rng.lognormal(np.log(8000 if is_long else 300), 0.8))))
            idx = np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)
            line = json.dumps({"text": " ".join(words[idx].tolist())}) + "\n"
            fh.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
            long_docs += is_long
    return {"bytes": path.stat().st_size, "docs": docs, "long_docs": long_docs, "vocabulary": len(words)}


# ------------------------------------------------------------------------------------------
# one measured step: a subprocess, its tree's memory sampled
# ------------------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """One process's Rss, Pss and Pss_Anon in bytes (``/proc/<pid>/smaps_rollup``). Rss counts
    pages shared with other processes (forked workers share their parent's) and clean pages of
    memory-mapped files (the Arrow files ``datasets`` maps) in full; Pss splits shared pages
    among their users; Pss_Anon leaves out file-backed pages, which the kernel can drop."""
    fields = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "pss_anon"}
    out = dict.fromkeys(fields.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            name, _, rest = line.partition(" ")
            if name in fields:
                out[fields[name]] = int(rest.split()[0]) * 1024
    return out


class TreeSampler(threading.Thread):
    """Peak memory (:func:`memory`, summed) of a process and all its descendants, sampled every
    ``interval_s``; each figure's peak on its own."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = {"rss": 0, "pss": 0, "pss_anon": 0, "processes": 0}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                pids = [self.pid, *(c.pid for c in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                break
            total = {"rss": 0, "pss": 0, "pss_anon": 0, "processes": 0}
            for pid in pids:
                try:
                    m = memory(pid)
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                for k, v in m.items():
                    total[k] += v
                total["processes"] += 1
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measured(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run this script as a child with ``args``; (its JSON answer, the tree's peaks and wall time)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            env={**os.environ, **CHILD_ENV, **(env or {})}, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), {
        "process_wall_s": round(time.perf_counter() - started, 3), "peak_processes": sampler.peak["processes"],
        **{f"peak_{k}_bytes": sampler.peak[k] for k in ("rss", "pss", "pss_anon")}}


def child(data: Path, cache: Path, num_proc: int | None) -> dict[str, Any]:
    """One tokenize_corpus call; the RSS after the imports is the baseline."""
    import datasets  # noqa: F401 - imported before the baseline: part of it, not of the tokenization
    import pyarrow  # noqa: F401
    from transformers import AutoTokenizer

    from scaler_wizard.corpus import tokenize_corpus

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "demo_model")
    baseline = memory(os.getpid())
    started = time.perf_counter()
    corpus = tokenize_corpus([data], "text", tokenizer, cache, num_proc)
    seconds = time.perf_counter() - started
    return {"call_wall_s": round(seconds, 3), "built": corpus.built, "tokens": corpus.num_tokens(),
            "docs": corpus.num_docs(), "token_array_bytes": int(corpus.tokens.nbytes), "dtype": str(corpus.tokens.dtype),
            "num_proc": corpus.meta["num_proc"], **{f"baseline_{k}_bytes": v for k, v in baseline.items()}}


def two_processes(data: Path, cache: Path, num_proc: int | None) -> dict[str, Any]:
    """RANK=1 started first (it must wait), then RANK=0; how many tokenized."""
    args = [sys.executable, __file__, "--child", "--data", str(data), "--cache", str(cache)]
    if num_proc:
        args += ["--num-proc", str(num_proc)]
    started = time.perf_counter()
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **CHILD_ENV, "RANK": str(rank), "WORLD_SIZE": "2"})
             for rank in (1, 0)]
    answers = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a two-process child failed with exit code {p.returncode}")
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return {"tokenizations": sum(a["built"] for a in answers), "wall_s": round(time.perf_counter() - started, 3),
            "same_tokens": len({a["tokens"] for a in answers}) == 1, "cache_folders": len(list(cache.iterdir()))}


# ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="corpus size in MiB (default 1024)")
    ap.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: min(4, cores))")
    ap.add_argument("--workdir", type=Path, default=None, help="where the corpus and caches go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_pipeline.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.data, args.cache, args.num_proc)))
        return

    work = Path(tempfile.mkdtemp(prefix="sw-data-bench-", dir=args.workdir))
    try:
        result = run_bench(work, args.size_mb, args.num_proc)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def run_bench(work: Path, size_mb: float, num_proc: int | None) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from harness import machine_state

    data = work / "corpus.jsonl"
    t0 = time.perf_counter()
    corpus = generate_corpus(data, int(size_mb * 2**20))
    generation_s = time.perf_counter() - t0
    extra = ["--num-proc", str(num_proc)] if num_proc else []
    common = ["--child", "--data", str(data), "--cache", str(work / "cache"), *extra]
    first, first_tree = measured(common)
    second, second_tree = measured(common)
    pair = two_processes(data, work / "cache-two", num_proc)
    tokens_bytes = first["token_array_bytes"]
    kinds = ("rss", "pss", "pss_anon")
    above = {k: first_tree[f"peak_{k}_bytes"] - first[f"baseline_{k}_bytes"] for k in kinds}
    return {
        "benchmark": "data_pipeline", "size_mb": size_mb, "corpus": {**corpus, "generation_s": round(generation_s, 1)},
        "tokens": first["tokens"], "docs": first["docs"], "dtype": first["dtype"], "num_proc": first["num_proc"],
        "token_array_bytes": tokens_bytes,
        "first_run": {**first_tree, "call_wall_s": first["call_wall_s"], "built": first["built"],
                      **{f"baseline_{k}_bytes": first[f"baseline_{k}_bytes"] for k in kinds},
                      **{f"peak_{k}_above_baseline_bytes": above[k] for k in kinds}},
        "ratio_to_token_bytes": {
            **{f"peak_{k}": round(first_tree[f"peak_{k}_bytes"] / tokens_bytes, 3) for k in kinds},
            **{f"peak_{k}_above_baseline": round(above[k] / tokens_bytes, 3) for k in kinds}},
        "second_run": {"call_wall_s": second["call_wall_s"], "built": second["built"],
                       "process_wall_s": second_tree["process_wall_s"]},
        "two_process": pair,
        "targets": {"peak_rss_le_2x_token_bytes": first_tree["peak_rss_bytes"] <= 2 * tokens_bytes,
                    "peak_pss_above_baseline_le_2x_token_bytes": above["pss"] <= 2 * tokens_bytes,
                    "cache_read_le_5s": second["call_wall_s"] <= 5.0 and not second["built"],
                    "one_tokenization_for_two_processes": pair["tokenizations"] == 1},
        "machine": machine_state(),
    }


if __name__ == "__main__":
    main()
