"""Memory planner: the peak memory of one training step, as a breakdown.

Pure arithmetic on a model's hyper-parameters (no torch import), so it answers "does 64K fit on
this machine?" for models that are not downloaded. The breakdown follows what autograd keeps:

* **weights** -- every parameter of the (possibly grown) model in its storage precision; 4-bit
  QLoRA keeps the decoder's linear layers as NF4 with double-quantised absmax (~4.127 bits per
  weight, Dettmers et al. 2023, "QLoRA") and everything else in the compute dtype.
* **trainable** -- trainable parameters with their gradients and AdamW's two moments. LoRA
  adapters are kept in fp32 by PEFT (``autocast_adapter_dtype``), so 4 + 4 + 8 bytes each plus one
  fp32 copy for the multi-tensor optimizer step; trainable base parameters (block expansion,
  full fine-tuning) keep the model dtype for gradients and moments (what ``torch.optim.AdamW``
  does with a bf16 model).
* **activations** -- what each decoder layer saves for backward. Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 2) count
  s·b·h·(34 + 5·a·s/h) bytes per GPT layer at 16 bits; :func:`layer_activation_bytes_per_token`
  redoes their count for the Llama block (RMSNorm, grouped-query attention, SwiGLU MLP, LoRA
  side paths) term by term. With SDPA / FlashAttention the 5·a·s/h score term disappears (the
  kernel keeps only the output and a log-sum-exp); with eager attention the fp32 softmax output
  (a·s² per sequence) is kept per layer. With full activation checkpointing a layer keeps only
  its input (2·s·b·h bytes at 16 bits in their notation) and one layer is recomputed at a time.
* **logits** -- the output projection and its loss: the logits, their fp32 copy, the saved
  log-softmax, its gradient and the gradient of the logits: at 64K tokens and a 128,256 vocabulary
  one fp32 copy alone is 33.6 GB. Chunked cross-entropy (``losses/chunked_ce.py``, the idea of
  Liger and Cut Cross-Entropy) holds the same for one chunk only.
* **teacher** -- distillation: ``base`` reuses the student's weights with adapters disabled (no
  second copy) and adds its logits; ``model`` adds a second set of weights too.
* **overhead** -- the runtime: CUDA context and allocator slack on GPUs, thread pools and
  allocator slack on CPU, calibrated by ``bench/planner_accuracy.py``.
* **probe** -- the evaluation probes (``evaluation/probes.py``) run between the training steps, at
  the stage's length, without gradients: one layer's transient tensors at a time, the final hidden
  states, and one chunk of the output projection's logits with its log-softmax (the probes never
  build ``[batch, length, vocab]``). Their peak is the weights, the trainable state (the optimizer's
  moments stay alive between stages) and this working set; :attr:`MemoryEstimate.total` is the
  larger of the training step and the probe peak, so a plan that fits also fits its probes.
  Calibrated by ``bench/probe_memory.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import ModelLoadError, PlanError
from ..losses.chunk_policy import positions_per_chunk

GiB = 2**30
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# NF4 weight (4 bits) + fp8 absmax per 64 weights + fp32 second-level absmax per 256 blocks (QLoRA §2).
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8

Strategy = Literal["lora", "block_expansion", "full"]
Quantization = Literal["none", "4bit"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]
TeacherMode = Literal["none", "base", "model"]
Backend = Literal["cuda", "mps", "cpu"]

# Runtime overhead (bytes): CUDA context + cuBLAS workspace; on CPU the thread pools and glibc
# arenas that a training step touches (measured as the RSS delta of a near-empty step).
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
CUDA_ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, fraction of the tensors' total
# The resident set of the interpreter with torch 2.13 (CPU), transformers 5.x, PEFT, accelerate,
# datasets and scaler_wizard imported, before any model is built: 0.47 GiB measured on the 2-core
# machine (issue 15: the planner is compared with the process's peak RSS, which includes it).
CPU_RUNTIME_BYTES = int(0.47 * GiB)
CPU_ALLOCATOR_SLACK = 0.0
# The probes' output projection: logits + their log-softmax of one chunk of positions stay under
# this many bytes (evaluation/probes.py sizes its chunks with probe_head_chunk below).
PROBE_HEAD_BUDGET_BYTES = 128 * 2**20


# ------------------------------------------------------------------------------------------
# Model hyper-parameters
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """The hyper-parameters of a Llama-family decoder (Llama, Mistral, Qwen2, ...) that decide
    its parameter count and memory. Read from a ``config.json`` with :meth:`from_config`."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int | None = None
    model_type: str = "llama"
    name: str = "model"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, source: str = "config") -> ModelDims:
        """From a transformers config object or the dict of its ``config.json``."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if not isinstance(data.get(k), int) or data.get(k) <= 0]
        if missing:
            raise ModelLoadError(
                f"{source} lacks positive integer {', '.join(missing)}; the planner needs a decoder-only "
                "transformer config (Llama, Mistral, Qwen2 and alike).",
                hint="Point --model at a folder whose config.json has these hyper-parameters.",
            )
        heads = data["num_attention_heads"]
        kv = data.get("num_key_value_heads") or heads
        head_dim = data.get("head_dim") or data["hidden_size"] // heads
        name = data.get("_name_or_path") or (data.get("architectures") or [data.get("model_type", "model")])[0]
        return cls(
            hidden_size=data["hidden_size"],
            num_layers=data["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=data["intermediate_size"],
            vocab_size=data["vocab_size"],
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", data.get("model_type") == "qwen2")),
            max_position_embeddings=data.get("max_position_embeddings"),
            model_type=str(data.get("model_type", "llama")),
            name=str(name),
        )

    # -- shapes and counts -------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def block_linear_params(self) -> int:
        params = sum(a * b for a, b in self.linear_shapes().values())
        if self.attention_bias:
            params += self.q_dim + 2 * self.kv_dim
        return params

    def block_params(self) -> int:
        return self.block_linear_params() + 2 * self.hidden_size  # + two RMSNorm weights

    def embedding_params(self) -> int:
        """Input embeddings plus the output head when it is not tied."""
        per = self.vocab_size * self.hidden_size
        return per if self.tie_word_embeddings else 2 * per

    def n_params(self, extra_layers: int = 0) -> int:
        return (self.num_layers + extra_layers) * self.block_params() + self.embedding_params() + self.hidden_size


def read_model_dims(path: str | Path) -> ModelDims:
    """From a model folder holding ``config.json`` (or the file itself)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ModelLoadError(
            f"No model config at {file}.",
            hint="Pass a Hugging Face model folder containing config.json (or builtin:demo).",
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file} is not readable JSON ({exc}).", hint="Restore or re-download the config.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object.", hint="Restore or re-download the config.")
    dims = ModelDims.from_config(data, source=str(file))
    return dims if data.get("_name_or_path") else replace(dims, name=p.name if p.is_dir() else p.parent.name)


