"""Logits of the native model vs a straight-line transliteration of the reference Phi-3-vision forward.

The reference below follows image_embedding_phi3_v.py / modeling_phi3_v.py step by step (CLIP hidden_states[-2] on ALL
crops incl. zero padding, reshape/permute 2x2 merge, newline concat, sub/glb order, projector, index_put splice) and
implements the LM (RMSNorm, fused qkv, su-scaled RoPE, eager causal attention, fused gate_up MLP) by hand with the
same weights, so nothing is shared with the implementation under test except transformers' CLIPVisionModel.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from phi3v_spatial.model import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor
from phi3v_spatial.model.checkpoint import checkpoint_files
from phi3v_spatial.model.tiny import save_random_checkpoint

MAX_INPUT_ID = int(1e9)


# ----------------------------------------------------------------------------- the reference, transliterated
def load_sd(path):
    sd = {}
    for f in checkpoint_files(path):
        sd.update(load_file(f))
    return sd


def ref_clip(sd, config):
    prefix = "model.vision_embed_tokens.img_processor.vision_model."
    clip = CLIPVisionModel(config.clip_vision_config())
    clip.config._attn_implementation = "eager"
    clip.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return clip.eval()


def ref_image_features(sd, config, clip, pixel_values, image_sizes):
    crop = config.crop_size
    num_images, num_crops, c, h, w = pixel_values.shape
    img_embeds = pixel_values.flatten(0, 1)
    img_feature = clip(img_embeds, output_hidden_states=True).hidden_states[config.layer_idx]
    img_features = img_feature[:, 1:]  # type_feature == 'patch'
    img_features = img_features.reshape(num_images, num_crops, -1, config.image_dim_out)
    glb_GN, sub_GN = sd["model.vision_embed_tokens.glb_GN"], sd["model.vision_embed_tokens.sub_GN"]

    def reshape_hd_patches_2x2merge(image_features, h_crop, w_crop):
        N, L, C = image_features.shape
        assert N % (h_crop * w_crop) == 0
        num_images = N // (h_crop * w_crop)
        H = int(L ** 0.5)
        return (
            image_features.reshape(N, H, H, C)
            .reshape(N, H // 2, 2, H // 2, 2, C)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(N, -1, 4 * C)
            .reshape(num_images, h_crop, w_crop, H // 2, H // 2, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(num_images, h_crop * H // 2, w_crop * H // 2, 4 * C)
        )

    def add_image_newline(image_features_hd):
        num_images, h, w, hid_dim = image_features_hd.shape
        newline_embeddings = sub_GN.expand(num_images, h, -1, -1)
        return torch.cat([image_features_hd, newline_embeddings], dim=2).reshape(num_images, -1, hid_dim)

    global_image_features = img_features[:, 0]
    global_image_features_hd = reshape_hd_patches_2x2merge(global_image_features, 1, 1)
    global_image_features_hd_newline = add_image_newline(global_image_features_hd)
    all_image_embeddings = []
    for i, img_size in enumerate(image_sizes):
        h, w = int(img_size[0]), int(img_size[1])
        h_crop, w_crop = h // crop, w // crop
        sub_image_features = img_features[i, 1: 1 + h_crop * w_crop]
        sub_image_features_hd = reshape_hd_patches_2x2merge(sub_image_features, h_crop, w_crop)
        sub_image_features_hd_newline = add_image_newline(sub_image_features_hd)
        all_image_embeddings.extend([sub_image_features_hd_newline.squeeze(0), glb_GN.squeeze(0),
                                     global_image_features_hd_newline[i]])
    x = torch.cat(all_image_embeddings, dim=0)
    x = F.linear(x, sd["model.vision_embed_tokens.img_projection.0.weight"], sd["model.vision_embed_tokens.img_projection.0.bias"])
    x = F.gelu(x)
    return F.linear(x, sd["model.vision_embed_tokens.img_projection.2.weight"], sd["model.vision_embed_tokens.img_projection.2.bias"])


def ref_embed(sd, config, clip, input_ids, pixel_values, image_sizes):
    input_ids = input_ids.clone()  # the reference clamps in place; keep the test's tensor intact
    positions = torch.nonzero((input_ids < 0) & (input_ids > -MAX_INPUT_ID), as_tuple=True)
    input_ids.clamp_min_(0).clamp_max_(config.vocab_size)
    hidden_states = F.embedding(input_ids, sd["model.embed_tokens.weight"])
    if pixel_values is not None and len(positions[0]):
        feats = ref_image_features(sd, config, clip, pixel_values, image_sizes)
        hidden_states = hidden_states.index_put(positions, feats, accumulate=False)
    return hidden_states


def ref_lm(sd, config, embeds):
    """Phi-3 decoder, batch of unpadded rows, with Phi3SuScaledRotaryEmbedding semantics."""
    B, T, H = embeds.shape
    nh = config.num_attention_heads
    hd = H // nh
    L = config.num_hidden_layers
    eps = config.rms_norm_eps
    rope = config.rope_parameters
    orig = config.original_max_position_embeddings
    position_ids = torch.arange(T)
    seq_len = int(position_ids.max()) + 1
    ext = torch.tensor(rope["long_factor"] if seq_len > orig else rope["short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (ext * rope.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
    scale = config.max_position_embeddings / orig
    scaling_factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
    freqs = position_ids[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling_factor, emb.sin() * scaling_factor

    def rms(x, w):
        v = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(v + eps))

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    causal = torch.full((T, T), float("-inf")).triu(1)
    x = embeds
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        qkv = h @ sd[p + "self_attn.qkv_proj.weight"].T
        q, k, v = qkv[..., :H], qkv[..., H: 2 * H], qkv[..., 2 * H:]
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + causal, dim=-1, dtype=torch.float32)
        o = (att @ v).transpose(1, 2).reshape(B, T, H)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = (h @ sd[p + "mlp.gate_up_proj.weight"].T).chunk(2, dim=-1)
        x = x + (up * F.silu(gate)) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


# ----------------------------------------------------------------------------- helpers
def random_image(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    img = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]  # blocky: survives resizing
    return np.ascontiguousarray(img + rng.integers(0, 16, img.shape, dtype=np.uint8))


def build_prompt(image_processor, images, num_crops, text_ids=((5, 6, 7), (8, 9), (10, 11, 12))):
    """[1, 32010, ...] + image blocks separated by BOS-led text chunks, like the reference processor output."""
    feats = image_processor(images, num_crops=num_crops)
    ids = [1, 32010, 29871, 13]
    for k, n in enumerate(feats["num_img_tokens"], start=1):
        ids += [-k] * n + [1, *text_ids[(k - 1) % len(text_ids)]]
    ids += [32007, 29871, 13, 32001]
    return torch.tensor([ids]), feats["pixel_values"], feats["image_sizes"]


@pytest.fixture(scope="module", params=["crop56_2layers", "crop84_3layers"])
def ckpt(request, tmp_path_factory):
    over = {} if request.param == "crop56_2layers" else dict(crop_size=84, vision_layers=3, vision_hidden_size=24,
                                                              hidden_size=48, num_attention_heads=3)
    path = save_random_checkpoint(str(tmp_path_factory.mktemp(request.param)), None, seed=3, **over)
    model = Phi3VForCausalLM.from_pretrained(path, attn_implementation="eager")
    config = Phi3VConfig.from_pretrained(path)
    sd = load_sd(path)
    return dict(path=path, model=model, config=config, sd=sd, clip=ref_clip(sd, config),
                ip=Phi3VImageProcessor(crop_size=config.crop_size, patch_size=config.patch_size))


def assert_close_to_scale(actual, expected, rel=1e-4):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * scale {scale:.3g}"


CASES = [  # (image (h, w) list, num_crops)
    ([(56, 56)], 1),
    ([(100, 170)], 4),
    ([(170, 100)], 4),
    ([(60, 300)], 6),
    ([(90, 130), (140, 60)], 4),
    ([(50, 50), (120, 240), (75, 75)], 3),
]


@pytest.mark.parametrize("sizes,num_crops", CASES)
@torch.no_grad()
def test_logits_match_reference(ckpt, sizes, num_crops):
    cfg = ckpt["config"]
    scale = cfg.crop_size / 56
    images = [random_image(int(h * scale), int(w * scale), seed=i + 10 * num_crops) for i, (h, w) in enumerate(sizes)]
    ids, pix, isz = build_prompt(ckpt["ip"], images, num_crops)
    ids_before = ids.clone()
    out = ckpt["model"](input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, image_sizes=isz)
    assert torch.equal(ids, ids_before), "the model must not clamp the caller's input_ids in place"
    ref = ref_lm(ckpt["sd"], cfg, ref_embed(ckpt["sd"], cfg, ckpt["clip"], ids, pix, isz))
    assert_close_to_scale(out.logits, ref)


@torch.no_grad()
def test_reference_comparison_is_sensitive_to_image_layout(ckpt):
    """Guards the test above: a transposed crop grid or a swapped image gives clearly different logits."""
    cfg = ckpt["config"]
    s = cfg.crop_size
    images = [random_image(2 * s, 3 * s, 1), random_image(2 * s, 3 * s, 2)]
    ids, pix, isz = build_prompt(ckpt["ip"], images, 6)
    ref = ref_lm(ckpt["sd"], cfg, ref_embed(ckpt["sd"], cfg, ckpt["clip"], ids, pix, isz))
    good = ckpt["model"](input_ids=ids, pixel_values=pix, image_sizes=isz).logits
    assert_close_to_scale(good, ref)
    n1 = int((ids == -1).sum())
    # Same token counts, wrong layouts: the two images swapped, and image 1's crops in column-major order.
    wrong_swap = ckpt["model"](input_ids=ids, pixel_values=pix[[1, 0]], image_sizes=isz).logits
    pix_cols = pix.clone()
    pix_cols[0, 1:7] = pix[0, 1:7].reshape(2, 3, *pix.shape[2:]).transpose(0, 1).reshape(6, *pix.shape[2:])
    wrong_order = ckpt["model"](input_ids=ids, pixel_values=pix_cols, image_sizes=isz).logits
    for bad in (wrong_swap, wrong_order):
        diff = (bad - ref)[:, 4: 4 + n1 + 10].abs().max().item()
        assert diff > 100 * 1e-4 * ref.abs().max().item()


@torch.no_grad()
def test_text_only_and_repeated_image_tag(ckpt):
    cfg, model = ckpt["config"], ckpt["model"]
    ids = torch.tensor([[1, 32010 % cfg.vocab_size, 5, 6, 7, 8]])
    assert_close_to_scale(model(input_ids=ids).logits, ref_lm(ckpt["sd"], cfg, ref_embed(ckpt["sd"], cfg, None, ids, None, None)))
    # <|image_1|> twice: both blocks get image 1's features (equal to splicing the features twice by hand).
    img = random_image(cfg.crop_size, 2 * cfg.crop_size, 5)
    feats = ckpt["ip"]([img], num_crops=2)
    n = feats["num_img_tokens"][0]
    ids = torch.tensor([[1, 5] + [-1] * n + [1, 6] + [-1] * n + [1, 7]])
    got = model(input_ids=ids, pixel_values=feats["pixel_values"], image_sizes=feats["image_sizes"]).logits
    f = ref_image_features(ckpt["sd"], cfg, ckpt["clip"], feats["pixel_values"], feats["image_sizes"])
    emb = F.embedding(ids.clamp_min(0), ckpt["sd"]["model.embed_tokens.weight"])
    pos = torch.nonzero(ids < 0, as_tuple=True)
    emb = emb.index_put(pos, torch.cat([f, f]))
    assert_close_to_scale(got, ref_lm(ckpt["sd"], cfg, emb))


@torch.no_grad()
def test_batch_right_padding_matches_single_rows(ckpt):
    """Rows with different image sizes/counts, right padded, give each row's unpadded logits."""
    cfg, model, ip = ckpt["config"], ckpt["model"], ckpt["ip"]
    s = cfg.crop_size
    rows = [build_prompt(ip, [random_image(s, 3 * s, 7)], 4),
            build_prompt(ip, [random_image(2 * s, s, 8), random_image(s, s, 9)], 4, text_ids=((4,), (4, 5, 6, 7, 8)))]
    length = max(r[0].shape[1] for r in rows)
    ids = torch.full((2, length), 32000 % cfg.vocab_size)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : r[0].shape[1]] = r[0][0]
        mask[b, : r[0].shape[1]] = 1
    pix = torch.cat([r[1] for r in rows])
    isz = torch.cat([r[2] for r in rows])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, image_sizes=isz).logits
    for b, (rid, rpix, risz) in enumerate(rows):
        ref = ref_lm(ckpt["sd"], cfg, ref_embed(ckpt["sd"], cfg, ckpt["clip"], rid, rpix, risz))
        assert_close_to_scale(out[b: b + 1, : rid.shape[1]], ref)


