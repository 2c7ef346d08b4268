"""Phi3VImageProcessor: the reference HD transform (image_processing_phi3_v.py) with PIL + torch, no torchvision.

torchvision's ``F.resize`` on a PIL image is ``img.resize((w, h), Image.BILINEAR)`` (PIL always antialiases when
shrinking; torchvision's ``antialias`` flag only affects tensors), and ``F.pad`` with a fill colour is a paste onto a
white canvas, so both are reproduced exactly here.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def to_pil_rgb(image) -> Image.Image:
    """PIL image or HxWx3 / HxW / HxWx4 uint8 array -> RGB PIL image (the reference's do_convert_rgb)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 arrays (HxWx3 RGB), got dtype {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"images must be HxWx3 RGB arrays, got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr), "RGBA" if arr.shape[2] == 4 else "RGB").convert("RGB")


def hd_scale(width: int, height: int, num_crops: int) -> int:
    """Largest crops-per-row ``scale`` with scale * ceil(scale / ratio) <= num_crops (ratio = long/short side)."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_transform(img: Image.Image, num_crops: int, crop: int = 336) -> Image.Image:
    """Resize so the long side is ``scale*crop`` wide (portrait: transposed first), pad height with white, centred."""
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = hd_scale(width, height, num_crops)
    new_w = int(scale * crop)
    new_h = max(int(new_w / ratio), 1)  # the reference would fail on 0 for absurd aspect ratios
    img = img.resize((new_w, new_h), Image.BILINEAR)
    target = int(math.ceil(new_h / crop) * crop)
    top = int((target - new_h) / 2)
    if target != new_h:
        canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
        canvas.paste(img, (0, top))
        img = canvas
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


class Phi3VImageProcessor:
    """Images -> pixel_values (N, num_crops+1, 3, crop, crop), image_sizes (N, 2) padded HD sizes, num_img_tokens."""

    def __init__(self, num_crops: int = 1, image_mean=CLIP_MEAN, image_std=CLIP_STD, crop_size: int = 336,
                 patch_size: int = 14, do_convert_rgb: bool = True, num_img_tokens: int | None = None, **_ignored):
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        if crop_size % patch_size or (crop_size // patch_size) % 2:
            raise ValueError(f"crop_size {crop_size} / patch_size {patch_size} must give an even patch grid")
        self.num_crops = int(num_crops)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.crop_size = int(crop_size)
        self.patch_size = int(patch_size)
        self.do_convert_rgb = do_convert_rgb

    @property
    def merged_grid(self) -> int:
        return self.crop_size // self.patch_size // 2

    @property
    def num_img_tokens(self) -> int:
        """Tokens per crop (144 for 336/14)."""
        return self.merged_grid ** 2

    def tokens_for_size(self, h: int, w: int) -> int:
        """Placeholder count for an image whose padded HD size is h x w (the reference formula, generalised)."""
        h_c, w_c, g = h // self.crop_size, w // self.crop_size, self.merged_grid
        return (h_c * w_c + 1) * g * g + 1 + (h_c + 1) * g

    def hd_size(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """(h, w) of the padded HD image for an input of ``width`` x ``height``, without touching pixels."""
        nc = num_crops or self.num_crops
        long_, short = (width, height) if width >= height else (height, width)
        ratio = long_ / short
        new_l = int(hd_scale(long_, short, nc) * self.crop_size)
        new_s = max(int(new_l / ratio), 1)
        padded = int(math.ceil(new_s / self.crop_size) * self.crop_size)
        return (padded, new_l) if width >= height else (new_l, padded)

    def preprocess_one(self, image, num_crops: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (crops (1 + h_c*w_c, 3, crop, crop) with the global view first, (h, w)).

        Same arithmetic as the reference (x / 255, then (x - mean) / std, bicubic global view of the normalised
        image), done in place and written straight into the output, so a 16-crop frame costs a few passes over
        its pixels rather than one per step.
        """
        nc = num_crops or self.num_crops
        img = hd_transform(to_pil_rgb(image), nc, self.crop_size)
        pixels = np.array(img, dtype=np.uint8)  # H x W x 3
        h, w = pixels.shape[:2]
        hd = torch.empty(3, h, w)  # channel-first and contiguous before the arithmetic: half the time of a strided view
        hd.copy_(torch.from_numpy(pixels).permute(2, 0, 1))
        hd.div_(255.0).sub_(self._mean).div_(self._std)
        c = self.crop_size
        out = torch.empty(1 + (h // c) * (w // c), 3, c, c)
        out[0] = F.interpolate(hd[None], size=(c, c), mode="bicubic", align_corners=False)[0]
        out[1:].view(h // c, w // c, 3, c, c).copy_(hd.view(3, h // c, c, w // c, c).permute(1, 3, 0, 2, 4))
        return out, (h, w)

    def preprocess_unpadded(self, images, num_crops: int | None = None) -> dict:
        """Like ``__call__`` but each image keeps only its real crops: ``crops`` is a list of (1 + h_c*w_c, 3, c, c).

        For callers that never encode the zero-padding slots (the engine), so they are never built either.
        """
        nc = num_crops or self.num_crops
        crops, sizes, tokens = [], [], []
        for im in images:
            x, (h, w) = self.preprocess_one(im, nc)
            crops.append(x)
            sizes.append([h, w])
            tokens.append(self.tokens_for_size(h, w))
        return {"crops": crops, "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
                "num_img_tokens": tokens}

    def __call__(self, images, num_crops: int | None = None, return_tensors: str | None = "pt") -> dict:
        """Batch of images (each padded with zero crops to num_crops+1)."""
        if images is None:
            images = []
        if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        nc = num_crops or self.num_crops
        c = self.crop_size
        feats = self.preprocess_unpadded(images, nc)
        pix = torch.zeros(len(feats["crops"]), nc + 1, 3, c, c)
        for i, x in enumerate(feats["crops"]):
            pix[i, : x.shape[0]] = x
        return {"pixel_values": pix, "image_sizes": feats["image_sizes"], "num_img_tokens": feats["num_img_tokens"]}

    @property
    def _mean(self) -> torch.Tensor:
        return torch.tensor(self.image_mean).view(3, 1, 1)

    @property
    def _std(self) -> torch.Tensor:
        return torch.tensor(self.image_std).view(3, 1, 1)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "do_convert_rgb": self.do_convert_rgb, "image_mean": self.image_mean, "image_std": self.image_std,
            "image_processor_type": "Phi3VImageProcessor", "num_crops": self.num_crops,
            "num_img_tokens": self.num_img_tokens, "processor_class": "Phi3VProcessor",
            "crop_size": self.crop_size, "patch_size": self.patch_size,
        }

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "Phi3VImageProcessor":
        d = {k: v for k, v in d.items() if k not in ("auto_map", "image_processor_type", "processor_class")}
        crop = d.get("crop_size", 336)
        if isinstance(crop, dict):  # HF style {"height": .., "width": ..}
            crop = crop.get("height", crop.get("shortest_edge", 336))
        d["crop_size"] = crop
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    @classmethod
    def from_pretrained(cls, path: str, num_crops: int | None = None) -> "Phi3VImageProcessor":
        with open(os.path.join(path, PREPROCESSOR_CONFIG)) as f:
            return cls.from_dict(json.load(f), num_crops=num_crops)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, PREPROCESSOR_CONFIG), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
