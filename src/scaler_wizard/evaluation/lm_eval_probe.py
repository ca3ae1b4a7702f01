"""lm-evaluation-harness tasks as stage probes (``evaluation.lm_eval``).

After each stage's training, every task of the recipe runs in-process on the live model through
lm-eval's Hugging Face wrapper (``lm_eval.models.huggingface.HFLM`` around the model instance and
a copy of the run's tokenizer), once per evaluated length: the HFLM's ``max_length`` is that
length (prompt and generated tokens together), and RULER's synthetic tasks size their samples to
it (``metadata.max_seq_lengths``). The lengths are ``evaluation.lm_eval.lengths`` up to the
stage's length, or the stage's length alone.

Each length is one :class:`ProbeResult` (probe ``lm_eval``) whose metrics are
``<task>/<metric>``; they become the figures ``lm_eval/<task>/<metric>@<length>`` in
metrics.jsonl, the envelope, the stage-complete snapshot and the summary (``evaluation/figures.py``),
and ``evaluation.lm_eval.min_scores`` gates them (:func:`lm_eval_gate`). Metric names follow
lm-eval's results with its default filter dropped (``acc,none`` -> ``acc``; another filter is
kept after a colon, ``exact_match:strict-match``). RULER reports its score under the sequence
length's own name (``"512"``) with -1 for the lengths it did not sample; here that score is
``score`` and the placeholders are dropped (``niah_single_1/score``).

Offline. The harness runs with the Hugging Face Hub and datasets in offline mode and NLTK's
downloader refused (RULER's NIAH module asks for ``punkt_tab`` on import; only the essay haystack
uses it). A task whose data is not on this machine raises :class:`LmEvalNetworkError` naming the
task. RULER tasks that generate their data locally work offline: ``niah_single_1``,
``niah_multikey_2``, ``niah_multikey_3`` (repeated-sentence or needle haystacks), ``ruler_cwe``,
``ruler_fwe`` and ``ruler_vt``; the ones in :data:`NEEDS_NETWORK` download their data and are
refused by the preflight checks. RULER's generators are sized for long contexts: ``ruler_vt``
needs lengths well above 512 tokens (its few-shot example alone is ~500; below that the
generator never returns).

The harness seeds Python's, NumPy's and torch's generators for its own reproducibility; the
probe saves and restores them so training after a probe continues as if none had run.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

from ..errors import PlanError
from .probes import ProbeMemoryError, ProbeResult, is_out_of_memory

LM_EVAL_PROBE = "lm_eval"
INSTALL_HINT = "pip install 'scaler-wizard[lm-eval]'"

#: RULER tasks (and the RULER group) whose data is downloaded: refused for offline runs.
NEEDS_NETWORK: dict[str, str] = {
    "niah_single_2": "the Paul Graham essays haystack from the Hugging Face Hub (baber/paul_graham_essays)",
    "niah_single_3": "the Paul Graham essays haystack from the Hugging Face Hub (baber/paul_graham_essays)",
    "niah_multikey_1": "the Paul Graham essays haystack from the Hugging Face Hub (baber/paul_graham_essays)",
    "niah_multivalue": "the Paul Graham essays haystack from the Hugging Face Hub (baber/paul_graham_essays)",
    "niah_multiquery": "the Paul Graham essays haystack from the Hugging Face Hub (baber/paul_graham_essays)",
    "ruler_qa_squad": "SQuAD v2 from rajpurkar.github.io, at every run",
    "ruler_qa_hotpot": "HotpotQA from huggingface.co, at every run",
    "ruler": "the data of its essay and QA subtasks (niah_single_2/3, niah_multikey_1, niah_multivalue, "
             "niah_multiquery, ruler_qa_squad, ruler_qa_hotpot)",
}
#: RULER tasks that generate their data on this machine (from the run's tokenizer).
OFFLINE_RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_cwe", "ruler_fwe", "ruler_vt")

# characters a metric name may hold (schemas/metric_event.schema.json), "/" being the separator
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:+\-]")


class LmEvalNetworkError(PlanError):
    """An lm-eval task needs data that is not on this machine (the probe never downloads)."""

    def __init__(self, task: str, detail: str):
        self.task = task
        super().__init__(
            f"The lm-eval task {task!r} needs network to get its data, and evaluation.lm_eval runs offline: {detail}.",
            hint=("Remove it from evaluation.lm_eval.tasks, or put its dataset in the local Hugging Face cache "
                  f"first. RULER tasks that work offline: {', '.join(OFFLINE_RULER_TASKS)}."),
        )


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


# ------------------------------------------------------------------------------------------
# Quiet, offline, side-effect free
# ------------------------------------------------------------------------------------------

_LOGGERS = ("lm_eval", "datasets", "evaluate", "nltk", "absl")


@contextlib.contextmanager
def harness_context():
    """The harness with the Hub and datasets offline (their module flags, read at import, and the
    environment for anything read later), NLTK's downloader refused, its loggers at ERROR, its
    progress bars and prints kept (yielded as a StringIO, for error messages), and without the
    environment report of every ``simple_evaluate`` (torch's collect_env and a ``git`` call:
    seconds each, per task and length)."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LOCAL_RANK")}
    # one process evaluates its own copy of the model: lm-eval returns results on "rank 0" only
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", LOCAL_RANK="0")
    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        if hasattr(obj, name):
            patches.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hub_constants

        patch(hub_constants, "HF_HUB_OFFLINE", True)
    with contextlib.suppress(ImportError):
        import datasets.config as datasets_config

        patch(datasets_config, "HF_HUB_OFFLINE", True)
        patch(datasets_config, "HF_DATASETS_OFFLINE", True)
    if importlib.util.find_spec("nltk") is not None:
        import nltk

        patch(nltk, "download", lambda *args, **kwargs: False)
    with contextlib.suppress(ImportError):
        from lm_eval import evaluator

        patch(evaluator, "add_env_info", lambda storage: None)
        patch(evaluator, "get_git_commit_hash", lambda: None)
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            yield captured
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for obj, name, value in reversed(patches):
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def evaluation_mode(model: Any):
    """Eval mode without gradients; the train mode and the random generators restored after."""
    import random

    import numpy as np
    import torch

    was_training = getattr(model, "training", False)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        if was_training:
            model.train()


