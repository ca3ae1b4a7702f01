"""Needle templates: the probe's (evaluation), the training ones and the held-out one."""

import random

import pytest

from scaler_wizard.evaluation.passkey import (
    HELDOUT_TEMPLATE,
    KEY_RANGE,
    PROBE_TEMPLATE,
    TEMPLATES,
    TRAIN_TEMPLATES,
    MixedTemplateBuilder,
    NeedleTemplate,
    PasskeyBuilder,
    assert_not_probe,
    get_template,
    passkey_grid,
)

ALL = (PROBE_TEMPLATE, *TRAIN_TEMPLATES, HELDOUT_TEMPLATE)


def test_default_template_is_the_probe(tiny_tokenizer):
    a = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id)
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id, template=PROBE_TEMPLATE)
    assert a.template is PROBE_TEMPLATE
    assert a.build(200, 0.3, 54321).input_ids == b.build(200, 0.3, 54321).input_ids


def test_templates_are_distinct_and_named():
    assert len(TRAIN_TEMPLATES) >= 3
    names = [t.name for t in ALL]
    assert len(set(names)) == len(names) and set(TEMPLATES) == set(names)
    for t in ALL:
        assert get_template(t.name) is t
    sentences = [t.key_sentence for t in ALL]
    questions = [t.question for t in ALL]
    assert len(set(sentences)) == len(ALL) and len(set(questions)) == len(ALL)
    for t in TRAIN_TEMPLATES:
        assert not set(t.filler) & set(PROBE_TEMPLATE.filler)
        assert not set(t.filler) & set(HELDOUT_TEMPLATE.filler)
    assert not set(HELDOUT_TEMPLATE.filler) & set(PROBE_TEMPLATE.filler)
    with pytest.raises(ValueError):
        get_template("nope")
    with pytest.raises(ValueError):
        NeedleTemplate("bad", "no key here", "q", ("f.",))


@pytest.mark.parametrize("template", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("length", [128, 200, 513])
def test_length_answer_and_text(tiny_tokenizer, template, length):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id, template=template)
    ex = b.build(length, 0.5, 12345)
    longest_filler = max(len(tiny_tokenizer.encode(" " + s, add_special_tokens=False)) for s in template.filler)
    assert length - longest_filler < len(ex) <= length
    assert ex.input_ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ex.answer_ids).strip() == "12345"
    assert ex.answer_ids == tiny_tokenizer.encode(" 12345", add_special_tokens=False)
    text = tiny_tokenizer.decode(ex.prompt_ids[1:])
    assert template.key_sentence.format(key=12345) in text
    assert text.rstrip().endswith(template.question)
    assert tiny_tokenizer.encode(text + " 12345", add_special_tokens=False) == ex.input_ids[1:]
    assert b.min_length() <= length


@pytest.mark.parametrize("template", ALL, ids=lambda t: t.name)
def test_depth_placement(tiny_tokenizer, template):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id, template=template)
    starts = [b.build(400, d, 11111).key_token_span[0] for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts[0] == 1
    assert starts == sorted(starts) and len(set(starts)) == 5
    deep = b.build(400, 1.0, 11111)
    # depth 1.0: only the question follows the key sentence
    assert deep.key_token_span[1] == len(deep.prompt_ids) - len(b._question)
    mid = b.build(400, 0.5, 11111)
    haystack = len(mid.prompt_ids) - 1 - (mid.key_token_span[1] - mid.key_token_span[0]) - len(b._question)
    assert abs((mid.key_token_span[0] - 1) / haystack - 0.5) < 0.05


@pytest.mark.parametrize("template", ALL, ids=lambda t: t.name)
def test_key_mentions(tiny_tokenizer, template):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id, template=template)
    ex = b.build(150, 0.4, 24680)
    mentions = b.key_mentions(ex)
    assert len(mentions) == template.key_sentence.count("{key}")
    digits = tiny_tokenizer.encode("24680", add_special_tokens=False)
    for m in mentions:
        assert ex.prompt_ids[m : m + len(digits)] == digits
        assert ex.key_token_span[0] <= m < ex.key_token_span[1]


def test_mixed_builder_never_uses_evaluation_templates(tiny_tokenizer):
    mixed = MixedTemplateBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id)
    assert [t.name for t in mixed.templates] == [t.name for t in TRAIN_TEMPLATES]
    seen = {mixed.builder().template.name for _ in range(2 * len(TRAIN_TEMPLATES))}
    assert seen == {t.name for t in TRAIN_TEMPLATES}
    rng = random.Random(0)
    for _ in range(20):
        ex = mixed.build(180, rng.random(), rng.randint(*KEY_RANGE), rng=rng)
        text = tiny_tokenizer.decode(ex.prompt_ids)
        assert PROBE_TEMPLATE.question not in text and HELDOUT_TEMPLATE.question not in text
        assert len(ex) <= 180
    for evaluation in (PROBE_TEMPLATE, HELDOUT_TEMPLATE):
        with pytest.raises(ValueError):
            assert_not_probe(evaluation)
        with pytest.raises(ValueError):
            MixedTemplateBuilder(tiny_tokenizer, 0, [TRAIN_TEMPLATES[0], evaluation])
    ok = MixedTemplateBuilder(tiny_tokenizer, 0, [PROBE_TEMPLATE], allow_evaluation_templates=True)
    assert ok.build(100, 0.5, 12345, template_index=0).key == 12345


def test_grid_with_heldout_template_is_seeded(tiny_tokenizer):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id, template=HELDOUT_TEMPLATE)
    p = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id)
    g1 = passkey_grid(b, [128], [0.0, 1.0], 2, seed=3)
    g2 = passkey_grid(p, [128], [0.0, 1.0], 2, seed=3)
    # same keys for the same seed, different wording
    assert [e.key for *_, e in g1] == [e.key for *_, e in g2]
    assert g1[0][2].input_ids != g2[0][2].input_ids
