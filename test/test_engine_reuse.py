"""The engine's work-reuse paths (vision cache, prefix KV cache, padding-crop skipping, batched relation scoring)
change nothing in the outputs: every path is compared with ``EngineOptions.naive()`` on the same small random
checkpoint (real model code, CPU). Also: the caches' bookkeeping, adapters, cancellation, the LongRoPE switch,
streaming detokenisation, quantisation checks and the ByteLRU itself.
"""
import copy
import types

import numpy as np
import pytest
import torch

from phi3v_spatial.engine import prompts
from phi3v_spatial.engine.cache import ByteLRU, PrefixEntry, content_key
from phi3v_spatial.engine.engine import EngineError, EngineOptions, SpatialEngine
from phi3v_spatial.engine.parsing import Relation

PROB_TOL = 1e-5
MAX_TOKENS = 10

# 5 candidates whose prompts all have different token lengths: the batched pass pads them.
CANDIDATES = [
    Relation("cube", "on", "mat"),
    Relation("red cube", "left of", "blue ball"),
    Relation("big red cube", "to the right of", "small green sphere"),
    Relation("tall yellow cylinder", "in front of", "wooden box near the back wall"),
    Relation("shiny metal robot arm gripper", "directly above", "the open cardboard shipping box on the floor"),
]


