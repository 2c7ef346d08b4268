"""SpatialEngine on a small random checkpoint with the official tokenizer: real model code, no ROS."""
import os

import numpy as np
import pytest

from phi3v_spatial.engine import prompts
from phi3v_spatial.engine.engine import EngineError, SpatialEngine, validate_images
from phi3v_spatial.engine.parsing import Relation


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    from phi3v_spatial.model.tiny import save_random_checkpoint

    out = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    save_random_checkpoint(out, tokenizer_dir, seed=3)
    return out


@pytest.fixture(scope="module")
def engine(checkpoint):
    return SpatialEngine.from_pretrained(checkpoint, device="cpu")


def _frames(seed=0, n=1, size=(96, 72)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


def test_ask_is_deterministic_and_streams(engine):
    seen = []
    a = engine.ask("Where is the red cube?", _frames(), max_new_tokens=6, on_text=lambda t, n: seen.append((t, n)))
    b = engine.ask("Where is the red cube?", _frames(), max_new_tokens=6)
    assert a.answer == b.answer and a.tokens_generated == b.tokens_generated
    assert 1 <= a.tokens_generated <= 6
    # text is streamed whenever it grows by complete characters (a token may add none, e.g. half a character)
    counts = [n for _, n in seen]
    assert seen and counts == sorted(set(counts)) and counts[-1] <= a.tokens_generated
    texts = [t for t, _ in seen]
    assert all(later.startswith(earlier) and later != earlier for earlier, later in zip(texts, texts[1:]))
    assert seen[-1][0].strip() == a.answer


def test_cancel_stops_within_a_token(engine):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= 2

    res = engine.ask("Describe the scene.", _frames(), max_new_tokens=50, should_stop=should_stop)
    if res.tokens_generated < 50 and not res.cancelled:
        pytest.skip("the random model emitted a stop token before the cancel point")
    assert res.cancelled and res.tokens_generated == 2


@pytest.mark.parametrize("straddle", [False, True], ids=["prefix-cache", "longrope-switch-no-cache"])
def test_relation_scores_equal_a_full_forward_per_candidate(engine, straddle, monkeypatch):
    """Prefix caching is an optimisation only: the probabilities match running each prompt whole.

    With ``straddle`` the LongRoPE switch is placed inside the prompts, where the engine must not share a prefix.
    """
    import torch

    frames = _frames(1, n=2)
    cands = [Relation("red cube", "left of", "blue sphere"), Relation("green cone", "behind", "red cube"),
             Relation("red cube", "bigger than", "yellow cylinder")]
    if straddle:  # the switch between the shared prefix and the end of the shortest prompt
        shortest = min(engine.processor(prompts.chat_prompt(prompts.relation_question(c.subject, c.relation, c.object), 2),
                                               images=frames)["input_ids"].shape[1] for c in cands)
        monkeypatch.setattr(engine.model.config, "original_max_position_embeddings", shortest - 2, raising=False)
    got = engine.query_relations(cands, frames)
    for c, r in zip(cands, got):
        text = prompts.chat_prompt(prompts.relation_question(c.subject, c.relation, c.object), len(frames))
        with torch.inference_mode():
            logits = engine.model(**engine.processor(text, images=frames)).logits[0, -1]
        logp = torch.log_softmax(logits.float(), -1)
        pair = torch.stack([torch.logsumexp(logp[engine.yes_ids], 0), torch.logsumexp(logp[engine.no_ids], 0)])
        assert r.probability == pytest.approx(float(torch.softmax(pair, 0)[0]), abs=1e-5)
        assert 0.0 <= r.probability <= 1.0 and r.holds == (r.probability >= 0.5)


def test_relation_scoring_stops_when_asked(engine, checkpoint):
    """should_stop is polled before every forward pass: before the prefix and before each batch of candidates."""
    from phi3v_spatial.engine.engine import EngineOptions

    cands = [Relation("red cube", "left of", "blue sphere")] * 3
    with pytest.raises(EngineError, match="stopped after scoring 0 of 3"):
        engine.query_relations(cands, _frames(), should_stop=lambda: True)
    one_by_one = SpatialEngine.from_pretrained(checkpoint, device="cpu", options=EngineOptions(relation_batch_size=1))
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2  # prefix, first candidate, then stop

    with pytest.raises(EngineError, match="stopped after scoring 1 of 3"):
        one_by_one.query_relations(cands, _frames(), should_stop=should_stop)


def test_yes_no_tokens_follow_the_assistant_tag(engine):
    tok = engine.processor.tokenizer
    assert tok.decode([engine.yes_id]).strip() == "yes"
    assert tok.decode([engine.no_id]).strip() == "no"
    # the official tokenizer has single tokens for the capitalised answers too; they count towards P(yes)/P(no)
    assert {tok.decode([i]).strip().lower() for i in engine.yes_ids} == {"yes"}
    assert {tok.decode([i]).strip().lower() for i in engine.no_ids} == {"no"}


def test_relation_probability_counts_capitalised_answers(checkpoint):
    """A checkpoint that puts its answer mass on "Yes" (as the official ones do) scores P(yes) close to 1."""
    import torch

    eng = SpatialEngine.from_pretrained(checkpoint, device="cpu")
    cap_yes = [i for i in eng.yes_ids if i != eng.yes_id]
    if not cap_yes:
        pytest.skip("this tokenizer has no single-token capitalised 'Yes'")
    head = torch.nn.Linear(eng.model.config.hidden_size, eng.model.config.vocab_size, bias=True)
    with torch.no_grad():  # a head that answers "Yes" whatever it sees
        head.weight.zero_()
        head.bias.zero_()
        head.bias[cap_yes[0]] = 20.0
    eng.model.lm_head = head
    (r,) = eng.query_relations([Relation("red cube", "left of", "blue sphere")], _frames())
    assert r.probability > 0.9 and r.holds


def test_plan_from_a_random_model_fails_with_a_reason(engine):
    res = engine.plan("Put the red cube next to the blue sphere.", _frames(), max_new_tokens=8)
    if res.steps:
        pytest.skip("the random model happened to emit a parsable plan")
    assert res.error and res.raw_text is not None and not res.cancelled


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "no images"),
        ([np.zeros((0, 10, 3), np.uint8)], "empty"),
        ([np.zeros((10, 10, 2), np.uint8)], "image 0: expected an HxWx3"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((10, 10, 3), np.int32)], "image 1: expected uint8"),
        ([np.zeros((5000, 5000, 3), np.uint8)], "max_image_pixels"),
    ],
)
def test_bad_images_are_operator_errors(images, message):
    with pytest.raises(EngineError, match=message):
        validate_images(images, max_pixels=4096 * 4096)


