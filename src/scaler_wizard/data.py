"""Data loading through `datasets` and the stage batches built from it.

Accepted inputs (recipe ``data.train`` / ``data.eval``): ``.jsonl``/``.json`` (a ``text`` field,
name configurable), ``.txt`` (one document per line), ``.parquet``, ``.csv``, or a folder
written by ``Dataset.save_to_disk``. Documents are tokenized once and joined with EOS into a
token stream; stage rows are windows of that stream, plus optional synthetic passkey rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}

TASK_LM = 0
TASK_PASSKEY = 1


def load_texts(paths: list[Path], text_field: str) -> list[str]:
    """All non-empty documents of the given files/folders, in order."""
    import datasets

    texts: list[str] = []
    for path in paths:
        if not path.exists():
            raise DataError(f"Data file {path} does not exist.", hint="Fix the path in data.train / data.eval.")
        try:
            if path.is_dir():
                if not ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
                    raise DataError(
                        f"Data folder {path} is not a saved `datasets` folder (no dataset_info.json/state.json).",
                        hint="Point data.train at files (.jsonl/.txt/.parquet) or a Dataset.save_to_disk folder.",
                    )
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[next(iter(ds))]
            else:
                builder = _BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise DataError(
                        f"Data file {path} has an unsupported extension '{path.suffix}'.",
                        hint=f"Use one of {', '.join(sorted(_BUILDERS))} or a saved datasets folder.",
                    )
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types for malformed files
            raise DataError(
                f"Could not read data file {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                hint="Check that the file is valid (one JSON object per line for .jsonl).",
            ) from None
        field = "text" if (path.is_file() and path.suffix.lower() == ".txt") else text_field
        if field not in ds.column_names:
            raise DataError(
                f"Data file {path} has no '{field}' field (columns: {ds.column_names}).",
                hint="Set data.text_field to the column holding the text.",
            )
        bad = [i for i, t in enumerate(ds[field]) if t is not None and not isinstance(t, str)]
        if bad:
            raise DataError(f"Data file {path}: field '{field}' is not text in row {bad[0] + 1}.")
        texts.extend(t for t in ds[field] if t and t.strip())
    if not texts:
        raise DataError(f"No text found in {[str(p) for p in paths]}.", hint="The data files are empty.")
    return texts


def token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    return ids


def split_heldout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic document-level split used when the recipe names no eval data."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(texts) * fraction)) if len(texts) > 1 else 0
    held = set(order[:n_eval])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


@dataclass
class StageRows:
    """Pre-built training rows for one stage (all of ``length`` tokens)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    attention_mask: list[list[int]]
    task: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        return {
            "input_ids": torch.tensor(self.input_ids[i]),
            "labels": torch.tensor(self.labels[i]),
            "attention_mask": torch.tensor(self.attention_mask[i]),
            "task": torch.tensor(self.task[i]),
        }

    @property
    def padding_fraction(self) -> float:
        total = sum(len(m) for m in self.attention_mask)
        return 1 - sum(sum(m) for m in self.attention_mask) / total if total else 0.0


def build_stage_rows(
    stream: list[int],
    length: int,
    n_rows: int,
    *,
    passkey_share: float,
    passkey_builder: Any | None,
    pad_id: int,
    seed: int,
) -> StageRows:
    """Windows of the stream and, for ``passkey_share`` of the rows, passkey examples.

    Passkey rows are supervised on the key's second mention and on the answer only (a
    completion-style loss); the language-model rows on every token.
    """
    from .evaluation.passkey import KEY_RANGE

    if len(stream) < length + 1:
        raise DataError(
            f"The training data has {len(stream)} tokens, fewer than one {length}-token window.",
            hint="Add more text or lower context.target_length.",
        )
    rng = random.Random(seed)
    rows = StageRows([], [], [], [])
    n_passkey = round(n_rows * passkey_share) if passkey_builder is not None else 0
    kinds = [TASK_PASSKEY] * n_passkey + [TASK_LM] * (n_rows - n_passkey)
    rng.shuffle(kinds)
    min_pk = min(64, length)
    for kind in kinds:
        if kind == TASK_LM:
            start = rng.randrange(0, len(stream) - length)
            window = stream[start : start + length]
            rows.input_ids.append(window)
            rows.labels.append(list(window))
            rows.attention_mask.append([1] * length)
        else:
            ex = passkey_builder.build(rng.randint(min_pk, length), rng.random(), rng.randint(*KEY_RANGE))
            ids = ex.input_ids
            labels = [-100] * len(ids)
            for j in range(len(ex.prompt_ids), len(ids)):
                labels[j] = ids[j]
            pad = length - len(ids)
            rows.input_ids.append(ids + [pad_id] * pad)
            rows.labels.append(labels + [-100] * pad)
            rows.attention_mask.append([1] * len(ids) + [0] * pad)
        rows.task.append(kind)
    return rows
