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

Needle templates (contamination control)
-----------------------------------------
The wording above is ``PROBE_TEMPLATE``: the evaluation template that every probe, benchmark
and gate uses. ``TRAIN_TEMPLATES`` are other wordings (key sentence, question and filler all
differ) for *training* rows, and ``HELDOUT_TEMPLATE`` is used by nothing but evaluation, so a
model can be scored on a needle format it never saw. Training rows of a context extension must
be built from ``TRAIN_TEMPLATES`` only (``MixedTemplateBuilder``); ``assert_not_probe`` guards it.
Every template's question ends so that the answer is ``" K"``, exactly as in the probe.
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


@dataclass(frozen=True)
class NeedleTemplate:
    """One needle format: the key sentence (``{key}`` marks each mention of the key), the
    question whose greedy continuation must be ``" K"``, and the filler sentences repeated in
    order to make the haystack."""

    name: str
    key_sentence: str
    question: str
    filler: tuple[str, ...]

    def __post_init__(self) -> None:
        if "{key}" not in self.key_sentence:
            raise ValueError(f"template {self.name!r}: the key sentence has no {{key}}")
        if not self.filler:
            raise ValueError(f"template {self.name!r}: no filler sentences")


PROBE_TEMPLATE = NeedleTemplate("probe", KEY_SENTENCE, QUESTION, FILLER_SENTENCES)

TRAIN_TEMPLATES: tuple[NeedleTemplate, ...] = (
    NeedleTemplate(
        "secret_number",
        "The secret number is {key}. Keep it in mind. {key} is the secret number.",
        "What is the secret number? The secret number is",
        ("The river runs to the sea.", "A bird sings in the tree.", "The hills are quiet.",
         "We rest by the fire.", "Morning comes again."),
    ),
    NeedleTemplate(
        "code",
        "Remember the code {key}. The code is {key}.",
        "Which code did you remember? The code is",
        ("The wind blows over the field.", "Bread is baked at dawn.", "The door is open.",
         "Stars fill the night.", "All is well."),
    ),
    NeedleTemplate(
        "magic_word",
        "The magic word is {key}. Say it again: {key}.",
        "Now, what is the magic word? The magic word is",
        ("The boat floats on the lake.", "Snow covers the ground.", "A dog runs home.",
         "The bell rings twice.", "Time moves on."),
    ),
    NeedleTemplate(
        "lucky_number",
        "My lucky number is {key}. Again: {key}.",
        "And my lucky number? It is",
        ("The trees are tall.", "Water is cold in winter.", "The market is busy today.",
         "Children play outside.", "The lamp is lit."),
    ),
    NeedleTemplate(
        "room_number",
        "Note this: the room number is {key}. The room number is {key}.",
        "What was the room number? The room number is",
        ("The road goes on and on.", "Leaves fall in autumn.", "The mountain is high.",
         "A song is sung.", "The clock strikes noon."),
    ),
)

HELDOUT_TEMPLATE = NeedleTemplate(
    "heldout",
    "The hidden value is {key}. Note it well. {key} is the hidden value.",
    "What is the hidden value? The hidden value is",
    ("The cat sleeps on the mat.", "Rain falls in the spring.", "The path is long.",
     "We walk together.", "Night follows day."),
)

TEMPLATES: dict[str, NeedleTemplate] = {t.name: t for t in (PROBE_TEMPLATE, *TRAIN_TEMPLATES, HELDOUT_TEMPLATE)}


def get_template(name: str) -> NeedleTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown needle template {name!r}; known: {sorted(TEMPLATES)}") from None


def assert_not_probe(template: NeedleTemplate) -> None:
    """Raise if ``template`` shares the probe's or the held-out template's wording (a training
    row built from it would contaminate the evaluation)."""
    for evaluation in (PROBE_TEMPLATE, HELDOUT_TEMPLATE):
        if template.key_sentence == evaluation.key_sentence or template.question == evaluation.question:
            raise ValueError(f"template {template.name!r} reuses the {evaluation.name!r} evaluation template")


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
    """Builds passkey prompts of an exact-ish token length for one tokenizer and one needle
    template (default: the probe's)."""

    def __init__(self, tokenizer: TokenEncoder, bos_token_id: int | None, template: NeedleTemplate = PROBE_TEMPLATE):
        self.template = template
        self._bos = [bos_token_id] if bos_token_id is not None else []
        enc = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
        self._enc = enc
        self._filler = [enc(" " + s) for s in template.filler]
        self._question = enc(" " + template.question)

    def key_sentence_ids(self, key: int) -> list[int]:
        return self._enc(" " + self.template.key_sentence.format(key=key))

    def key_mentions(self, example: PasskeyExample) -> list[int]:
        """Start offsets (inside ``prompt_ids``) of every mention of the key's digits within the
        key sentence, in order; the second one is a copy target (loss on the second mention)."""
        digits = self._enc(str(example.key))
        s, e = example.key_token_span
        span = example.prompt_ids[s:e]
        out, i = [], 0
        while i <= len(span) - len(digits):
            if span[i : i + len(digits)] == digits:
                out.append(s + i)
                i += len(digits)
            else:
                i += 1
        return out

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


class MixedTemplateBuilder:
    """Training rows over several templates (default ``TRAIN_TEMPLATES``), never the probe's or
    the held-out one: ``build`` takes the template by ``template_index`` (round robin when the
    caller counts rows) or draws it with ``rng``."""

    def __init__(
        self,
        tokenizer: TokenEncoder,
        bos_token_id: int | None,
        templates: Sequence[NeedleTemplate] = TRAIN_TEMPLATES,
        allow_evaluation_templates: bool = False,
    ):
        if not templates:
            raise ValueError("no templates")
        if not allow_evaluation_templates:
            for t in templates:
                assert_not_probe(t)
        self.builders = [PasskeyBuilder(tokenizer, bos_token_id, t) for t in templates]
        self._next = 0

    @property
    def templates(self) -> list[NeedleTemplate]:
        return [b.template for b in self.builders]

    def min_length(self) -> int:
        return max(b.min_length() for b in self.builders)

    def builder(self, template_index: int | None = None, rng: random.Random | None = None) -> PasskeyBuilder:
        if template_index is None:
            if rng is not None:
                template_index = rng.randrange(len(self.builders))
            else:
                template_index, self._next = self._next, self._next + 1
        return self.builders[template_index % len(self.builders)]

    def build(
        self,
        length: int,
        depth: float,
        key: int,
        template_index: int | None = None,
        rng: random.Random | None = None,
    ) -> PasskeyExample:
        return self.builder(template_index, rng).build(length, depth, key)


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
