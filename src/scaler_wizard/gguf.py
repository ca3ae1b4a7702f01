"""GGUF in: a ``model.path`` that names a ``.gguf`` file (llama.cpp's format), or a folder holding
exactly one, loads through transformers' GGUF support, dequantized to the recipe's dtype, and
comes out as a plain transformers model whose ``save_pretrained`` writes a standard HF folder.

transformers loads GGUF with ``from_pretrained(folder, gguf_file=name)``: the config and the
tokenizer are rebuilt from the file's metadata and every tensor is dequantized (the ``gguf``
package's dequantizers for most architectures, transformers' own for a few). The loaded model
carries ``quantization_config = {quant_method: gguf}`` and ``save_pretrained`` refuses it, so
:func:`load_gguf_model` rebuilds the model from the same config without that entry and moves the
dequantized tensors into it (``load_state_dict(assign=True)``: no second copy of the weights).

Before any tensor is read, :func:`inspect_gguf` reads the header (memory-mapped, cheap) and
:func:`check_gguf` turns what transformers cannot load -- an architecture it has no mapping for,
an encoder-decoder, a quantization type without a dequantizer, a split file -- into a
:class:`~scaler_wizard.errors.ModelLoadError` with the fix.

Needs the ``gguf`` package (``pip install 'gguf>=0.10'``; transformers' minimum); no torch import
at module level.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

GGUF_SUFFIX = ".gguf"
#: llama.cpp's names for a few architectures differ from transformers' model types
ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
#: GGUF architectures that transformers loads but that are not causal LMs
NOT_CAUSAL = {"t5", "t5encoder", "umt5", "bert", "nomic-bert", "jina-bert-v2"}
FLOAT_TYPES = {"F32", "F16", "BF16"}
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
INSTALL_HINT = "Install the gguf package (pip install 'gguf>=0.10'; the project's optional extra for GGUF)."


@dataclass(frozen=True)
class GGUFInfo:
    """What the header says: enough to refuse a file before reading its tensors."""

    path: Path
    architecture: str
    name: str | None
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    context_length: int | None = None

    @property
    def model_type(self) -> str:
        return ARCH_ALIASES.get(self.architecture, self.architecture)


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file that ``path`` names: the file itself, or the only ``.gguf`` file of a folder
    without ``config.json`` (a folder with ``config.json`` is a Hugging Face model folder: None).
    None when ``path`` is neither. Several ``.gguf`` files in one folder, or a split file, are a
    :class:`ModelLoadError` saying which to name."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() != GGUF_SUFFIX:
            return None
        _refuse_split(p)
        return p
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == GGUF_SUFFIX)
    if not files:
        return None
    if len(files) > 1:
        if all(_SPLIT.search(f.name) for f in files):
            _refuse_split(files[0])
        names = ", ".join(f.name for f in files[:6]) + (" ..." if len(files) > 6 else "")
        raise ModelLoadError(
            f"{p} holds {len(files)} GGUF files ({names}); which one to load is ambiguous.",
            hint=f"Set model.path to one file, e.g. {files[0]}.",
        )
    _refuse_split(files[0])
    return files[0]


def _refuse_split(file: Path) -> None:
    if _SPLIT.search(file.name):
        raise ModelLoadError(
            f"{file.name} is one part of a split GGUF file; transformers loads single files only.",
            hint="Merge the parts first with llama.cpp's `llama-gguf-split --merge FIRST_PART OUT.gguf`.",
        )


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("Loading a GGUF model needs the gguf package, which is not installed.",
                             hint=INSTALL_HINT) from None
    return gguf


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header: architecture, name, tensor types (no tensor data is read)."""
    gguf = _gguf_module()
    file = Path(path)
    try:
        reader = gguf.GGUFReader(str(file), "r")
    except Exception as exc:  # noqa: BLE001 - bad magic, truncated file, unknown version
        raise ModelLoadError(f"{file} is not a readable GGUF file ({type(exc).__name__}: {exc}).",
                             hint="Check the file (a complete download, a .gguf written by llama.cpp).") from None

    def field_value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - an odd field type: treat as absent
            return None

    arch = field_value("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{file} has no general.architecture in its header.",
                             hint="Re-export the model with llama.cpp's convert_hf_to_gguf.py.")
    types = Counter()
    for t in reader.tensors:
        try:
            types[gguf.GGMLQuantizationType(int(t.tensor_type)).name] += 1
        except ValueError:
            types[f"type {int(t.tensor_type)}"] += 1
    ctx = field_value(f"{arch}.context_length")
    name = field_value("general.name")
    return GGUFInfo(file, arch, name if isinstance(name, str) else None, dict(types),
                    int(ctx) if isinstance(ctx, int) else None)