# ------------------------------------------------------------------------------------------
# What is trained
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyPlan:
    """What the memory planner needs to know about the scaling strategy.

    ``rank_pattern`` maps PEFT pattern keys (regular expressions matched against the end of a
    module name, e.g. ``layers.3.self_attn.q_proj``) to ranks, as in ``LoraConfig.rank_pattern``.
    """

    strategy: Strategy = "lora"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dropout: float = 0.0
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    use_dora: bool = False
    new_blocks: int = 0
    train_norms: bool = False
    train_embeddings: bool = False


def module_names(dims: ModelDims, layers: int | None = None) -> list[tuple[int, str, str]]:
    """(layer, short name, full name) of every linear layer in the decoder."""
    out = []
    for layer in range(dims.num_layers if layers is None else layers):
        for short in ALL_LINEAR:
            part = "self_attn" if short in ATTENTION_MODULES else "mlp"
            out.append((layer, short, f"model.layers.{layer}.{part}.{short}"))
    return out


def rank_for(full_name: str, default: int, rank_pattern: Mapping[str, int]) -> int:
    """The rank PEFT gives a module: the first matching ``rank_pattern`` key, else the default."""
    for key, rank in rank_pattern.items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return int(rank)
    return default


def lora_params(dims: ModelDims, rank: int, targets: tuple[str, ...] | list[str],
                rank_pattern: Mapping[str, int] | None = None, use_dora: bool = False) -> int:
    """Trainable parameters of LoRA adapters: r·(in + out) per adapted linear layer (+ the DoRA
    magnitude vector, one value per output feature)."""
    shapes = dims.linear_shapes()
    total = 0
    for _, short, full in module_names(dims):
        if short not in targets:
            continue
        fan_in, fan_out = shapes[short]
        total += rank_for(full, rank, rank_pattern or {}) * (fan_in + fan_out) + (fan_out if use_dora else 0)
    return total


