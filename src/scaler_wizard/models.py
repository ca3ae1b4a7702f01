"""Models in and out: check a folder, load a causal LM and its tokenizer, find its decoder and
output head (through a PEFT wrapper), add capacity, export the merged result.

Weights are read as safetensors only: a folder with pickle-only weights is refused, because
unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .errors import ExportError, ModelLoadError

MODEL_DTYPES = ("float32", "bfloat16", "float16")
QLORA_CPU_HINT = ("Without a GPU, remove model.quantization and train LoRA in bfloat16 or float32 (model.dtype); "
                  "for QLoRA run the recipe on a machine with a CUDA GPU and bitsandbytes installed.")


def check_model_dir(path: Path) -> None:
    """A Hugging Face model folder with config, safetensors weights and a tokenizer -- or a GGUF
    file (or a folder holding exactly one), whose header is checked for a supported architecture
    and quantization type (``gguf.py``)."""
    gguf = gguf_file(path)
    if gguf is not None:
        from .gguf import check_gguf, inspect_gguf

        check_gguf(inspect_gguf(gguf))  # the header only: a refusal before anything is written
        return
    if not path.is_dir():
        raise ModelLoadError(
            f"Model folder {path} does not exist.",
            hint="Set model.path to a Hugging Face model folder (config.json, *.safetensors, tokenizer), "
            "or builtin:demo for the embedded demo model.",
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    has_weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_weights:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelLoadError(
                f"Model folder {path} holds only pickle weights (*.bin/*.pt); Scaler Wizard reads safetensors only "
                "because unpickling can run arbitrary code.",
                hint="Convert once with transformers: AutoModelForCausalLM.from_pretrained(p).save_pretrained(p, "
                "safe_serialization=True) on a machine where you trust the file.",
            )
        missing.append("*.safetensors")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer_config.json)")
    if missing:
        raise ModelLoadError(
            f"Model folder {path} is missing {', '.join(missing)}.",
            hint="Save the model and its tokenizer with save_pretrained() into that folder.",
        )
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({exc}).", hint="Restore the file.") from None


def quantization_kwargs(quantization: Any) -> dict[str, Any]:
    """``model.quantization`` (QLoRA) as the keyword arguments of transformers'
    ``BitsAndBytesConfig`` (building the config does not need bitsandbytes; loading does)."""
    q = quantization.model_dump() if hasattr(quantization, "model_dump") else dict(quantization)
    if int(q["bits"]) == 8:
        return {"load_in_8bit": True}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": q.get("quant_type", "nf4"),
            "bnb_4bit_compute_dtype": q.get("compute_dtype", "bfloat16"),
            "bnb_4bit_use_double_quant": bool(q.get("double_quant", True))}


def quantization_config(quantization: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**quantization_kwargs(quantization))


def load_causal_lm(path: Path, *, dtype: str = "float32", attn_implementation: str | None = None,
                   what: str = "the model", quantization: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a checked local folder; every transformers failure becomes a
    :class:`ModelLoadError` naming the folder. ``quantization`` (the recipe's
    ``model.quantization``: QLoRA) loads the base weights through bitsandbytes on the current
    CUDA device; without CUDA it is refused (preflight refuses it first)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in MODEL_DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported for {what}.", hint=f"Use one of {list(MODEL_DTYPES)}.")
    check_model_dir(path)
    gguf = gguf_file(path)
    if gguf is not None:  # dequantized to ``dtype``; saved later as a plain HF folder
        from .gguf import load_gguf_model

        model, tokenizer = load_gguf_model(gguf, dtype, attn_implementation=attn_implementation)
        return model, _prepare_tokenizer(tokenizer)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        if not torch.cuda.is_available():
            raise ModelLoadError(f"model.quantization (QLoRA) needs a CUDA GPU to load {what}; none is visible.",
                                 hint=QLORA_CPU_HINT)
        kwargs["quantization_config"] = quantization_config(quantization)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise ModelLoadError(
            f"Could not load {what} in {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            hint="Check that it is a causal language model saved with save_pretrained().",
        ) from None
    return model, _prepare_tokenizer(tokenizer)


def _prepare_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The tokenizer's length limit is the old context; we tokenize whole documents into a stream.
    tokenizer.model_max_length = int(1e12)
    return tokenizer


def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``model.path`` names (the file, or the one in a folder without safetensors)."""
    from .gguf import find_gguf

    return find_gguf(path)


def load_model_config(path: Path) -> Any:
    """The transformers config of a model folder or GGUF file."""
    from transformers import AutoConfig

    gguf = gguf_file(path)
    try:
        if gguf is not None:
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"{gguf or path / 'config.json'} is not a usable model config: {exc}") from None