def test_bad_requests_are_operator_errors(engine):
    with pytest.raises(EngineError, match="question is empty"):
        engine.ask("  ", _frames())
    with pytest.raises(EngineError, match="no candidate"):
        engine.query_relations([], _frames())
    with pytest.raises(EngineError, match="subject, relation and object"):
        engine.query_relations([Relation("", "left of", "x")], _frames())
    with pytest.raises(EngineError, match="unknown adapter"):
        engine.set_adapter("nope")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        SpatialEngine.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(EngineError, match="no config.json"):
        SpatialEngine.from_pretrained(str(tmp_path))


def test_unusable_device_settings_are_clear_errors(checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path needs a CPU-only machine")
    with pytest.raises(EngineError, match="CUDA is not available"):
        SpatialEngine.from_pretrained(checkpoint, device="cuda")
    with pytest.raises(EngineError, match="unknown dtype"):
        SpatialEngine.from_pretrained(checkpoint, device="cpu", dtype="float8")


def test_close_releases_the_model(checkpoint):
    import gc
    import weakref

    eng = SpatialEngine.from_pretrained(checkpoint, device="cpu")
    ref = weakref.ref(eng.model)
    eng.close()
    gc.collect()
    assert ref() is None
    with pytest.raises(EngineError, match="released"):
        eng.ask("Where?", _frames(), max_new_tokens=2)
