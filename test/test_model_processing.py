"""Image HD transform, token counts and prompt ids (real Phi-3 tokenizer from ../shared when present)."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v_spatial.model import Phi3VImageProcessor, Phi3VProcessor
from phi3v_spatial.model.image_processing_phi3v import CLIP_MEAN, CLIP_STD, hd_transform


def reference_token_count(h, w, nc):
    """The official formula evaluated independently: HD size by the reference scale search, then the count."""
    trans = w < h
    if trans:
        w, h = h, w
    ratio = w / h
    scale = 1
    while scale * math.ceil(scale / ratio) <= nc:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    pad_h = int(np.ceil(new_h / 336) * 336)
    H, W = (new_w, pad_h) if trans else (pad_h, new_w)
    return int((H // 336 * W // 336 + 1) * 144 + 1 + (H // 336 + 1) * 12), [H, W]


@pytest.mark.parametrize("w,h,nc,tokens,size", [
    (336, 336, 1, 313, [336, 336]), (336, 336, 4, 757, [672, 672]), (336, 336, 16, 2509, [1344, 1344]),
    (640, 480, 16, 1921, [1008, 1344]), (480, 640, 16, 1933, [1344, 1008]), (1920, 1080, 16, 2353, [1008, 1680]),
    (50, 8000, 16, 2653, [5376, 336]),
])
def test_token_counts_and_hd_sizes(w, h, nc, tokens, size):
    ip = Phi3VImageProcessor(num_crops=nc)
    out = ip([np.zeros((h, w, 3), np.uint8)])
    assert out["num_img_tokens"] == [tokens]
    assert out["image_sizes"].tolist() == [size]
    assert reference_token_count(h, w, nc) == (tokens, size)
    assert ip.hd_size(w, h) == tuple(size)
    h_c, w_c = size[0] // 336, size[1] // 336
    assert h_c * w_c <= nc  # num_crops is an upper bound
    assert out["pixel_values"].shape == (1, nc + 1, 3, 336, 336)
    assert torch.count_nonzero(out["pixel_values"][0, 1 + h_c * w_c:]) == 0  # zero padding crops


@pytest.mark.parametrize("w,h", [(23, 71), (300, 20), (97, 97), (640, 480), (100, 1000)])
@pytest.mark.parametrize("nc", [1, 3, 9])
def test_hd_size_prediction_matches_pixels(w, h, nc):
    ip = Phi3VImageProcessor(num_crops=nc, crop_size=56)
    out = ip([np.full((h, w, 3), 7, np.uint8)])
    assert tuple(out["image_sizes"][0].tolist()) == ip.hd_size(w, h)
    assert out["num_img_tokens"][0] == ip.tokens_for_size(*ip.hd_size(w, h))


def test_crops_are_row_major_global_is_bicubic_and_padding_white():
    crop = 56
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (70, 150, 3), dtype=np.uint8)  # landscape: height gets padded
    ip = Phi3VImageProcessor(num_crops=6, crop_size=crop)
    out = ip([img])
    H, W = out["image_sizes"][0].tolist()
    hd = hd_transform(Image.fromarray(img), 6, crop)
    assert hd.size == (W, H)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    t = (torch.from_numpy(np.array(hd)).permute(2, 0, 1).float() / 255 - mean) / std
    pv = out["pixel_values"][0]
    for r in range(H // crop):
        for c in range(W // crop):
            assert torch.equal(pv[1 + r * (W // crop) + c], t[:, r * crop:(r + 1) * crop, c * crop:(c + 1) * crop])
    assert torch.allclose(pv[0], F.interpolate(t[None], size=(crop, crop), mode="bicubic", align_corners=False)[0])
    # resized content: new_w = scale*crop, new_h = int(new_w / ratio), centred vertically on white
    scale = W // crop
    new_h = int(scale * crop / (150 / 70))
    top = (H - new_h) // 2
    arr = np.asarray(hd)
    assert (arr[:top] == 255).all() and (arr[top + new_h:] == 255).all()
    expect = np.asarray(Image.fromarray(img).resize((W, new_h), Image.BILINEAR))
    assert np.array_equal(arr[top:top + new_h], expect)


def test_portrait_is_transposed_like_the_reference():
    """A portrait image goes through the landscape path transposed: its HD image is the transpose."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (150, 70, 3), dtype=np.uint8)
    a = np.asarray(hd_transform(Image.fromarray(img), 6, 56))
    b = np.asarray(hd_transform(Image.fromarray(np.ascontiguousarray(img.transpose(1, 0, 2))), 6, 56))
    assert np.array_equal(a, b.transpose(1, 0, 2))
    # padding is on the left/right for a portrait image
    assert (a[:, 0] == 255).all()


def test_preprocessor_config_roundtrip(tmp_path, official_tokenizer_dir):
    ip = Phi3VImageProcessor.from_pretrained(official_tokenizer_dir)
    assert (ip.num_crops, ip.crop_size, ip.num_img_tokens) == (16, 336, 144)
    assert Phi3VImageProcessor.from_pretrained(official_tokenizer_dir, num_crops=4).num_crops == 4
    ip.save_pretrained(str(tmp_path))
    again = Phi3VImageProcessor.from_pretrained(str(tmp_path))
    assert again.to_dict() == ip.to_dict()