def trainable_params(dims: ModelDims, plan: StrategyPlan) -> int:
    extra = 0
    if plan.train_norms:
        extra += (dims.num_layers + plan.new_blocks) * 2 * dims.hidden_size + dims.hidden_size
    if plan.train_embeddings:
        extra += dims.embedding_params()
    if plan.strategy == "lora":
        return lora_params(dims, plan.lora_rank, plan.lora_targets, plan.rank_pattern, plan.use_dora) + extra
    if plan.strategy == "block_expansion":
        # the new blocks' norms are part of block_params; do not count them twice
        norms_of_new = plan.new_blocks * 2 * dims.hidden_size if plan.train_norms else 0
        return plan.new_blocks * dims.block_params() + extra - norms_of_new
    return dims.n_params()


# ------------------------------------------------------------------------------------------
# The estimate
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRequest:
    """One training configuration to plan for."""

    seq_len: int
    micro_batch: int = 1
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quantization: Quantization = "none"
    gradient_checkpointing: bool = True
    attn_implementation: Attention = "sdpa"
    loss_chunk: int | None = 1024
    teacher: TeacherMode = "none"
    teacher_dims: ModelDims | None = None
    backend: Backend = "cuda"
    probe_batch: int = 1  # rows per probe forward (evaluation.probe_batch_size; 1 at long lengths)
    merge_export: bool = True  # output.merge: the run ends by merging, saving and reloading the model

    def check(self) -> None:
        problems = []
        if self.probe_batch < 1:
            problems.append(f"probe_batch must be >= 1 (got {self.probe_batch})")
        if self.seq_len < 1:
            problems.append(f"seq_len must be >= 1 (got {self.seq_len})")
        if self.micro_batch < 1:
            problems.append(f"micro_batch must be >= 1 (got {self.micro_batch})")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            problems.append(f"loss_chunk must be >= 1 or None for the stock loss (got {self.loss_chunk})")
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype must be one of {sorted(DTYPE_BYTES)} (got {self.dtype!r})")
        if self.teacher == "model" and self.teacher_dims is None:
            problems.append("teacher='model' needs teacher_dims (the teacher's config)")
        if problems:
            raise PlanError("Invalid memory request: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training step, by component."""

    weights: int
    trainable: int
    activations: int  # saved for backward across the stack
    logits: int  # the loss's peak working set
    backward: int  # one layer's backward working set (recomputation, gradients)
    teacher: int
    overhead: int
    notes: tuple[str, ...] = ()
    probe: int = 0  # the probes' working set (no gradients), between training steps
    export: int = 0  # the merged export's check: the reloaded fp32 copy of the weights

    @property
    def step_total(self) -> int:
        """Peak of one training step."""
        # the loss and the layers' backward run one after the other: only the larger one counts
        return (self.weights + self.trainable + self.activations + max(self.logits, self.backward)
                + self.teacher + self.overhead)

    @property
    def probe_total(self) -> int:
        """Peak while the probes run: the weights, the trainable state and the probes' working set."""
        return self.weights + self.trainable + self.probe + self.overhead

    @property
    def export_total(self) -> int:
        """Peak of the merged export (``models.export_merged``): the model, its trainable state
        and the saved folder reloaded in fp32 for the logit check."""
        return self.weights + self.trainable + self.export + self.overhead

    @property
    def total(self) -> int:
        # training, probing and the export come one after the other: the peak is the largest
        return max(self.step_total, self.probe_total, self.export_total)

    def breakdown_gb(self) -> dict[str, float]:
        keys = ("weights", "trainable", "activations", "logits", "backward", "teacher", "overhead", "probe",
                "export")
        parts = {k: getattr(self, k) for k in keys}
        parts["total"] = self.total
        return {k: round(v / GiB, 3) for k, v in parts.items()}

    def fits(self, budget_bytes: float | None) -> bool | None:
        """True/False, or None when the budget is unknown (never guessed)."""
        return None if budget_bytes is None else self.total <= budget_bytes


def weight_bytes(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest) -> int:
    layers = dims.num_layers + (plan.new_blocks if plan.strategy == "block_expansion" else 0)
    compute = DTYPE_BYTES[req.dtype]
    if req.quantization == "4bit":
        # QLoRA: only the frozen decoder linears are NF4; new (trainable) blocks stay in 16 bits.
        quantised_layers = dims.num_layers
        linear = quantised_layers * dims.block_linear_params() * NF4_BYTES_PER_WEIGHT
        rest = (layers - quantised_layers) * dims.block_linear_params() * compute
        norms = layers * 2 * dims.hidden_size * compute
        return int(linear + rest + norms + (dims.embedding_params() + dims.hidden_size) * compute)
    return dims.n_params(layers - dims.num_layers) * compute


def trainable_state_bytes(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest) -> int:
    n = trainable_params(dims, plan)
    if plan.strategy == "lora":
        # fp32 adapter weights + fp32 grads + AdamW m, v + one fp32 temporary of the foreach step
        adapters = lora_params(dims, plan.lora_rank, plan.lora_targets, plan.rank_pattern, plan.use_dora)
        other = n - adapters  # norms / embeddings trained in the model dtype, modules_to_save copies
        return adapters * 20 + other * (DTYPE_BYTES[req.dtype] * 4 + 4)
    # base parameters trained in place: weights are in `weights`; grads + m + v + temporary
    return n * (DTYPE_BYTES[req.dtype] * 3 + 4)


LayerKind = Literal["lora", "frozen", "trained"]


def layer_activation_bytes_per_token(dims: ModelDims, req: MemoryRequest, kind: LayerKind = "lora",
                                     plan: StrategyPlan | None = None) -> float:
    """Bytes one decoder layer saves for backward, per token (Korthikanti et al. 2022, redone
    for the Llama block). ``kind``: ``lora`` (frozen weights with adapters on the targets),
    ``frozen`` (no trainable weight, but on the gradient path), ``trained`` (all weights train).

    a = activation bytes (2 for bf16/fp16 and 4-bit QLoRA's compute dtype, 4 for fp32). Autograd
    saves an input only when a gradient needs it: a frozen linear layer needs its weight, not its
    input, to pass the gradient down, so frozen layers keep much less.
      RMSNorm x2:   the fp32 input (pow/mul) 4h; + the output a·h when the next linear layer's
                    weight (or adapter) trains; + the normalised value a·h when the norm trains
      attention:    SDPA keeps q, k, v and its output -> a·(2·q_dim + 2·kv_dim); + o_proj's input
                    a·q_dim when o_proj trains. Eager repeats k, v to q_dim and keeps the fp32
                    softmax (4·heads·s) and, at 16 bits, its cast (a·heads·s)
      SwiGLU MLP:   gate, silu(gate), up -> a·3·I; + down_proj's input a·I when it trains
      LoRA:         lora_A outputs (r per module, fp32) and, with dropout, a dropped copy of each
                    adapted module's input plus its mask
    """
    plan = plan or StrategyPlan()
    s = req.seq_len
    h, q, kv, i = dims.hidden_size, dims.q_dim, dims.kv_dim, dims.intermediate_size
    a = DTYPE_BYTES[req.dtype]
    targets = set(plan.lora_targets) if kind == "lora" else (set(ALL_LINEAR) if kind == "trained" else set())
    norms_train = kind == "trained" or plan.train_norms
    attn_in = a * h if targets & {"q_proj", "k_proj", "v_proj"} else 0
    mlp_in = a * h if targets & {"gate_proj", "up_proj"} else 0
    norms = 8 * h + attn_in + mlp_in + (2 * a * h if norms_train else 0)
    if req.attn_implementation == "eager":
        attention = a * 4 * q + dims.num_heads * s * (4 + (a if a != 4 else 0))
    else:
        attention = a * (2 * q + 2 * kv)
    attention += a * q if "o_proj" in targets else 0
    mlp = a * 3 * i + (a * i if "down_proj" in targets else 0)
    lora = 0.0
    if kind == "lora":
        shapes = dims.linear_shapes()
        present = [t for t in plan.lora_targets if t in shapes]
        lora = 4 * plan.lora_rank * len(present)
        if plan.lora_dropout > 0:
            lora += sum((a + 1) * shapes[t][0] for t in present)
    return norms + attention + mlp + lora


def _layer_kinds(dims: ModelDims, plan: StrategyPlan) -> list[LayerKind | None]:
    """What each layer of the trained stack is; None = below every trainable weight (keeps nothing)."""
    if plan.strategy == "lora":
        return ["lora"] * dims.num_layers
    if plan.strategy == "full":
        return ["trained"] * dims.num_layers
    from_idx = _new_block_positions(dims.num_layers, plan.new_blocks)
    first = min(from_idx)
    kinds: list[LayerKind | None] = []
    for j in range(dims.num_layers + plan.new_blocks):
        if j in from_idx:
            kinds.append("trained")
        else:
            kinds.append("frozen" if (j > first or plan.train_embeddings) else None)
    return kinds


def _new_block_positions(num_layers: int, new_blocks: int) -> set[int]:
    # the same interleaving as strategies.insertion_points (LLaMA Pro), in the grown stack
    after = [round((k + 1) * num_layers / new_blocks) - 1 for k in range(new_blocks)]
    return {a + k + 1 for k, a in enumerate(after)}


def _backward_working_set(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest, kinds) -> int:
    """Memory the backward pass of one layer needs on top of what is saved: the recomputed
    layer (with checkpointing), eager attention's score gradient, and the hidden-state gradients."""
    tokens = req.seq_len * req.micro_batch
    a = DTYPE_BYTES[req.dtype]
    work = 3 * max(a, 4) * dims.hidden_size * tokens  # grad in, grad out, residual grad
    if req.gradient_checkpointing:
        per_layer = max(layer_activation_bytes_per_token(dims, req, k, plan) for k in kinds if k) * tokens
        work += int(per_layer)
    if req.attn_implementation == "eager":
        work += req.micro_batch * dims.num_heads * req.seq_len**2 * 2 * 4  # scores' grad, fp32, twice
    return work


def activation_bytes(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest) -> int:
    """Saved for backward across the stack (the backward working set is counted separately)."""
    tokens = req.seq_len * req.micro_batch
    a = DTYPE_BYTES[req.dtype]
    kinds = _layer_kinds(dims, plan)
    if req.gradient_checkpointing:
        saved = sum(1 for k in kinds if k) * a * dims.hidden_size * tokens  # each layer keeps its input
    else:
        saved = sum(layer_activation_bytes_per_token(dims, req, k, plan) for k in kinds if k) * tokens
    # the final norm (fp32 input + output for the head) and, at 16 bits, the eager causal mask
    final = tokens * dims.hidden_size * (4 + a)
    mask = req.micro_batch * req.seq_len**2 * a if req.attn_implementation == "eager" else 0
    return int(saved + final + mask)


def logits_bytes(dims: ModelDims, req: MemoryRequest, *, teacher: bool = False) -> int:
    """Peak of the output projection and the loss. The stock loss keeps the fp32 log-softmax of
    the whole sequence, and in backward holds its gradient and the logits' gradient beside it
    (12 bytes per logit; + a at 16 bits for the cast logits); the chunked loss holds the same for
    one chunk. A teacher keeps its logits and log-probabilities."""
    a = DTYPE_BYTES[req.dtype]
    positions = req.seq_len if req.loss_chunk is None else min(req.loss_chunk, req.seq_len)
    per_logit = (a + 4) if teacher else (12 + (a if a != 4 else 0))
    return int(req.micro_batch * positions * dims.vocab_size * per_logit)


def teacher_bytes(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest) -> int:
    if req.teacher == "none":
        return 0
    t_dims = req.teacher_dims if req.teacher == "model" else dims
    t_logits = logits_bytes(t_dims, req, teacher=True)
    # a no-grad forward holds about one layer's working set at a time
    working = int(layer_activation_bytes_per_token(t_dims, req, "trained") * req.seq_len * req.micro_batch)
    if req.teacher == "base":
        return t_logits + working
    t_weights = weight_bytes(t_dims, StrategyPlan(strategy="full"), req)
    return t_weights + t_logits + working


def probe_head_chunk(batch: int, positions: int, vocab_size: int, *, dtype_bytes: int = 4,
                     budget_bytes: int = PROBE_HEAD_BUDGET_BYTES) -> int:
    """Positions per chunk of the probes' output projection (all ``batch`` rows in each chunk):
    the chunked loss's sizing (``losses/chunk_policy.py``) at :data:`PROBE_HEAD_BUDGET_BYTES`."""
    return positions_per_chunk(max(1, batch), max(1, positions), vocab_size, dtype_bytes=dtype_bytes,
                               budget_bytes=budget_bytes, loss="ce")


def probe_working_bytes(dims: ModelDims, seq_len: int, batch: int = 1, *, dtype: str = "float32",
                        attn_implementation: str = "sdpa") -> int:
    """Working set of one probe forward of ``batch`` rows x ``seq_len`` tokens without gradients,
    on top of the weights (what ``evaluation/probes.py`` does).

    Without autograd a layer's intermediates are freed as soon as they are used, so the peak holds
    the residual stream, the final hidden states (kept for the chunked head), RMSNorm's fp32
    upcast, the larger of attention (q, k, v with their rotated copies, the output; eager adds
    the fp32 scores and their cast per head) and the SwiGLU MLP (gate, up, silu(gate), the
    product), and one chunk of logits with its log-softmax (fp32, + the model-dtype logits at 16 bits).
    """
    a = DTYPE_BYTES[dtype]
    tokens = seq_len * batch
    h, q, kv, i = dims.hidden_size, dims.q_dim, dims.kv_dim, dims.intermediate_size
    attention = a * (2 * q + 3 * kv + q + h)  # q, k, v, rotated q and k, SDPA output, o_proj output
    if attn_implementation == "eager":
        attention += dims.num_heads * seq_len * (4 + (a if a != 4 else 0))
    mlp = a * 3 * i  # silu(gate), up and their product (gate itself is freed once activated)
    per_token = 3 * a * h + 8 * h + max(attention, mlp)  # residual, layer input, final hidden; fp32 norm
    chunk = probe_head_chunk(batch, seq_len, dims.vocab_size, dtype_bytes=a)
    head = batch * chunk * dims.vocab_size * (8 + (a if a != 4 else 0))
    mask = batch * seq_len**2 * a if attn_implementation == "eager" else 0
    return int(per_token * tokens + head + mask)


def probe_batch_for(dims: ModelDims, seq_len: int, budget_bytes: float, *, dtype: str = "float32",
                    attn_implementation: str = "sdpa", upper: int = 64) -> int:
    """The most rows (<= ``upper``) whose probe working set fits ``budget_bytes``; at least 1
    (a probe that does not fit one row reports an out-of-memory error naming its length)."""
    def fits(b: int) -> bool:
        return probe_working_bytes(dims, seq_len, b, dtype=dtype, attn_implementation=attn_implementation) <= budget_bytes

    lo, hi = 1, max(1, upper)
    while lo < hi:  # the working set grows with the rows: largest b with fits(b)
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def estimate_memory(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest) -> MemoryEstimate:
    """Peak memory of one optimizer step on one device (data parallel replicates it).

    The loss (forward and its backward) and the backward of the decoder layers happen one after
    the other: the peak holds the saved activations plus the larger of the two working sets,
    which the breakdown reports as ``logits`` and ``backward``.
    """
    req.check()
    notes = []
    if req.quantization == "4bit" and req.backend != "cuda":
        notes.append("4-bit QLoRA needs CUDA and bitsandbytes; estimated as if they were present")
    if req.quantization == "4bit" and plan.strategy == "full":
        raise PlanError("Full fine-tuning cannot train 4-bit weights.", hint="Use strategy lora (QLoRA).")
    if plan.strategy == "block_expansion" and not 1 <= plan.new_blocks <= dims.num_layers:
        raise PlanError(f"new_blocks must be between 1 and {dims.num_layers} (got {plan.new_blocks}).")
    w = weight_bytes(dims, plan, req)
    t = trainable_state_bytes(dims, plan, req)
    act = activation_bytes(dims, plan, req)
    lg = logits_bytes(dims, req)
    bw = _backward_working_set(dims, plan, req, _layer_kinds(dims, plan))
    te = teacher_bytes(dims, plan, req)
    tensors = w + t + act + max(lg, bw) + te
    if req.backend == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_SLACK * tensors)
    else:
        overhead = CPU_RUNTIME_BYTES + int(CPU_ALLOCATOR_SLACK * tensors)
    if req.attn_implementation == "eager" and req.seq_len > 8192:
        notes.append("eager attention keeps the full score matrix per layer; use sdpa or flash_attention_2")
    probe = probe_working_bytes(dims, req.seq_len, req.probe_batch, dtype=req.dtype,
                                attn_implementation=req.attn_implementation)
    # (layers run one at a time without gradients: the depth does not change the probes' working set)
    layers = dims.num_layers + (plan.new_blocks if plan.strategy == "block_expansion" else 0)
    # the export reloads the saved model on the CPU in fp32 (models.export_merged): on a CPU run
    # that is the same memory as training; with an accelerator it is host RAM, noted, not added
    reload = dims.n_params(layers - dims.num_layers) * 4 if req.merge_export else 0
    export = reload if req.backend == "cpu" else 0
    if reload and not export:
        notes.append(f"the merged export reloads the model in fp32 on the host: ~{reload / GiB:.1f} GiB of RAM")
    return MemoryEstimate(w, t, act, lg, bw, te, overhead, tuple(notes), probe, export)


def max_seq_len(dims: ModelDims, plan: StrategyPlan, req: MemoryRequest, budget_bytes: float,
                *, multiple_of: int = 256, upper: int = 1 << 21) -> int:
    """The longest sequence (a multiple of ``multiple_of``) whose estimate fits ``budget_bytes``;
    0 when not even ``multiple_of`` tokens fit. Memory grows monotonically with length."""
    def fits(n: int) -> bool:
        return estimate_memory(dims, plan, replace(req, seq_len=n)).total <= budget_bytes

    if not fits(multiple_of):
        return 0
    lo, hi = 1, max(1, upper // multiple_of)
    while lo < hi:  # largest k with fits(k * multiple_of)
        mid = (lo + hi + 1) // 2
        if fits(mid * multiple_of):
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple_of


def format_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "unknown"
    return f"{n / GiB:.2f} GiB"
