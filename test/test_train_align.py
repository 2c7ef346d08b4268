"""Colour alignment of the vision tower (train.align): pixel-derived token targets and a loss that goes down."""
import numpy as np
import pytest
import torch

from phi3v_spatial.data.scene import PALETTE
from phi3v_spatial.train.align import align_vision, cell_colour_shares, token_targets


def test_cell_colour_shares_find_palette_colours_under_shading():
    img = torch.full((1, 3, 56, 56), 0.55)                       # grey background
    red = torch.tensor(PALETTE["red"], dtype=torch.float32) / 255
    img[0, :, :28, :28] = red.view(3, 1, 1) * 0.6                  # shaded red in the top-left quarter
    blue = torch.tensor(PALETTE["blue"], dtype=torch.float32) / 255
    img[0, :, 42:, 42:] = blue.view(3, 1, 1)                       # a quarter of the bottom-right cell
    s = cell_colour_shares(img, np.asarray(list(PALETTE.values()), dtype=np.float32) / 255, 2)
    names = list(PALETTE)
    assert s.shape == (1, 4, len(names) + 1)
    assert torch.allclose(s.sum(-1), torch.ones(1, 4))
    assert s[0, 0, names.index("red")] == 1.0
    assert abs(float(s[0, 3, names.index("blue")]) - 0.25) < 1e-6 and abs(float(s[0, 3, -1]) - 0.75) < 1e-6
    assert s[0, 1, -1] == 1.0 and s[0, 2, -1] == 1.0


def _checkpoint_and_scenes(tmp_path, n: int) -> tuple[str, list[str]]:
    """A random tiny checkpoint with a tokenizer that knows the colour words, and ``n`` rendered scenes as PNGs."""
    from PIL import Image

    from phi3v_spatial.data.synth import make_scene
    from phi3v_spatial.engine import prompts
    from phi3v_spatial.model.tiny import save_random_checkpoint
    from phi3v_spatial.train.tokenizer_training import load_fast_tokenizer, train_tokenizer

    texts = [prompts.chat_prompt(f"Is there a {c} object? Answer yes or no.", 1) + prompts.answer_target("yes")
             for c in PALETTE] * 4
    tok_dir = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=320)
    pad = load_fast_tokenizer(tok_dir).pad_token_id
    d = save_random_checkpoint(str(tmp_path / "tiny"), tok_dir, seed=0, num_crops=1, pad_token_id=pad)
    paths = []
    for i in range(n):
        p = tmp_path / f"s{i}.png"
        Image.fromarray(make_scene(i).images[0][0]).save(p)
        paths.append(str(p))
    return d, paths


