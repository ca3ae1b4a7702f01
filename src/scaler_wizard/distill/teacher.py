"""Teachers for knowledge preservation (recipe ``distillation.teacher``).

``base``    The student's own frozen base weights with the PEFT adapters disabled
            (``peft_model.disable_adapter()``) and the ORIGINAL positional settings: the rotary
            modules built from the unscaled config are swapped in for the teacher's forward pass
            and swapped back afterwards. Both sets of rotary modules are built once (they hold
            only frequency buffers); no second copy of the weights exists.
``model``   A separately loaded Hugging Face causal LM sharing the student's vocabulary.
``offline`` Top-k log-probabilities read from an :class:`~scaler_wizard.distill.offline_cache.OfflineCache`;
            no teacher in memory. Only rows that come from the cache (carrying ``replay_index``,
            see :mod:`scaler_wizard.distill.replay`) get a teacher signal.

Every teacher is called as ``teacher(model, inputs) -> TeacherBatch | None`` inside the
trainer's ``compute_loss`` and returns predictions for the positions ``0 .. tc-1`` of the batch
with a mask of the positions that count (the next token is real). A teacher with the original
positional settings is only trusted inside the context it was trained at: ``context_length``
(default: the original config's base length) limits the teacher to that prefix. Under causal
attention a prefix's hidden states are exactly those of the full sequence, so running the
teacher on the prefix only is both exact and cheaper.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, ModelLoadError, PlanError
from ..models import decoder_and_head, frozen_output_head as output_head, unwrap as _unwrap
from .losses import TeacherBatch, TeacherHidden, TeacherTopK
from .offline_cache import OfflineCache

TEACHER_MODES = ("base", "model", "offline")
#: the key of the batch that names a row's index in the offline cache (-1: not a cached row)
CACHE_ROW_KEY = "replay_index"
from ..models import MODEL_DTYPES  # noqa: E402,F401 - re-exported for callers


# --------------------------------------------------------------------------------------------
# Model parts (through PEFT wrappers)
# --------------------------------------------------------------------------------------------


def run_decoder(model: Any) -> Any:
    """The decoder stack that returns normalised final hidden states (``model.model`` for Llama)."""
    return decoder_and_head(model)[0]


def vocab_size(model: Any) -> int:
    return int(output_head(model).weight.shape[0])


def next_token_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, covered: int,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[b, covered]``: position p counts when the token p+1 exists and is real and, in packed
    rows (``position_ids`` restarting at 0 per example), belongs to the same example as p."""
    b, t = input_ids.shape
    attn = torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
    nxt = torch.cat([attn[:, 1:], attn.new_zeros(b, 1)], dim=1)  # no token after the last position
    if position_ids is not None:
        nxt = nxt & torch.cat([position_ids[:, 1:] != 0, attn.new_zeros(b, 1)], dim=1)
    return (attn & nxt)[:, :covered]


def real_token_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which tokens are real: the ``attention_mask`` of padded rows; for packed rows (no
    ``attention_mask``; the decoder must not get one) the tokens whose per-token task is not the
    padding task (-1)."""
    attn, task = inputs.get("attention_mask"), inputs.get("task")
    if attn is None and task is not None and task.dim() == 2:
        return task >= 0
    return attn


def _peft_model(model: Any) -> Any:
    """The PEFT model inside a DDP/accelerate wrapper (``.module``), where ``disable_adapter`` lives."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Teacher predictions without dropout; the training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# base: the student's own weights, adapters off, original positions
# --------------------------------------------------------------------------------------------