def _image(seed, size):
    """An RGB frame ``size`` = (width, height)."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


# With the tiny checkpoint (56-pixel crops, num_crops=4): FULL fills all 4 crop slots (2x2 HD grid); WIDE is a 1x2
# grid, which leaves 2 of the 4 local crop slots as zero padding (checked in test_frames_cover_padding_slots).
FULL = _image(1, (96, 72))
WIDE = _image(2, (112, 56))
OTHER = _image(3, (96, 72))
FRAME_SETS = {"one-frame": [FULL], "one-frame-padded": [WIDE], "two-frames": [FULL, WIDE]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    from phi3v_spatial.model.tiny import save_random_checkpoint

    out = str(tmp_path_factory.mktemp("reuse") / "ckpt")
    save_random_checkpoint(out, tokenizer_dir, seed=5, num_crops=4)
    return out


@pytest.fixture(scope="module")
def base(checkpoint):
    """The default engine (all optimisations on), loaded the way the node loads it."""
    return SpatialEngine.from_pretrained(checkpoint, device="cpu")


def _sibling(engine, options):
    """Another engine on the same model (``with_options``) with its own options and empty caches."""
    other = engine.with_options(options)
    assert other.model is engine.model and other.cache_stats()["vision"]["entries"] == 0
    assert other.cache_stats()["prefix"]["entries"] == 0
    return other


@pytest.fixture
def naive(base):
    return _sibling(base, EngineOptions.naive())


# ---------------------------------------------------------------------------------------------------- helpers
def _ask(engine, question, frames, **kw):
    """(answer, tokens, streamed (text, n) pairs) of a greedy generation."""
    seen = []
    res = engine.ask(question, frames, max_new_tokens=MAX_TOKENS, on_text=lambda t, n: seen.append((t, n)), **kw)
    return res.answer, res.tokens_generated, seen


def _plan(engine, instruction, frames, **kw):
    res = engine.plan(instruction, frames, max_new_tokens=MAX_TOKENS, **kw)
    return res.raw_text, res.tokens_generated, res.error, res.steps


def _probs(engine, frames, candidates=CANDIDATES, **kw):
    return [r.probability for r in engine.query_relations(candidates, frames, **kw)]


def _assert_probs_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=PROB_TOL)


def _prompt_len(engine, text, frames):
    return int(engine.processor(text, images=frames)["input_ids"].shape[1])


def _prefix_len(engine, text, frames):
    row = engine.processor(text, images=frames)["input_ids"][0].tolist()
    return max(i for i, t in enumerate(row) if t < 0) + 1


def _relation_text(c, n_images):
    return prompts.chat_prompt(prompts.relation_question(c.subject, c.relation, c.object), n_images)


# ---------------------------------------------------------------------------------------------------- setup checks
def test_frames_cover_padding_slots(base):
    """The test frames include one with zero-padding crop slots and one without, and prompts of 5 different lengths."""
    ip = base.processor.image_processor
    assert base.processor.num_crops == 4
    for frame, padding in ((FULL, 0), (WIDE, 2)):
        feats = ip([frame])
        h, w = (int(v) for v in feats["image_sizes"][0])
        crop = base.model.config.crop_size
        used = 1 + (h // crop) * (w // crop)
        assert feats["pixel_values"].shape[1] - used == padding
    lengths = {_prompt_len(base, _relation_text(c, 2), FRAME_SETS["two-frames"]) for c in CANDIDATES}
    assert len(lengths) == len(CANDIDATES)


def test_options_and_describe(base):
    naive = EngineOptions.naive()
    assert (naive.vision_cache_mb, naive.prefix_cache_mb, naive.skip_padding_crops, naive.batched_relations,
            naive.relation_batch_size) == (0, 0, False, False, 1)
    eng = _sibling(base, naive)
    assert not eng.vision_cache.enabled and not eng.prefix_cache.enabled
    d = base.describe()
    assert d["skip_padding_crops"] and d["batched_relations"] and d["num_crops"] == 4 and d["quantization"] == "none"
    assert set(d["cache"]) == {"vision", "prefix"}
    with pytest.raises(EngineError, match="relation_batch_size"):
        EngineOptions(relation_batch_size=0).validate()
    with pytest.raises(EngineError, match=">= 0"):
        EngineOptions(vision_cache_mb=-1).validate()


# ---------------------------------------------------------------------------------------------------- 1. equivalence
@pytest.fixture(scope="module")
def reference(base):
    """Naive outputs for every workload of test_each_optimisation_gives_the_naive_outputs."""
    eng = _sibling(base, EngineOptions.naive())
    out = {}
    for name, frames in FRAME_SETS.items():
        out["ask", name] = _ask(eng, "Where is the red cube?", frames)
        out["rel", name] = _probs(eng, frames)
        out["rel1", name] = _probs(eng, frames, CANDIDATES[2:3])
    out["plan"] = _plan(eng, "Put the red cube next to the blue sphere.", FRAME_SETS["two-frames"])
    assert eng.cache_stats()["vision"]["entries"] == 0 and eng.cache_stats()["prefix"]["entries"] == 0
    return out


NAIVE = EngineOptions.naive()
OPTION_VARIANTS = {
    "default": EngineOptions(),
    "vision-cache-only": EngineOptions(**{**NAIVE.__dict__, "vision_cache_mb": 64.0}),
    "prefix-cache-only": EngineOptions(**{**NAIVE.__dict__, "prefix_cache_mb": 64.0}),
    "skip-padding-only": EngineOptions(**{**NAIVE.__dict__, "skip_padding_crops": True}),
    "batched-only": EngineOptions(**{**NAIVE.__dict__, "batched_relations": True, "relation_batch_size": 8}),
    "batch-of-2": EngineOptions(**{**NAIVE.__dict__, "batched_relations": True, "relation_batch_size": 2}),
}


@pytest.mark.parametrize("variant", list(OPTION_VARIANTS), ids=list(OPTION_VARIANTS))
def test_each_optimisation_gives_the_naive_outputs(base, reference, variant):
    """ask (greedy text, token count and every streamed step), plan (raw text) and query_relations (5 padded
    candidates, to 1e-5) equal the naive engine, on first use and again when the caches are warm."""
    eng = base if variant == "default" else _sibling(base, OPTION_VARIANTS[variant])
    if variant == "default":
        eng.clear_caches()
    assert eng.options == OPTION_VARIANTS[variant]
    for rnd in range(2):  # the second round runs from warm caches (where caches are on)
        for name, frames in FRAME_SETS.items():
            assert _ask(eng, "Where is the red cube?", frames) == reference["ask", name], (rnd, name)
            _assert_probs_equal(_probs(eng, frames), reference["rel", name])
            _assert_probs_equal(_probs(eng, frames, CANDIDATES[2:3]), reference["rel1", name])  # one: no batch
        assert _plan(eng, "Put the red cube next to the blue sphere.", FRAME_SETS["two-frames"]) == reference["plan"]
    stats = eng.cache_stats()
    if eng.options.vision_cache_mb:
        assert stats["vision"]["hits"] > 0
    if eng.options.prefix_cache_mb:
        assert stats["prefix"]["hits"] > 0


# ---------------------------------------------------------------------------------------------------- 2. repeats
def test_follow_up_question_hits_both_caches(base, naive):
    eng = _sibling(base, EngineOptions())
    frames = FRAME_SETS["two-frames"]
    eng.ask("Where is the red cube?", frames, max_new_tokens=4)
    before = eng.cache_stats()
    assert before["vision"]["entries"] == 2 and before["prefix"]["entries"] == 1

    follow = _ask(eng, "What is behind the blue sphere?", frames)
    after = eng.cache_stats()
    for cache in ("vision", "prefix"):
        assert after[cache]["hits"] > before[cache]["hits"], cache
        assert after[cache]["misses"] == before[cache]["misses"], cache
    assert after["vision"]["hits"] - before["vision"]["hits"] == 2
    assert follow == _ask(naive, "What is behind the blue sphere?", frames)

    # relation queries and plans on the same window share the same image prefix
    probs = _probs(eng, frames)
    plan = _plan(eng, "Stack the cubes.", frames)
    last = eng.cache_stats()
    assert last["prefix"]["misses"] == before["prefix"]["misses"] and last["prefix"]["entries"] == 1
    assert last["vision"]["misses"] == before["vision"]["misses"]
    _assert_probs_equal(probs, _probs(naive, frames))
    assert plan == _plan(naive, "Stack the cubes.", frames)


# ---------------------------------------------------------------------------------------------------- 3. frame keys
def test_frame_keys_identify_frames(base, naive):
    eng = _sibling(base, EngineOptions())
    eng.ask("Where?", [FULL], max_new_tokens=1, frame_keys=[("/cam", 1)])
    eng.ask("Where now?", [FULL], max_new_tokens=1, frame_keys=[("/cam", 1)])
    s = eng.cache_stats()["vision"]
    assert (s["entries"], s["misses"], s["hits"]) == (1, 1, 1)
    eng.ask("Where?", [FULL], max_new_tokens=1, frame_keys=[("/cam", 2)])  # another stamp: another frame
    s = eng.cache_stats()["vision"]
    assert (s["entries"], s["misses"]) == (2, 2)
    # the key is trusted: the same key with other pixels is answered from the cache
    assert _ask(eng, "Where is the red cube?", [FULL], frame_keys=[("/cam", 1)]) == \
        _ask(naive, "Where is the red cube?", [FULL])
    with pytest.raises(EngineError, match="2 frame keys for 1 images"):
        eng.ask("Where?", [FULL], frame_keys=[1, 2])


def test_without_keys_frames_are_identified_by_content(base):
    assert content_key(FULL) == content_key(FULL.copy())
    assert content_key(FULL) != content_key(OTHER)
    assert content_key(FULL) != content_key(np.ascontiguousarray(FULL[:, :, ::-1]))
    eng = _sibling(base, EngineOptions())
    eng.ask("Where?", [FULL], max_new_tokens=1)
    eng.ask("Where?", [OTHER], max_new_tokens=1)
    assert eng.cache_stats()["vision"]["entries"] == 2
    eng.ask("Where?", [FULL.copy()], max_new_tokens=1)
    s = eng.cache_stats()["vision"]
    assert (s["entries"], s["hits"]) == (2, 1)
    # two identical arrays in one request are encoded once
    eng2 = _sibling(base, EngineOptions())
    eng2.ask("Where?", [OTHER, OTHER.copy()], max_new_tokens=1)
    assert eng2.cache_stats()["vision"]["entries"] == 1


# ---------------------------------------------------------------------------------------------------- 4. adapters
@pytest.fixture(scope="module")
def adapter_dirs(checkpoint, tmp_path_factory):
    """Two random LoRA adapters (non-zero lora_B: init_lora_weights=False): LM-only and LM + vision/projector."""
    from peft import get_peft_model

    from phi3v_spatial.model import Phi3VForCausalLM
    from phi3v_spatial.model.adapters import lora_config

    model = Phi3VForCausalLM.from_pretrained(checkpoint)
    root = tmp_path_factory.mktemp("reuse_adapters")
    dirs = {}
    for seed, (name, vision) in enumerate((("lm", False), ("vis", True))):
        torch.manual_seed(100 + seed)
        peft_model = get_peft_model(copy.deepcopy(model), lora_config(r=4, include_vision=vision,
                                                                      init_lora_weights=False))
        peft_model.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def adapter_engines(checkpoint, adapter_dirs):
    cached = SpatialEngine.from_pretrained(checkpoint, device="cpu", adapters=adapter_dirs)
    naive = SpatialEngine.from_pretrained(checkpoint, device="cpu", adapters=adapter_dirs,
                                          options=EngineOptions.naive())
    return cached, naive


def test_adapter_touches_vision(adapter_engines):
    cached, _ = adapter_engines
    assert cached._adapters.touches_vision("vis") is True
    assert cached._adapters.touches_vision("lm") is False
    assert cached._vision_adapters == {"lm": False, "vis": True}


def test_switching_adapters_keeps_outputs_and_cache_sharing_right(adapter_engines):
    cached, naive = adapter_engines
    frames = FRAME_SETS["two-frames"]
    cached.set_adapter(None)
    cached.clear_caches()
    vision = cached.vision_cache

    seen = {}
    expected_misses = [2, 2, 0, 0, 2]  # lm (computed untagged), vis, base (= lm's), lm, vis at scale 0.5
    for step, (name, scale) in enumerate((("lm", 1.0), ("vis", 1.0), (None, 1.0), ("lm", 1.0), ("vis", 0.5))):
        if step:  # something is cached from the previous step; set_adapter must drop every prefix
            assert cached.cache_stats()["prefix"]["entries"] > 0
        cached.set_adapter(name, scale) if name else cached.set_adapter(None)
        naive.set_adapter(name, scale) if name else naive.set_adapter(None)
        assert cached.cache_stats()["prefix"]["entries"] == 0
        v_before = (vision.hits, vision.misses)
        got_ask = _ask(cached, "Where is the red cube?", frames)
        got_probs = _probs(cached, frames)
        got_ask2 = _ask(cached, "What is left of the ball?", frames)  # warm prefix
        assert got_ask == _ask(naive, "Where is the red cube?", frames), (name, scale)
        _assert_probs_equal(got_probs, _probs(naive, frames))
        assert got_ask2 == _ask(naive, "What is left of the ball?", frames), (name, scale)
        seen[step] = got_probs
        # "lm" leaves the vision tower alone: it shares the base embeddings; "vis" has its own per scale
        assert vision.misses - v_before[1] == expected_misses[step], (name, scale)
    assert vision.stats()["entries"] == 3 * 2  # base/lm shared, vis@1.0, vis@0.5 (two frames each)
    # the adapters really change the outputs (otherwise this test would prove nothing)
    assert max(abs(a - b) for a, b in zip(seen[0], seen[2])) > 1e-4
    assert max(abs(a - b) for a, b in zip(seen[1], seen[2])) > 1e-4
    cached.set_adapter(None)
    naive.set_adapter(None)


def test_vision_adapter_changes_image_features(adapter_engines):
    cached, _ = adapter_engines
    feats = cached.processor.image_processor([FULL])
    tower = cached.model.model.vision_embed_tokens
    with torch.inference_mode():
        out = {}
        for name in (None, "lm", "vis"):
            cached.set_adapter(name)
            out[name] = tower.image_features(feats["pixel_values"], feats["image_sizes"])[0]
    cached.set_adapter(None)
    assert torch.equal(out[None], out["lm"])
    assert (out["vis"] - out[None]).abs().max() > 1e-4


def test_load_adapter_clears_prefixes(checkpoint, adapter_dirs):
    eng = SpatialEngine.from_pretrained(checkpoint, device="cpu")
    eng.ask("Where?", [FULL], max_new_tokens=1)
    assert eng.cache_stats()["prefix"]["entries"] == 1
    eng.load_adapter("lm", adapter_dirs["lm"])
    assert eng.cache_stats()["prefix"]["entries"] == 0
    assert eng.cache_stats()["vision"]["entries"] == 1  # the base embeddings stay valid


# ---------------------------------------------------------------------------------------------------- 5. byte bound
def test_vision_cache_byte_bound_evicts_and_stays_exact(base, naive):
    one_frame = 27 * base.model.config.hidden_size * 4  # FULL: 27 image tokens, float32
    eng = _sibling(base, EngineOptions(vision_cache_mb=(one_frame + 64) / 2**20))
    max_bytes = eng.vision_cache.max_bytes
    assert one_frame <= max_bytes < one_frame + 4352  # holds FULL, not FULL and WIDE together
    for frames in ([FULL], [WIDE], [FULL, WIDE], [OTHER], [FULL], [WIDE, FULL]):
        assert _ask(eng, "Where is the red cube?", frames) == _ask(naive, "Where is the red cube?", frames)
        _assert_probs_equal(_probs(eng, frames, CANDIDATES[:2]), _probs(naive, frames, CANDIDATES[:2]))
        s = eng.cache_stats()["vision"]
        assert 0 < s["bytes"] <= s["max_bytes"] == max_bytes
    assert eng.cache_stats()["vision"]["evictions"] > 0


def test_prefix_cache_byte_bound(base, naive):
    probe = _sibling(base, EngineOptions())
    probe.ask("Where?", [FULL], max_new_tokens=1)
    one = probe.cache_stats()["prefix"]["bytes"]
    eng = _sibling(base, EngineOptions(prefix_cache_mb=(one + 16) / 2**20))
    for frames in ([FULL], [OTHER], [FULL]):
        assert _ask(eng, "Where is the red cube?", frames) == _ask(naive, "Where is the red cube?", frames)
        s = eng.cache_stats()["prefix"]
        assert s["entries"] == 1 and s["bytes"] <= s["max_bytes"]
    assert eng.cache_stats()["prefix"]["evictions"] == 2


# ---------------------------------------------------------------------------------------------------- 6. copy-on-use
def test_cancelled_requests_do_not_corrupt_the_cached_prefix(base, naive):
    eng = _sibling(base, EngineOptions(relation_batch_size=2))
    frames = FRAME_SETS["two-frames"]
    res = eng.ask("Describe the scene.", frames, max_new_tokens=50, should_stop=lambda: True)
    assert res.cancelled and res.tokens_generated == 1
    assert eng.cache_stats()["prefix"]["entries"] == 1
    calls = []

    def stop_after_first_batch():
        calls.append(1)
        return len(calls) > 2  # the prefix, the first batch of 2, then stop

    with pytest.raises(EngineError, match="stopped after scoring 2 of 5"):
        eng.query_relations(CANDIDATES, frames, should_stop=stop_after_first_batch)
    hits = eng.cache_stats()["prefix"]["hits"]
    assert _ask(eng, "Where is the red cube?", frames) == _ask(naive, "Where is the red cube?", frames)
    _assert_probs_equal(_probs(eng, frames), _probs(naive, frames))
    plan = eng.plan("Stack the cubes.", frames, max_new_tokens=3, should_stop=lambda: True)
    assert plan.cancelled and plan.error == "cancelled"
    assert _plan(eng, "Stack the cubes.", frames) == _plan(naive, "Stack the cubes.", frames)
    s = eng.cache_stats()["prefix"]
    assert s["hits"] >= hits + 3 and s["entries"] == 1


def test_prefix_entry_is_copied_on_use():
    from transformers import DynamicCache

    k = torch.randn(1, 2, 5, 4)
    v = torch.randn(1, 2, 5, 4)
    cache = DynamicCache([(k.clone(), v.clone())])
    entry = PrefixEntry.from_cache(cache, 5)
    assert entry.length == 5 and entry.nbytes == 2 * k.numel() * 4
    used = entry.to_cache(3)
    used.update(torch.ones(3, 2, 2, 4), torch.ones(3, 2, 2, 4), 0)
    assert used.get_seq_length() == 7 and used.layers[0].keys.shape[0] == 3
    used.layers[0].keys.mul_(0)  # even an in-place change of the copy leaves the entry alone
    assert torch.equal(entry.layers[0][0], k) and torch.equal(entry.layers[0][1], v)
    again = entry.to_cache(1)
    assert torch.equal(again.layers[0].keys, k)


# ---------------------------------------------------------------------------------------------------- 7. LongRoPE
def _set_switch(monkeypatch, engine, value):
    """Move the LongRoPE short/long switch of the (shared) model: the top-level value (which the engine and
    transformers' standardize_rope_params go by) and the rope_parameters copy (which the rotary embedding reads)."""
    cfg = engine.model.config
    monkeypatch.setitem(cfg.rope_parameters, "original_max_position_embeddings", value)
    monkeypatch.setattr(cfg, "original_max_position_embeddings", value)


@pytest.mark.parametrize("where", ["straddles-prompt", "below-prefix"])
def test_longrope_switch(base, naive, monkeypatch, where):
    frames = FRAME_SETS["two-frames"]
    question = "Where is the red cube?"
    text = prompts.chat_prompt(question, 2)
    n, total = _prefix_len(base, text, frames), _prompt_len(base, text, frames)
    shortest = min(_prompt_len(base, _relation_text(c, 2), frames) for c in CANDIDATES)
    assert n == _prefix_len(base, _relation_text(CANDIDATES[0], 2), frames) and n + 2 < min(total, shortest)
    unpatched = _probs(naive, frames)
    eng = _sibling(base, EngineOptions(relation_batch_size=2))
    switch = n + 1 if where == "straddles-prompt" else n - 5
    _set_switch(monkeypatch, base, switch)  # base, naive and eng share the model
    want_probs = _probs(naive, frames)
    assert max(abs(a - b) for a, b in zip(want_probs, unpatched)) > 1e-4  # the switch really changes the numerics
    _assert_probs_equal(_probs(eng, frames), want_probs)  # relation scores first: nothing cached before them
    _assert_probs_equal(_probs(eng, frames, CANDIDATES[:1]), _probs(naive, frames, CANDIDATES[:1]))
    assert _ask(eng, question, frames) == _ask(naive, question, frames)
    assert _ask(eng, "Is it red?", frames) == _ask(naive, "Is it red?", frames)
    s = eng.cache_stats()["prefix"]
    if where == "straddles-prompt":  # a prefix computed below the switch cannot serve these prompts
        assert (s["entries"], s["hits"], s["misses"]) == (0, 0, 0)
    else:
        assert s["entries"] == 1 and s["hits"] >= 1


# ---------------------------------------------------------------------------------------------------- 8. padding crops
def test_skipping_padding_crops_gives_the_same_features(base):
    feats = base.processor.image_processor([WIDE, FULL, WIDE[:, ::-1].copy()])
    tower = base.model.model.vision_embed_tokens
    with torch.inference_mode():
        skip = tower.image_features(feats["pixel_values"], feats["image_sizes"], encode_padding=False)
        full = tower.image_features(feats["pixel_values"], feats["image_sizes"], encode_padding=True)
    assert len(skip) == len(full) == 3
    for a, b, n in zip(skip, full, feats["num_img_tokens"]):
        assert a.shape == b.shape == (int(n), base.model.config.hidden_size)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- 9. streaming
def test_text_stream_never_shows_half_characters(official_tokenizer_dir):
    from phi3v_spatial.engine.streaming import TextStream
    from phi3v_spatial.model import Phi3VProcessor

    tok = Phi3VProcessor.from_pretrained(official_tokenizer_dir, num_crops=4).tokenizer
    text = "café ☃ 東京 — naïve 🤖!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # several tokens per word: characters are split across tokens
    seen = []
    stream = TextStream(tok, lambda t, n: seen.append((t, n)))
    for i in ids:
        stream.push(i)
    final = stream.finish()
    assert final == tok.decode(ids, skip_special_tokens=True)
    assert final.strip() == text
    assert seen and all("\ufffd" not in t for t, _ in seen)
    for (a, na), (b, nb) in zip(seen, seen[1:]):
        assert b.startswith(a) and len(b) > len(a) and nb > na
    assert seen[-1][0] == final
    # at least one token ended half-way through a character and was held back
    assert len(seen) < len(ids)


# ---------------------------------------------------------------------------------------------------- 10. quantisation
def test_quantization_checks_on_cpu(checkpoint):
    from phi3v_spatial.model.quantization import QuantizationError, check_quantization

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error paths need a CPU-only machine")
    assert check_quantization("none", "cpu") == "none"
    assert check_quantization(None, "cpu") == "none"
    for mode in ("8bit", "4bit", " 8BIT "):
        with pytest.raises(QuantizationError, match="CUDA"):
            check_quantization(mode, "cpu")
    with pytest.raises(QuantizationError, match="unknown quantization"):
        check_quantization("3bit", "cpu")
    with pytest.raises(EngineError, match="CUDA"):
        SpatialEngine.from_pretrained(checkpoint, quantization="4bit", device="cpu")
    with pytest.raises(EngineError, match="unknown quantization"):
        SpatialEngine.from_pretrained(checkpoint, quantization="2bit", device="cpu")


def _fake_bnb():
    """A stand-in for the bitsandbytes module: linears and parameter classes that record their arguments."""
    made = []

    class _Linear(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.args, self.kwargs = args, kwargs
            made.append(self)

    class Linear8bitLt(_Linear):
        pass

    class Linear4bit(_Linear):
        pass

    class _Params:
        def __init__(self, data, **kwargs):
            self.data, self.kwargs = data, kwargs

    class Int8Params(_Params):
        pass

    class Params4bit(_Params):
        pass

    ns = types.SimpleNamespace(nn=types.SimpleNamespace(Linear8bitLt=Linear8bitLt, Linear4bit=Linear4bit,
                                                         Int8Params=Int8Params, Params4bit=Params4bit))
    return ns, made


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantize_decoder_linears_fake_bitsandbytes_no_cuda(checkpoint, mode):
    from phi3v_spatial.model import Phi3VForCausalLM
    from phi3v_spatial.model.quantization import quantize_decoder_linears

    model = Phi3VForCausalLM.from_pretrained(checkpoint)
    decoder = {f"model.layers.{name}": m for name, m in model.model.layers.named_modules()
               if type(m) is torch.nn.Linear}
    others = {name: m for name, m in model.named_modules()
              if type(m) is torch.nn.Linear and not name.startswith("model.layers.")}
    assert len(decoder) == 4 * model.config.num_hidden_layers
    assert "lm_head" in others and any("img_projection" in n for n in others)
    assert any("vision_embed_tokens.img_processor" in n for n in others)
    shapes = {name: (m.in_features, m.out_features, m.bias is not None, m.weight.detach().clone())
              for name, m in decoder.items()}
    bnb, made = _fake_bnb()

    assert quantize_decoder_linears(model, "none", torch.float32, bnb=bnb) == 0 and not made
    assert quantize_decoder_linears(model, mode, torch.bfloat16, bnb=bnb) == len(decoder)
    after = dict(model.named_modules())
    cls = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    for name, (fan_in, fan_out, has_bias, weight) in shapes.items():
        q = after[name]
        assert type(q) is cls and q.args == (fan_in, fan_out)
        assert q.kwargs["bias"] is has_bias
        if mode == "8bit":
            assert q.kwargs == {"bias": has_bias, "has_fp16_weights": False, "threshold": 6.0}
            assert type(q.weight) is bnb.nn.Int8Params and q.weight.data.dtype == torch.float16
            assert q.weight.kwargs == {"requires_grad": False, "has_fp16_weights": False}
        else:
            assert q.kwargs == {"bias": has_bias, "compute_dtype": torch.bfloat16, "quant_type": "nf4"}
            assert type(q.weight) is bnb.nn.Params4bit and q.weight.data.dtype == torch.bfloat16
            assert q.weight.kwargs == {"requires_grad": False, "quant_type": "nf4"}
        torch.testing.assert_close(q.weight.data.float(), weight, atol=1e-2, rtol=1e-2)
    assert len(made) == len(decoder)
    for name, m in others.items():  # vision tower, projector and lm_head untouched
        assert after[name] is m and type(m) is torch.nn.Linear


# ---------------------------------------------------------------------------------------------------- 11. ByteLRU
def test_byte_lru_order_and_bound():
    lru = ByteLRU(10)
    assert lru.put("a", 1, 4) and lru.put("b", 2, 4)
    assert lru.get("a") == 1  # "a" is now the most recent
    assert lru.put("c", 3, 4)  # 12 > 10: the least recent ("b") goes
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    s = lru.stats()
    assert (s["entries"], s["bytes"], s["evictions"], s["hits"], s["misses"]) == (2, 8, 1, 3, 1)
    assert lru.put("a", 10, 6)  # replacing a key counts its new size only
    assert lru.bytes == 10 and len(lru) == 2 and lru.get("a") == 10


def test_byte_lru_too_large_item_is_not_stored():
    lru = ByteLRU(10)
    lru.put("a", 1, 5)
    assert lru.put("big", 2, 11) is False
    assert lru.get("big") is None and lru.get("a") == 1
    assert lru.stats()["entries"] == 1 and lru.bytes == 5 and lru.evictions == 0


def test_byte_lru_resize_and_disable():
    lru = ByteLRU(12)
    for k in "abc":
        lru.put(k, k, 4)
    lru.resize(8)
    assert len(lru) == 2 and lru.bytes == 8 and lru.evictions == 1 and lru.get("a") is None
    lru.resize(0)
    assert not lru.enabled and len(lru) == 0 and lru.bytes == 0 and lru.evictions == 3
    assert lru.put("x", 1, 1) is False and len(lru) == 0
    off = ByteLRU(0)
    assert not off.enabled and off.put("x", 1, 0) is False and off.get("x") is None and len(off) == 0
    lru = ByteLRU(8)
    lru.put("a", 1, 4)
    lru.clear()
    assert len(lru) == 0 and lru.bytes == 0