def test_align_vision_lowers_the_loss_and_only_moves_the_vision_side(tmp_path):
    from PIL import Image

    from phi3v_spatial.model import Phi3VForCausalLM, Phi3VProcessor

    d, paths = _checkpoint_and_scenes(tmp_path, 4)
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    processor = Phi3VProcessor.from_pretrained(d, num_crops=1)
    feats = processor.image_processor([Image.open(paths[0]).convert("RGB")])
    rows, targets, centres = token_targets(model, processor, feats["pixel_values"], feats["image_sizes"],
                                  np.asarray(list(PALETTE.values()), dtype=np.float32) / 255)
    n_tokens = model.model.vision_embed_tokens.image_features(feats["pixel_values"], feats["image_sizes"])[0].shape[0]
    g = model.model.vision_embed_tokens.grid // 2
    assert len(rows[0]) == targets[0].shape[0] == centres[0].shape[0] == 2 * g * g and max(rows[0]) < n_tokens
    # one crop: the sub grid and the global grid both tile the image g x g, row-major, centres in [0, 1]
    cell = (torch.arange(g) + 0.5) / g
    grid = torch.stack([cell.repeat(g), cell.repeat_interleave(g)], -1)
    assert torch.allclose(centres[0], torch.cat([grid, grid]))
    lm_before = {k: v.clone() for k, v in model.state_dict().items() if "vision_embed_tokens" not in k}
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    s = align_vision(model, processor, paths, steps=30, batch_size=4, lr=5e-3, log_every=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no position read-out drawn: later stages see the same RNG
    assert s["final_loss"] < s["first_loss"]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in lm_before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_position_objective_trains_a_readout_of_token_places(tmp_path):
    """position_weight > 0: the loss includes a (discarded) linear read-out of each token's (x, y); it goes down."""
    from phi3v_spatial.model import Phi3VForCausalLM, Phi3VProcessor

    d, paths = _checkpoint_and_scenes(tmp_path, 3)
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    processor = Phi3VProcessor.from_pretrained(d, num_crops=1)
    torch.manual_seed(0)
    plain = align_vision(model, processor, paths, steps=1, batch_size=3, lr=0.0, log_every=0)
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    torch.manual_seed(0)
    s = align_vision(model, processor, paths, steps=40, batch_size=3, lr=5e-3, log_every=0, position_weight=1.0)
    assert s["first_loss"] > plain["first_loss"]          # the position term is part of the loss
    assert s["final_loss"] < s["first_loss"]


def test_align_ends_with_image_tokens_at_the_word_embeddings_scale(tmp_path):
    """The objectives ignore scale; the stage rescales the projector so image tokens have the word embeddings'
    RMS, and nothing but the projector's last layer changes in that step (``match_text_scale=False`` skips it)."""
    from phi3v_spatial.model import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_spatial.train.align import image_token_rms, word_embedding_rms

    d, paths = _checkpoint_and_scenes(tmp_path, 3)
    processor = Phi3VProcessor.from_pretrained(d, num_crops=1)
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    with torch.no_grad():   # the drift the stage corrects, made large so the check cannot pass by accident
        model.model.vision_embed_tokens.img_projection[-1].weight.mul_(7.0)
        model.model.vision_embed_tokens.img_projection[-1].bias.mul_(7.0)
    raw = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    raw.load_state_dict(model.state_dict())
    s = align_vision(model, processor, paths, steps=2, batch_size=3, lr=0.0, log_every=0)
    kept = align_vision(raw, processor, paths, steps=2, batch_size=3, lr=0.0, log_every=0, match_text_scale=False)
    target = word_embedding_rms(model)
    assert "token_rms_before" not in kept
    assert abs(image_token_rms(raw, processor, paths) - target) > 0.5 * target
    assert s["word_embedding_rms"] == pytest.approx(target)
    assert s["token_rms_after"] == pytest.approx(target, rel=1e-4)      # on the images it measured
    # every token is scaled by one factor (weight and bias of the last linear layer), on any image
    ratio = image_token_rms(model, processor, paths) / image_token_rms(raw, processor, paths)
    assert ratio == pytest.approx(target / s["token_rms_before"], rel=1e-4)
    assert image_token_rms(model, processor, paths) == pytest.approx(target, rel=0.3)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, raw.state_dict()[k])]
    assert changed and all(k.startswith("model.vision_embed_tokens.img_projection.2.") for k in changed)


def test_shape_objective_reads_each_colours_shape_from_the_scene_ground_truth(tmp_path):
    """shape_weight > 0: object tokens are also scored against the shape words, with each scene's colour -> shape
    from ``scenes.jsonl`` as the target (colours are distinct within a scene); the term is part of the loss, its
    accuracy is reported, and images without ground truth (a PNG outside a dataset) add nothing to it."""
    import json
    import shutil

    from phi3v_spatial.data.synth import generate_dataset
    from phi3v_spatial.model import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_spatial.train.align import colour_shapes

    d, stray = _checkpoint_and_scenes(tmp_path, 1)
    generate_dataset(str(tmp_path / "ds"), 3, seed=5, kinds=["count"])
    with open(tmp_path / "ds" / "scenes.jsonl") as f:
        scenes = [json.loads(line) for line in f]
    paths = sorted(str(p) for p in (tmp_path / "ds" / "images").glob("*.png"))
    maps = colour_shapes(paths + stray)
    assert maps[-1] is None
    for p, m in zip(paths, maps):
        scene = next(s for s in scenes if p.endswith(f"/{s['id']}_c0_f0.png"))
        assert m == {o["colour"]: o["shape"] for o in scene["objects"]}
    processor = Phi3VProcessor.from_pretrained(d, num_crops=1)
    torch.manual_seed(0)
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    plain = align_vision(model, processor, paths, steps=1, batch_size=3, lr=0.0, log_every=0)
    assert "shape_acc" not in plain
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    torch.manual_seed(0)
    s = align_vision(model, processor, paths, steps=40, batch_size=3, lr=5e-3, log_every=10, shape_weight=1.0)
    assert s["first_loss"] > plain["first_loss"]          # the shape term is part of the loss
    assert s["final_loss"] < s["first_loss"]
    assert "shape_acc" in s and not (s["shape_acc"] < 0.0 or s["shape_acc"] > 1.0)   # NaN: no token mostly object
    # stray images only: nothing to score shapes on, and the loss is the colour loss alone
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    alone = align_vision(model, processor, stray, steps=1, batch_size=1, lr=0.0, log_every=0, shape_weight=1.0)
    model = Phi3VForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    ref = align_vision(model, processor, stray, steps=1, batch_size=1, lr=0.0, log_every=0)
    assert "shape_acc" not in alone and alone["first_loss"] == pytest.approx(ref["first_loss"])
    shutil.rmtree(tmp_path / "ds")