def unwrap(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder that returns normalised final hidden states, output projection) of a causal LM,
    through a PEFT wrapper if there is one (``model.model`` and ``lm_head`` for Llama)."""
    base = unwrap(model)
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if decoder is None:
        raise ModelLoadError(f"{type(base).__name__} has no decoder attribute {base.base_model_prefix!r}.",
                             hint="Scaler Wizard supports transformers' *ForCausalLM models.")
    return decoder, base.get_output_embeddings()


def frozen_output_head(model: Any) -> Any:
    """The base (frozen) output projection: through a LoRA layer on ``lm_head`` to its base layer
    and through a ``modules_to_save`` wrapper to the original module."""
    head = unwrap(model).get_output_embeddings()
    if hasattr(head, "get_base_layer"):
        head = head.get_base_layer()
    if hasattr(head, "original_module"):
        head = head.original_module
    return head


EXPORT_CHECK_POSITIONS = 64
#: a float32 export must reproduce the trained model's logits to this absolute difference
EXPORT_FP32_TOLERANCE = 1e-3
#: a bfloat16/float16 export must choose the same next token at this share of the positions
EXPORT_HALF_MIN_TOP1 = 0.9


def export_merged(model: Any, tokenizer: Any, out: Path, stream: list[int], length: int,
                  save_dtype: str) -> dict[str, Any]:
    """Merge the adapter (if any), save a plain model, reload it with plain transformers and
    compare its logits with the training model's on one held-out window: the export is checked,
    not assumed. A grown model (block expansion) is saved as it is, with its larger config.

    The window is the full ``length`` (so a position encoding saved wrongly shows beyond the
    original length), but logits are compared at :data:`EXPORT_CHECK_POSITIONS` positions spread
    over it, through the decoder and the output head: full ``[length, vocab]`` logits for both
    models (and their difference) were the whole run's memory peak on a real 49K-vocabulary
    model (issue 15), while the positions compared still cover every part of the window.

    The folder is written as ``<out>.partial`` and renamed once the reload check passed, so a
    kill mid-export never leaves a folder that looks finished."""
    import torch
    from transformers import AutoModelForCausalLM

    window = torch.tensor([stream[:length]])
    n = window.shape[1]
    positions = torch.linspace(0, n - 1, steps=min(EXPORT_CHECK_POSITIONS, n)).round().long().unique()
    device = next(model.parameters()).device
    model.eval()
    before = _logits_at(model, window.to(device), positions.to(device)).cpu()
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.to(getattr(torch, save_dtype))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    reloaded = AutoModelForCausalLM.from_pretrained(str(partial), dtype=torch.float32, local_files_only=True)
    after = _logits_at(reloaded, window, positions)
    del reloaded
    diff = (before - after).abs().max().item()
    top1 = (before.argmax(-1) == after.argmax(-1)).float().mean().item()
    check = {"max_abs_logit_diff": diff, "top1_agreement": top1, "tokens": int(n),
             "positions_compared": int(positions.numel()), "dtype": save_dtype}
    # float32 must reproduce the trained model; a half-precision save rounds every weight, so it
    # is held to the same next-token choices instead (a wrong position encoding or an untied /
    # re-tied head changes them wholesale)
    broken = diff > EXPORT_FP32_TOLERANCE if save_dtype == "float32" else top1 < EXPORT_HALF_MIN_TOP1
    if broken:
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportError(
            f"The exported model ({save_dtype}) reloaded with transformers differs from the trained model: "
            f"max |logit difference| {diff:.4g}, next-token agreement {top1:.0%} over {check['positions_compared']} "
            f"positions of a {n}-token held-out window. Nothing was written to {out}.",
            hint="Use the adapter in the run folder (adapter/) with the resolved recipe's position encoding, and "
            "report this with the model's config.json: its architecture is saved in a way this export does not "
            "reproduce.",
        )
    publish_folder(partial, out)
    return check


def _logits_at(model: Any, window: Any, positions: Any) -> Any:
    """fp32 logits of ``window`` at ``positions`` only (decoder once, head on the chosen rows)."""
    import torch

    decoder, head = decoder_and_head(model)
    with torch.no_grad():
        hidden = decoder(input_ids=window).last_hidden_state
        return head(hidden[:, positions]).float()


def save_adapter(model: Any, tokenizer: Any, out: Path) -> None:
    """The PEFT adapter (safetensors), written aside and renamed into place."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    publish_folder(partial, out)


def publish_folder(partial: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``partial`` folder (a resumed run rewrites its outputs)."""
    from .fsutil import fsync_dir

    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    fsync_dir(out.parent)