@torch.no_grad()
def test_incremental_decoding_with_cache_matches_full_forward(ckpt):
    """An external greedy loop: prefill with images, then one token at a time with past_key_values."""
    cfg, model = ckpt["config"], ckpt["model"]
    ids, pix, isz = build_prompt(ckpt["ip"], [random_image(cfg.crop_size, 2 * cfg.crop_size, 4)], 2)
    out = model(input_ids=ids, pixel_values=pix, image_sizes=isz, use_cache=True)
    past, seq = out.past_key_values, ids
    for _ in range(4):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
    full = ref_lm(ckpt["sd"], cfg, ref_embed(ckpt["sd"], cfg, ckpt["clip"], seq, pix, isz))
    assert_close_to_scale(out.logits[:, -1], full[:, -1])


def test_official_dims_give_official_token_layout(official_configs_dir):
    """With the official (336/14, 1024) tower the feature layout is 12 rows x 13 cols per crop, as in the reference."""
    import json
    import os

    path = os.path.join(official_configs_dir, "phi-3-vision-128k-instruct.config.json")
    cfg = Phi3VConfig(**json.load(open(path)))
    assert (cfg.crop_size, cfg.patch_size, cfg.merged_grid, cfg.tokens_per_crop, cfg.image_dim_out) == (336, 14, 12, 144, 1024)
    assert cfg.num_image_tokens(1, 1) == 313 and cfg.num_image_tokens(3, 4) == 1921