def _rotary_module_names(model: Any) -> list[str]:
    # the same test context.methods.apply_to_model uses to find the modules it rebuilds
    return [n for n, m in model.named_modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")]


def _set_submodule(root: Any, dotted: str, module: Any) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class OriginalPositions:
    """Rotary modules built once from the original (unscaled) config, swapped in on demand.

    ``apply_to_model`` replaces the student's rotary modules at each stage; :meth:`swapped`
    records whichever modules are current on entry and puts them back on exit, so it stays
    correct across stages. Models without rotary modules (ALiBi, learned tables) have nothing
    to swap here.
    """

    _CONFIG_FIELDS = ("rope_parameters", "max_position_embeddings")

    def __init__(self, model: Any, original_config: Any):
        self.base = _unwrap(model)
        self.original_config = copy.deepcopy(original_config)
        self.names = _rotary_module_names(self.base)
        self.modules = {}
        for name in self.names:
            current = self.base.get_submodule(name)
            fresh = type(current)(config=self.original_config)
            self.modules[name] = fresh.to(current.inv_freq.device)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        names = _rotary_module_names(self.base)
        if sorted(names) != sorted(self.names):
            raise PlanError(
                f"The model's rotary modules changed ({sorted(names)} vs {sorted(self.names)}) since the base teacher "
                "was prepared.", hint="Build the teacher again after changing the model's architecture.",
            )
        current = {name: self.base.get_submodule(name) for name in self.names}
        saved_fields = {k: copy.deepcopy(getattr(self.base.config, k)) for k in self._CONFIG_FIELDS
                        if hasattr(self.base.config, k)}
        try:
            for name, module in self.modules.items():
                if module.inv_freq.device != current[name].inv_freq.device:
                    module.to(current[name].inv_freq.device)  # the Trainer moved the model
                _set_submodule(self.base, name, module)
            for key in saved_fields:
                if hasattr(self.original_config, key):
                    setattr(self.base.config, key, copy.deepcopy(getattr(self.original_config, key)))
            yield
        finally:
            for name, module in current.items():
                _set_submodule(self.base, name, module)
            for key, value in saved_fields.items():
                setattr(self.base.config, key, value)


ViewHook = Callable[[Any], contextlib.AbstractContextManager]


class BaseModelTeacher:
    """``base`` mode. Prepare once per run (after ``get_peft_model``, with the original config):

        teacher = BaseModelTeacher(peft_model, original_config)
        batch = teacher(peft_model, inputs)          # inside compute_loss

    ``extra_views`` are further context managers entered for the teacher pass, e.g. one that
    bypasses newly inserted decoder blocks for block expansion (parameter growth).
    """

    mode = "base"

    def __init__(self, model: Any, original_config: Any, *, context_length: int | None = None,
                 extra_views: Sequence[ViewHook] = ()):
        model = _peft_model(model)
        # Without adapters the teacher view must come from elsewhere (block expansion bypasses
        # its new blocks through ``extra_views``).
        if not hasattr(model, "disable_adapter") and not extra_views:
            raise PlanError(
                "The 'base' teacher needs PEFT adapters on the student (it is the student with its adapters "
                "disabled); this model has none.",
                hint="Use distillation.teacher: model (a separate copy) or offline (a top-k cache) for full fine-tuning.",
            )
        from ..context.methods import base_context_length, position_encoding

        if position_encoding(original_config) == "learned":
            # learned_table replaces the position table itself; the original rows are gone
            raise PlanError(
                "The 'base' teacher cannot restore a resized learned position table (GPT-2 style models).",
                hint="Use distillation.teacher: offline (cache built before scaling) or model for this model.",
            )
        self.positions = OriginalPositions(model, original_config)
        self.context_length = int(context_length or base_context_length(original_config))
        self.extra_views = list(extra_views)

    @contextlib.contextmanager
    def view(self, model: Any) -> Iterator[tuple[Any, torch.nn.Module]]:
        """The student turned into its base model: yields (decoder, head) to run under no_grad."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if hasattr(model, "disable_adapter"):
                stack.enter_context(model.disable_adapter())
            stack.enter_context(self.positions.swapped())
            stack.enter_context(_eval_mode(model))
            for hook in self.extra_views:
                stack.enter_context(hook(model))
            yield run_decoder(model), output_head(model)

    def hidden_states(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None):
        """Teacher final hidden states ``[b, tc, h]`` for the first ``tc = min(t, context_length)``
        positions, and the teacher's head. Packed rows give ``position_ids`` (and no mask)."""
        tc = min(input_ids.size(1), self.context_length)
        with self.view(model) as (decoder, head):
            mask = None if attention_mask is None else attention_mask[:, :tc]
            pos = None if position_ids is None else position_ids[:, :tc]
            hidden = decoder(input_ids=input_ids[:, :tc], attention_mask=mask, position_ids=pos,
                             use_cache=False).last_hidden_state
        return hidden, head

    def __call__(self, model: Any, inputs: dict[str, torch.Tensor]) -> TeacherBatch:
        input_ids, attn, pos = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
        hidden, head = self.hidden_states(_peft_model(model), input_ids, attn, pos)
        signal = TeacherHidden(hidden, head.weight, head.bias)
        return TeacherBatch(signal, next_token_mask(real_token_mask(inputs), input_ids, hidden.size(1), pos))


# --------------------------------------------------------------------------------------------
# model: a separately loaded teacher
# --------------------------------------------------------------------------------------------


def check_vocabulary(student: Any, teacher: Any, *, teacher_source: str,
                     student_tokenizer: Any = None, teacher_tokenizer: Any = None) -> None:
    """Same output vocabulary size and, when both tokenizers are given, the same token -> id map."""
    s_vocab, t_vocab = vocab_size(student), vocab_size(teacher)
    if s_vocab != t_vocab:
        raise ModelLoadError(
            f"The teacher {teacher_source} has a vocabulary of {t_vocab} tokens, the student {s_vocab}; "
            "distillation compares the two distributions token by token, so they must share one vocabulary.",
            hint="Use a teacher from the same model family/tokenizer, or distillation.teacher: base.",
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        s_map, t_map = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        differ = sorted(tok for tok in set(s_map) | set(t_map) if s_map.get(tok) != t_map.get(tok))
        if differ:
            raise ModelLoadError(
                f"The teacher {teacher_source} and the student have {s_vocab} output rows each, but their tokenizers "
                f"map {len(differ)} token(s) differently (e.g. {differ[:3]}).",
                hint="Use a teacher trained with the student's tokenizer.",
            )


def load_teacher_model(path: Path, *, dtype: str = "float32", device: Any = None) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local folder (safetensors only), frozen, in eval mode."""
    from ..models import load_causal_lm

    model, tokenizer = load_causal_lm(Path(path), dtype=dtype, what="the teacher model (distillation.teacher_path)")
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


class ModelTeacher:
    """``model`` mode: a separate frozen teacher (a second copy of the weights in memory)."""

    mode = "model"

    def __init__(self, teacher_model: Any, student_model: Any, *, teacher_source: str = "teacher model",
                 context_length: int | None = None, student_tokenizer: Any = None, teacher_tokenizer: Any = None):
        check_vocabulary(student_model, teacher_model, teacher_source=teacher_source,
                         student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer)
        from ..context.methods import base_context_length

        self.model = teacher_model
        self.context_length = int(context_length or base_context_length(teacher_model.config))

    @classmethod
    def load(cls, path: Path, student_model: Any, *, dtype: str = "float32", student_tokenizer: Any = None,
             context_length: int | None = None) -> ModelTeacher:
        device = output_head(student_model).weight.device
        teacher, tokenizer = load_teacher_model(path, dtype=dtype, device=device)
        return cls(teacher, student_model, teacher_source=str(path), context_length=context_length,
                   student_tokenizer=student_tokenizer, teacher_tokenizer=tokenizer)

    def __call__(self, model: Any, inputs: dict[str, torch.Tensor]) -> TeacherBatch:
        input_ids, attn, pos = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
        tc = min(input_ids.size(1), self.context_length)
        with torch.no_grad():
            hidden = run_decoder(self.model)(
                input_ids=input_ids[:, :tc], attention_mask=None if attn is None else attn[:, :tc],
                position_ids=None if pos is None else pos[:, :tc], use_cache=False,
            ).last_hidden_state
        head = output_head(self.model)
        mask = next_token_mask(real_token_mask(inputs), input_ids, tc, pos)
        return TeacherBatch(TeacherHidden(hidden, head.weight, head.bias), mask)


# --------------------------------------------------------------------------------------------
# offline: a top-k cache
# --------------------------------------------------------------------------------------------


class OfflineTeacher:
    """``offline`` mode: the teacher's top-k log-probabilities for rows of an offline cache.

    Rows of the batch with ``inputs[CACHE_ROW_KEY] >= 0`` are looked up; their tokens are checked
    against the cached rows (a batch that is not what the cache was made from is an error).
    Returns ``None`` when the batch holds no cached row.
    """

    mode = "offline"

    def __init__(self, cache: OfflineCache, student_model: Any | None = None):
        self.cache = cache
        if student_model is not None:
            cache.verify_teacher(vocab_size=vocab_size(student_model))

    def __call__(self, model: Any, inputs: dict[str, torch.Tensor]) -> TeacherBatch | None:
        if CACHE_ROW_KEY not in inputs:
            raise DataError(
                f"The offline teacher needs rows from its cache ({self.cache.folder}); the batch has no "
                f"'{CACHE_ROW_KEY}' column.",
                hint="Mix the cache's rows into the stage with scaler_wizard.distill.replay.mix_replay.",
            )
        input_ids = inputs["input_ids"]
        index = inputs[CACHE_ROW_KEY].view(-1).tolist()
        rows = [i for i, r in enumerate(index) if r >= 0]
        if not rows:
            return None
        b, device = input_ids.size(0), input_ids.device
        tc = min(self.cache.length, input_ids.size(1))
        found = self.cache.lookup([index[i] for i in rows])
        if not torch.equal(found.input_ids[:, :tc].to(device), input_ids[rows, :tc]):
            raise DataError(
                f"Batch rows {[index[i] for i in rows]} do not match the tokens cached in {self.cache.folder}.",
                hint="The replay rows must be the cache's own rows (OfflineCache.token_rows()).",
            )
        k = self.cache.k
        ids = torch.zeros(b, tc, k, dtype=torch.long, device=device)
        logprobs = torch.zeros(b, tc, k, dtype=torch.float32, device=device)
        ids[rows] = found.topk_ids[:, :tc].to(device)
        logprobs[rows] = found.topk_logprobs[:, :tc].to(device)
        covered = torch.zeros(b, dtype=torch.bool, device=device)
        covered[rows] = True
        mask = next_token_mask(real_token_mask(inputs), input_ids, tc, inputs.get("position_ids")) & covered[:, None]
        return TeacherBatch(TeacherTopK(ids, logprobs, self.cache.temperature), mask)


# --------------------------------------------------------------------------------------------
# One entry point for the trainer
# --------------------------------------------------------------------------------------------


def build_teacher(
    mode: str,
    student_model: Any,
    *,
    original_config: Any = None,
    teacher_path: Path | None = None,
    cache_dir: Path | None = None,
    context_length: int | None = None,
    dtype: str = "float32",
    student_tokenizer: Any = None,
) -> BaseModelTeacher | ModelTeacher | OfflineTeacher:
    """The teacher for ``mode`` (one of :data:`TEACHER_MODES`), prepared once per run."""
    if mode == "base":
        if original_config is None:
            raise PlanError("The 'base' teacher needs the model's original (unscaled) config.")
        return BaseModelTeacher(student_model, original_config, context_length=context_length)
    if mode == "model":
        if teacher_path is None:
            raise PlanError("distillation.teacher: model needs distillation.teacher_path (a model folder).")
        return ModelTeacher.load(teacher_path, student_model, dtype=dtype, student_tokenizer=student_tokenizer,
                                 context_length=context_length)
    if mode == "offline":
        if cache_dir is None:
            raise PlanError("distillation.teacher: offline needs distillation.cache (a folder made by "
                            "`scaler-wizard distill cache`).")
        return OfflineTeacher(OfflineCache.open(cache_dir), student_model)
    raise PlanError(f"Unknown teacher mode {mode!r}.", hint=f"Use one of {list(TEACHER_MODES)}.")