def test_input_validation():
    ip = Phi3VImageProcessor()
    with pytest.raises(ValueError, match="uint8"):
        ip([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ValueError, match="HxWx3"):
        ip([np.zeros((10, 10, 5), np.uint8)])
    with pytest.raises(ValueError, match="even patch grid"):
        Phi3VImageProcessor(crop_size=42, patch_size=14)
    gray = ip([np.zeros((20, 30), np.uint8)])  # grayscale converts to RGB
    assert gray["pixel_values"].shape[2] == 3


# ----------------------------------------------------------------------------- prompts with the real tokenizer
@pytest.fixture(scope="module")
def processor(official_tokenizer_dir):
    return Phi3VProcessor.from_pretrained(official_tokenizer_dir, num_crops=4)


def test_tokenizer_keeps_sentencepiece_space_after_special_tokens(processor):
    assert processor.tokenizer("<|user|>\n").input_ids == [1, 32010, 29871, 13]
    tok = processor.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 32000, 32000)
    assert tok.convert_tokens_to_ids("<|end|>") == 32007 and tok.convert_tokens_to_ids("<|assistant|>") == 32001
    assert processor.stop_token_ids == [32007, 32000, 2]


def test_phi35_example_layout(processor):
    """The real Phi-3.5 input ids: [1, 32010, 29871, 13, -1 x 757, 1, 29871, 13, ..., 32007, 29871, 13, 32001]."""
    text = processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nDescribe the image."}])
    assert text == "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n"
    out = processor(text, [np.zeros((672, 672, 3), np.uint8)])
    ids = out["input_ids"][0].tolist()
    assert ids[:4] == [1, 32010, 29871, 13]
    assert ids[4:4 + 757] == [-1] * 757 and ids[4 + 757] == 1
    assert ids[4 + 757:4 + 760] == [1, 29871, 13]
    assert ids[-4:] == [32007, 29871, 13, 32001]
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336) and out["image_sizes"].tolist() == [[672, 672]]


def test_multi_image_repeat_and_bos_after_each_image(processor):
    text = "<|user|>\n<|image_1|>\n<|image_2|>\nsame as <|image_1|>?<|end|>\n<|assistant|>\n"
    imgs = [np.zeros((336, 336, 3), np.uint8), np.zeros((480, 640, 3), np.uint8)]
    out = processor(text, imgs)
    ids = out["input_ids"][0]
    n1, n2 = processor.image_processor(imgs)["num_img_tokens"]
    assert int((ids == -1).sum()) == 2 * n1 and int((ids == -2).sum()) == n2
    ends = [i for i in range(1, len(ids)) if ids[i - 1] < 0 <= ids[i]]
    assert len(ends) == 3 and all(int(ids[i]) == 1 for i in ends)  # a <s> follows every image block
    assert out["pixel_values"].shape[0] == 2
    # order: image 1 block, then image 2 block, then image 1 again
    blocks = [int(ids[i - 1]) for i in ends]
    assert blocks == [-1, -2, -1]


def test_prompt_errors(processor):
    img = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="without gaps"):
        processor("<|image_2|>", [img])
    with pytest.raises(ValueError, match="refers to 1 image"):
        processor("<|image_1|>", [img, img])
    text_only = processor("<|user|>\nhi<|end|>\n<|assistant|>\n")
    assert "pixel_values" not in text_only and int(text_only["input_ids"].min()) >= 0


def test_decode_skips_placeholders_and_collate_pads(processor):
    a = processor("<|user|>\n<|image_1|>\nleft?<|end|>\n<|assistant|>\n", [np.zeros((40, 90, 3), np.uint8)], num_crops=2)
    b = processor("<|user|>\n<|image_1|>\n<|image_2|>\nbigger one?<|end|>\n<|assistant|>\n",
                  [np.zeros((300, 40, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)])
    assert "left?" in processor.decode(a["input_ids"][0])
    batch = processor.collate([a, b], padding_side="right")
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    L = max(la, lb)
    assert batch["input_ids"].shape == (2, L)
    assert batch["attention_mask"].sum(1).tolist() == [la, lb]
    assert torch.equal(batch["input_ids"][0, :la], a["input_ids"][0])
    assert (batch["input_ids"][0, la:] == processor.pad_token_id).all()
    assert batch["pixel_values"].shape == (3, 5, 3, 336, 336)  # crops padded to the larger num_crops+1
    assert batch["image_sizes"].tolist() == a["image_sizes"].tolist() + b["image_sizes"].tolist()
    left = processor.collate([a, b], padding_side="left")
    assert torch.equal(left["input_ids"][0, L - la:], a["input_ids"][0])


def test_processor_save_load_roundtrip(processor, tmp_path, official_tokenizer_dir):
    processor.save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(official_tokenizer_dir, name), "rb") as f1, open(tmp_path / name, "rb") as f2:
            assert f1.read() == f2.read()
    again = Phi3VProcessor.from_pretrained(str(tmp_path))
    assert again.num_crops == 4
    text = "<|user|>\n<|image_1|>\nWhere is the cup?<|end|>\n<|assistant|>\n"
    img = np.zeros((100, 200, 3), np.uint8)
    assert torch.equal(again(text, [img])["input_ids"], processor(text, [img])["input_ids"])
    assert json.load(open(tmp_path / "preprocessor_config.json"))["num_crops"] == 4


def test_chat_template_multi_turn_with_image_parts(processor):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is left of the cup?"}]},
            {"role": "assistant", "content": "A plate."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]}]
    text = processor.apply_chat_template(msgs)
    assert text == ("<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>\nWhat is left of the cup?<|end|>\n"
                    "<|assistant|>\nA plate.<|end|>\n<|user|>\n<|image_2|>\nAnd here?<|end|>\n<|assistant|>\n")
    ids = processor.tokenizer(text).input_ids
    assert ids[-1] == 32001  # <|assistant|> swallows the following newline