def supported_architectures() -> set[str]:
    """Model types transformers can build from GGUF metadata (both of its loaders)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names |= set(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names - {"general", "tokenizer"}


def supported_tensor_types() -> set[str]:
    """Tensor types some loader of transformers can dequantize: the float types, the gguf
    package's dequantizers, and transformers' own (newer versions)."""
    names = set(FLOAT_TYPES)
    gguf = _gguf_module()
    try:
        from gguf import quants

        names |= {t.name for t in getattr(quants, "_type_traits", {})}
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        names |= {gguf.GGMLQuantizationType(t).name for t in GGML_BLOCK}
    except (ImportError, ValueError):
        pass
    return names


def check_gguf(info: GGUFInfo) -> None:
    """A :class:`ModelLoadError` for what transformers cannot load as a causal LM."""
    if info.architecture in NOT_CAUSAL or info.model_type in NOT_CAUSAL:
        raise ModelLoadError(
            f"{info.path.name} holds a {info.architecture} model, not a decoder-only causal LM.",
            hint="Context extension needs a causal LM (Llama, Mistral, Qwen2, ...).",
        )
    archs = supported_architectures()
    if archs and info.architecture not in archs and info.model_type not in archs:
        raise ModelLoadError(
            f"{info.path.name}: transformers cannot load GGUF architecture {info.architecture!r} "
            f"(it maps {', '.join(sorted(archs))}).",
            hint="Use the model's Hugging Face (safetensors) folder instead, or a newer transformers.",
        )
    unsupported = sorted(t for t in info.tensor_types if t not in supported_tensor_types())
    if unsupported:
        raise ModelLoadError(
            f"{info.path.name} has tensors of quantization type(s) {', '.join(unsupported)}, which cannot be "
            "dequantized here.",
            hint="Re-quantize it with llama.cpp's llama-quantize to a supported type (F16, Q8_0, Q6_K, Q4_K_M), "
                 "or use the model's Hugging Face folder.",
        )


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"Unknown dtype {dtype!r} for a GGUF model.", hint="Use float32, bfloat16 or float16.")
    return table[dtype]


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
    return no_init_weights()


def plain_model(model: Any, dtype: Any) -> Any:
    """The same weights in a model built from the config without ``quantization_config`` (so
    ``save_pretrained`` writes a plain HF folder). The tensors are moved, not copied."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = dtype
    with _no_init():  # the weights are replaced below: skip the random init
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=model.config._attn_implementation)
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(
            f"Rebuilding the GGUF model as a plain model left {len(missing)} weight(s) unset and "
            f"{len(unexpected)} unused ({', '.join((missing + unexpected)[:4])}).",
            hint="This architecture's GGUF conversion is incomplete in this transformers version; "
                 "use the model's Hugging Face folder.",
        )
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.to(dtype).eval()


def load_gguf_model(path: str | Path, dtype: Any = "float32", *, attn_implementation: str | None = None
                    ) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file or a folder holding exactly one, dequantized
    to ``dtype`` (``"float32"`` / ``"bfloat16"`` / ``"float16"`` or a torch dtype), as a plain
    transformers model without ``quantization_config``. Refusals are :class:`ModelLoadError`."""
    file = find_gguf(path)
    if file is None:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a folder holding one.",
                             hint="Set model.path to a .gguf file, or to a Hugging Face model folder.")
    info = inspect_gguf(file)
    check_gguf(info)
    torch_dtype = _torch_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": file.name, "dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:  # newer transformers may keep the blocks packed; ask for dense weights explicitly
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=file.name, dequantize=True)
    except (ImportError, TypeError):
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), **kwargs)
    except ModelLoadError:
        raise
    except (ValueError, NotImplementedError, KeyError, OSError, RuntimeError) as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"transformers could not load {file.name} ({info.architecture}, "
            f"{', '.join(sorted(info.tensor_types))}): {first}",
            hint="Use the model's Hugging Face folder, or re-export the GGUF with llama.cpp (F16 or Q8_0).",
        ) from None
    model = plain_model(model, torch_dtype)
    model.config._name_or_path = str(file)
    return model, tokenizer