# ------------------------------------------------------------------------------------------
# Task index
# ------------------------------------------------------------------------------------------

_TASK_INDEX: list[Any] = []  # the process's TaskManager: indexing lm-eval's task folders takes seconds


def task_manager(metadata: dict[str, Any] | None = None) -> Any:
    """lm-eval's TaskManager; with ``metadata`` (passed to every task loaded) a copy sharing the
    index when the installed lm-eval keeps metadata in its TaskFactory, else a new one."""
    from lm_eval.tasks import TaskManager

    if not _TASK_INDEX:
        with harness_context():
            _TASK_INDEX.append(TaskManager())
    base = _TASK_INDEX[0]
    if not metadata:
        return base
    try:
        from lm_eval.tasks._factory import TaskFactory
    except ImportError:
        return TaskManager(metadata=metadata)
    if not hasattr(base, "_factory"):
        return TaskManager(metadata=metadata)
    manager = copy.copy(base)
    manager.metadata = metadata
    manager._factory = TaskFactory(meta=metadata)
    return manager


def check_spec(spec: Any, target_length: int) -> list[tuple[str, str]]:
    """Preflight problems of ``evaluation.lm_eval``: lm-eval installed, every task known and
    offline, every gate naming a listed task's figure, every length reachable."""
    where = "evaluation.lm_eval"
    if not lm_eval_available():
        return [(where, f"needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")]
    problems: list[tuple[str, str]] = []
    known = set(task_manager().all_tasks)
    for i, name in enumerate(spec.tasks):
        if name in NEEDS_NETWORK:
            message = (f"{name!r} needs network: it downloads {NEEDS_NETWORK[name]}; RULER tasks that work "
                       f"offline: {', '.join(OFFLINE_RULER_TASKS)}")
            problems.append((f"{where}.tasks[{i}]", message))
        elif name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            problems.append((f"{where}.tasks[{i}]", f"unknown lm-eval task {name!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else
                                " (`lm-eval ls tasks` lists them)")))
    for i, length in enumerate(spec.lengths or []):
        if length > target_length:
            message = (f"{length} is beyond context.target_length ({target_length}): a length is evaluated at the "
                       "stages that reach it")
            problems.append((f"{where}.lengths[{i}]", message))
    return problems


# ------------------------------------------------------------------------------------------
# Figures and the gate
# ------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return _NAME_UNSAFE.sub("_", name)


