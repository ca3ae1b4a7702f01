from scaler_wizard.evaluation.passkey import KEY_RANGE, PasskeyBuilder, passkey_grid


def test_prompt_construction(tiny_tokenizer):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id)
    ex = b.build(200, 0.5, 12345)
    assert len(ex) <= 200 and len(ex) > 150
    text = tiny_tokenizer.decode(ex.prompt_ids[1:])
    assert "The pass key is 12345. Remember it. 12345 is the pass key." in text
    assert text.rstrip().endswith("What is the pass key? The pass key is")
    assert tiny_tokenizer.decode(ex.answer_ids).strip() == "12345"
    # token concatenation equals tokenizing the whole text
    assert tiny_tokenizer.encode(text + " 12345", add_special_tokens=False) == ex.input_ids[1:]


def test_depth_positions(tiny_tokenizer):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id)
    shallow, deep = b.build(300, 0.0, 11111), b.build(300, 1.0, 11111)
    assert shallow.key_token_span[0] == 1
    assert deep.key_token_span[0] > 200


def test_grid_is_seeded(tiny_tokenizer):
    b = PasskeyBuilder(tiny_tokenizer, tiny_tokenizer.bos_token_id)
    g1 = passkey_grid(b, [128, 256], [0.0, 0.5, 1.0], 3, seed=1)
    g2 = passkey_grid(b, [128, 256], [0.0, 0.5, 1.0], 3, seed=1)
    g3 = passkey_grid(b, [128, 256], [0.0, 0.5, 1.0], 3, seed=2)
    assert len(g1) == 18
    assert [e.key for *_, e in g1] == [e.key for *_, e in g2] != [e.key for *_, e in g3]
    assert all(KEY_RANGE[0] <= e.key <= KEY_RANGE[1] for *_, e in g1)


def test_scoring_counts_exact_matches_only(tiny_tokenizer):
    """A model that copies the key scores 1.0; one that is off by a digit scores 0."""
    import torch

    from scaler_wizard.evaluation.probes import PasskeyProbe, ProbeContext

    class Oracle(torch.nn.Module):
        def __init__(self, corrupt: bool):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.corrupt = corrupt

        def forward(self, input_ids, attention_mask=None):
            b, t = input_ids.shape
            logits = torch.zeros(b, t, len(tiny_tokenizer))
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 1.0)  # predicts the true next token
            if self.corrupt:
                logits[:, :, :] = 0
                logits[:, :, 5] = 1.0
            return type("Out", (), {"logits": logits})()

    ctx = ProbeContext(tokenizer=tiny_tokenizer, heldout_stream=[], base_length=64)
    good = PasskeyProbe(trials=6, depths=[0.0, 0.5, 1.0]).run(Oracle(False), 160, ctx)
    bad = PasskeyProbe(trials=6, depths=[0.0, 0.5, 1.0]).run(Oracle(True), 160, ctx)
    assert good.metrics["accuracy"] == good.metrics["accuracy_worst_depth"] == 1.0
    assert bad.metrics["accuracy"] == bad.metrics["accuracy_worst_depth"] == 0.0
