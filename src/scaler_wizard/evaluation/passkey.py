"""Passkey retrieval protocol (Landmark Attention / PI / YaRN), fixed and documented.

One protocol serves the demo model's pretraining, every scaling stage's probe and the
benchmarks, so that numbers are comparable across them:

* filler: the five sentences of ``FILLER_SENTENCES`` repeated in order until the
  prompt reaches the requested token length;
* key: a random 5-digit integer (10000..99999) drawn from a seeded ``random.Random``;
* the key sentence ``"The pass key is K. Remember it. K is the pass key."`` is inserted
  at a sentence boundary at the requested depth (0.0 = start, 1.0 = just before the question);
* the prompt ends ``"What is the pass key? The pass key is"``;
* score = exact match of the greedy continuation against ``" K"``.

Greedy decoding of the answer tokens is computed with one teacher-forced forward pass: the
greedy continuation equals the key exactly when the argmax at every answer position equals
the key's next token, so the two are the same test at a fraction of the cost.

Every piece is tokenized on its own with a leading space so that concatenating token ids
equals tokenizing the concatenated text for byte-level BPE tokenizers (pieces never merge
across a space boundary).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (10000, 99999)


class TokenEncoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class PasskeyExample:
    """A tokenized passkey prompt; ``answer_ids`` are the tokens to be produced greedily."""

    prompt_ids: list[int]
    answer_ids: list[int]
    key: int
    depth: float
    key_token_span: tuple[int, int]  # [start, end) of the key sentence inside prompt_ids

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


class PasskeyBuilder:
    """Builds passkey prompts of an exact-ish token length for one tokenizer."""

    def __init__(self, tokenizer: TokenEncoder, bos_token_id: int | None):
        self._bos = [bos_token_id] if bos_token_id is not None else []
        enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
        self._enc = enc
        self._filler = [enc(" " + s) for s in FILLER_SENTENCES]
        self._question = enc(" " + QUESTION)

    def key_sentence_ids(self, key: int) -> list[int]:
        return self._enc(" " + KEY_SENTENCE.format(key=key))

    def answer_ids(self, key: int) -> list[int]:
        return self._enc(f" {key}")

    def min_length(self) -> int:
        """Tokens of the fixed text (key sentence, question, answer) for the longest key of
        ``KEY_RANGE``, plus a little slack for keys that tokenize into more pieces: no
        example can be shorter than this."""
        key = KEY_RANGE[1]
        return len(self._bos) + len(self.key_sentence_ids(key)) + len(self._question) + len(self.answer_ids(key)) + 4

    def build(self, length: int, depth: float, key: int) -> PasskeyExample:
        """A prompt whose total length (prompt + answer) is at most ``length`` tokens."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be within [0, 1], got {depth}")
        key_ids = self.key_sentence_ids(key)
        answer = self.answer_ids(key)
        fixed = len(self._bos) + len(key_ids) + len(self._question) + len(answer)
        if fixed > length:
            raise ValueError(f"passkey length {length} is shorter than the fixed text ({fixed} tokens)")
        budget = length - fixed
        sentences: list[list[int]] = []
        used = 0
        i = 0
        while True:
            s = self._filler[i % len(self._filler)]
            if used + len(s) > budget:
                break
            sentences.append(s)
            used += len(s)
            i += 1
        insert_at = round(depth * len(sentences))
        before = [t for s in sentences[:insert_at] for t in s]
        after = [t for s in sentences[insert_at:] for t in s]
        start = len(self._bos) + len(before)
        prompt = self._bos + before + key_ids + after + self._question
        return PasskeyExample(prompt, answer, key, depth, (start, start + len(key_ids)))


def passkey_grid(
    builder: PasskeyBuilder,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials_per_cell: int,
    seed: int,
) -> list[tuple[int, float, PasskeyExample]]:
    """The full evaluation grid, deterministic for a given seed."""
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials_per_cell):
                key = rng.randint(*KEY_RANGE)
                out.append((length, depth, builder.build(length, depth, key)))
    return out