def task_figures(results: dict[str, dict[str, Any]], length: int) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from lm-eval's ``results`` (standard errors, labels and
    RULER's -1 placeholders dropped; RULER's score at ``length`` named ``score``)."""
    out: dict[str, float] = {}
    for task, entries in results.items():
        for key, value in entries.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            if metric.isdigit():  # RULER: one metric per sequence length, -1 where it has no samples
                if int(metric) != length or value == -1:
                    continue
                metric = "score"
            name = metric if filter_name == "none" else f"{metric}:{filter_name}"
            out[f"{_safe(task)}/{_safe(name)}"] = float(value)
    return out


def lm_eval_gate(results: list[ProbeResult], spec: Any) -> list[str]:
    """The failed checks of ``evaluation.lm_eval.min_scores`` at every evaluated length. A probe
    error or a figure the run did not produce fails its check (never a pass on a missing figure)."""
    if spec is None or not spec.min_scores:
        return []
    failed = []
    for r in results:
        if r.probe != LM_EVAL_PROBE:
            continue
        if r.error:
            failed.append(f"lm_eval @{r.length}: probe error ({r.error})")
            continue
        for key, threshold in spec.min_scores.items():
            value = r.metrics.get(key)
            if value is None:
                failed.append(f"lm_eval {key} @{r.length}: not measured (the tasks reported: "
                              f"{', '.join(sorted(r.metrics)) or 'nothing'})")
            elif not value >= threshold:
                failed.append(f"lm_eval {key} @{r.length} = {value:.3f} (needs >= {threshold})")
    return failed


# ------------------------------------------------------------------------------------------
# The probe
# ------------------------------------------------------------------------------------------

_NETWORK_ERROR_NAMES = frozenset({"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError",
                                  "ConnectTimeout", "ReadTimeout", "URLError", "DatasetNotFoundError",
                                  "HfHubHTTPError", "NameResolutionError", "MaxRetryError"})


def _network_cause(exc: BaseException) -> str | None:
    """The first link of ``exc``'s chain that says data had to come over the network."""
    seen = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text = str(link)
        if (isinstance(link, ConnectionError) or type(link).__name__ in _NETWORK_ERROR_NAMES
                or "offline mode" in text.lower() or "couldn't reach" in text.lower()):
            return f"{type(link).__name__}: {text.splitlines()[0][:300] if text else ''}"
        link = link.__cause__ or link.__context__
    return None


@dataclass
class LmEvalProbe:
    """The ``evaluation.lm_eval`` block bound to the run's tokenizer (saved once to a private
    folder: RULER's generators load their tokenizer by path)."""

    spec: Any  # recipe.LmEvalSection
    tokenizer: Any
    _tokenizer_dir: Any = field(default=None, repr=False)

    def lengths_for(self, stage_length: int) -> list[int]:
        if not self.spec.lengths:
            return [stage_length]
        return sorted({n for n in self.spec.lengths if n <= stage_length})

    def run(self, model: Any, stage_length: int) -> list[ProbeResult]:
        """One result per evaluated length. A failing task makes its length an error result (the
        gate then fails); out of memory and a task that needs network raise typed errors."""
        return [self._run_length(model, length) for length in self.lengths_for(stage_length)]

    def _tokenizer_path(self) -> str:
        if self._tokenizer_dir is None:
            self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="scaler-wizard-lm-eval-")
            self.tokenizer.save_pretrained(self._tokenizer_dir.name)
        return self._tokenizer_dir.name

    def _run_length(self, model: Any, length: int) -> ProbeResult:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        spec = self.spec
        metadata = {"max_seq_lengths": [length], "tokenizer": self._tokenizer_path()}
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {"tasks": list(spec.tasks), "limit": spec.limit, "samples": {},
                                   "lm_eval_version": _version()}
        task = log = None
        try:
            with evaluation_mode(model), harness_context() as log:
                manager = task_manager(metadata)
                lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(self.tokenizer), max_length=length,
                          batch_size=spec.batch_size)
                for task in spec.tasks:
                    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=spec.limit, task_manager=manager,
                                                  bootstrap_iters=0, log_samples=False)
                    if out is None:
                        raise RuntimeError("lm-eval returned no results on this process")
                    metrics.update(task_figures(out["results"], length))
                    for name, counts in (out.get("n-samples") or {}).items():
                        details["samples"][name] = counts.get("effective", counts) if isinstance(counts, dict) \
                            else counts
        except ProbeMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the harness and its tasks may fail in any way
            if is_out_of_memory(exc):
                device = next(model.parameters()).device
                raise ProbeMemoryError(LM_EVAL_PROBE, length, spec.batch_size, str(device),
                                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
            cause = _network_cause(exc)
            if cause is not None and task is not None:
                raise LmEvalNetworkError(task, cause) from None
            where = f"task {task!r}: " if task else ""
            return ProbeResult(LM_EVAL_PROBE, length, error=f"{where}{type(exc).__name__}: {exc}",
                               details={**details, "log_tail": _tail(log)})
        if not metrics:
            return ProbeResult(LM_EVAL_PROBE, length, error="the tasks reported no numeric metric", details=details)
        return ProbeResult(LM_EVAL_PROBE, length, metrics, details)


def _tail(log: Any, chars: int = 2000) -> str:
    text = log.getvalue() if log is not None else ""
    return text[-chars:]


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None
