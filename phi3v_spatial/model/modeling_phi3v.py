"""Native Phi-3(.5)-vision: transformers' Phi3Model + CLIPVisionModel with the official state-dict names.

Module tree == official names, so ``state_dict()`` / PEFT / saving need no renaming (reading and writing the
checkpoint files is ``checkpoint.py``'s job):
``model.embed_tokens|layers|norm`` (Phi3Model), ``lm_head``, ``model.vision_embed_tokens.{glb_GN, sub_GN,
img_projection.0/.2}`` and ``model.vision_embed_tokens.img_processor.vision_model.*`` (``img_processor`` is a thin
holder whose ``vision_model`` is a transformers ``CLIPVisionModel``; on transformers 5.x that model's own state dict has
no ``vision_model.`` prefix, the holder restores it). The loader also accepts checkpoints written without the prefix.
"""
from __future__ import annotations

import gc
import os

import torch
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.phi3.modeling_phi3 import Phi3Model, Phi3RMSNorm, Phi3RotaryEmbedding

from .checkpoint import (
    CheckpointError, load_checkpoint_state, load_generation_config, parse_size, resolve_model_dir,
    write_sharded_safetensors,
)
from .configuration_phi3v import Phi3VConfig
from .runtime import resolve_attn, resolve_device, resolve_dtype

MAX_INPUT_ID = int(1e9)  # reference: ids in (-MAX_INPUT_ID, 0) are image placeholders


class CLIPVisionTower(nn.Module):
    """Holds the CLIPVisionModel as ``vision_model`` so the parameters carry the official ``vision_model.`` prefix."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config.clip_vision_config())


class Phi3VImageEmbedding(nn.Module):
    """CLIP features -> 2x2 merge -> HD layout with separators ('sub_glb') -> MLP projector (reference semantics)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.config = config
        self.img_processor = CLIPVisionTower(config)
        dim = config.image_dim_out
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * dim))
        self.img_projection = nn.Sequential(
            nn.Linear(4 * dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.layers_used = config.vision_layers_used
        self.crop = config.crop_size
        self.grid = config.patch_grid

    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """hidden_states[layer_idx] of CLIP without CLS and without post-layernorm, shape (N, grid*grid, C).

        Runs only the encoder layers that hidden_states[layer_idx] depends on (the last ones are unused).
        """
        vm = self.img_processor.vision_model
        h = vm.embeddings(crops.to(vm.embeddings.patch_embedding.weight.dtype))
        h = vm.pre_layrnorm(h)
        for layer in vm.encoder.layers[: self.layers_used]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        return h[:, 1:]

    def merge_2x2(self, feats: torch.Tensor, h_c: int, w_c: int) -> torch.Tensor:
        """(h_c*w_c, grid*grid, C) crops -> (12h_c, 12w_c, 4C) with channel order [r0c0, r0c1, r1c0, r1c1]."""
        n, length, c = feats.shape
        m = self.grid // 2
        x = feats.reshape(n, m, 2, m, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, m, m, 4 * c)
        return x.reshape(h_c, w_c, m, m, 4 * c).permute(0, 2, 1, 3, 4).reshape(h_c * m, w_c * m, 4 * c)

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """Append sub_GN as an extra column at the end of every row, then flatten row-major."""
        rows, _, d = grid.shape
        return torch.cat([grid, self.sub_GN.reshape(1, 1, d).expand(rows, 1, d).to(grid.dtype)], dim=1).reshape(-1, d)

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                       encode_padding: bool = False) -> list[torch.Tensor]:
        """Projected features per image, each (num_image_tokens, hidden).

        Zero-padding crop slots are not encoded (their features are discarded anyway); ``encode_padding=True`` runs
        CLIP on every slot as the reference does, which only benchmarks and equivalence tests want.
        """
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (images, crops, 3, H, W), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[-1] != self.crop or pixel_values.shape[-2] != self.crop:
            raise ValueError(f"pixel_values crops are {tuple(pixel_values.shape[-2:])}, the model expects {self.crop}x{self.crop}")
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        if len(sizes) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images in pixel_values but {len(sizes)} image_sizes")
        grids = []
        for i, (h, w) in enumerate(sizes):
            if h % self.crop or w % self.crop or h <= 0 or w <= 0:
                raise ValueError(f"image_sizes[{i}]={[h, w]} is not a multiple of the crop size {self.crop}")
            h_c, w_c = h // self.crop, w // self.crop
            if 1 + h_c * w_c > pixel_values.shape[1]:
                raise ValueError(f"image {i} needs {1 + h_c * w_c} crops but pixel_values holds {pixel_values.shape[1]}")
            grids.append((h_c, w_c))
        if encode_padding:
            n, slots = pixel_values.shape[:2]
            every = self.clip_features(pixel_values.reshape(n * slots, *pixel_values.shape[2:]))
            feats = torch.cat([every[i * slots : i * slots + 1 + h_c * w_c] for i, (h_c, w_c) in enumerate(grids)])
            return self.project(feats, grids)
        return self.features_from_crops([pixel_values[i, : 1 + h_c * w_c] for i, (h_c, w_c) in enumerate(grids)], grids)

    def features_from_crops(self, crops: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Projected features from each image's real crops ((1 + h_c*w_c, 3, crop, crop), global view first).

        One CLIP batch holds the crops of every image."""
        for i, (x, (h_c, w_c)) in enumerate(zip(crops, grids)):
            if x.shape[0] != 1 + h_c * w_c or tuple(x.shape[-2:]) != (self.crop, self.crop):
                raise ValueError(f"image {i}: {tuple(x.shape)} crops for a {h_c}x{w_c} crop grid of {self.crop} px")
        return self.project(self.clip_features(crops[0] if len(crops) == 1 else torch.cat(crops, dim=0)), grids)

    def project(self, feats: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """CLIP features of the real crops of every image (in order) -> per-image projected token features."""
        proj_dtype = self.img_projection[0].bias.dtype
        per_image, start = [], 0
        for h_c, w_c in grids:
            glb = self.with_newlines(self.merge_2x2(feats[start : start + 1], 1, 1))
            sub = self.with_newlines(self.merge_2x2(feats[start + 1 : start + 1 + h_c * w_c], h_c, w_c))
            per_image.append(torch.cat([sub, self.glb_GN.reshape(1, -1).to(sub.dtype), glb], dim=0))
            start += 1 + h_c * w_c
        counts = [x.shape[0] for x in per_image]
        projected = self.img_projection(torch.cat(per_image, dim=0).to(proj_dtype))
        return list(projected.split(counts, dim=0))


class Phi3VModel(Phi3Model):
    """Phi3Model whose input embeddings get image features spliced in at the negative placeholder ids."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None) -> torch.Tensor:
        """Token embeddings with image features at ``-k`` ids (image k of that row). Never mutates ``input_ids``."""
        has_images = bool(((input_ids < 0) & (input_ids > -MAX_INPUT_ID)).any())
        if has_images and (pixel_values is None or image_sizes is None):
            raise ValueError("input_ids hold image placeholders (negative ids) but pixel_values/image_sizes are missing")
        feats = None
        if has_images:
            feats = self.vision_embed_tokens.image_features(pixel_values.to(self.embed_tokens.weight.device), image_sizes)
        return self.embed_with_features(input_ids, feats)

    def embed_with_features(self, input_ids: torch.Tensor, feats: list[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings with precomputed image features (``image_features`` output, or cached copies of it)."""
        is_image = (input_ids < 0) & (input_ids > -MAX_INPUT_ID)
        ids = input_ids.clamp(0, self.config.vocab_size - 1)  # a copy: the caller's ids stay untouched
        embeds = self.embed_tokens(ids)
        if not bool(is_image.any()):
            return embeds
        if not feats:
            raise ValueError("input_ids hold image placeholders (negative ids) but no image features were given")
        b_idx, s_idx, values, offset = [], [], [], 0
        for b in range(input_ids.shape[0]):
            row = input_ids[b]
            img_ids = sorted({-int(v) for v in row[is_image[b]].unique().tolist()})
            if img_ids and img_ids != list(range(1, len(img_ids) + 1)):
                raise ValueError(f"row {b}: image placeholders must be -1..-n without gaps, got {[-k for k in img_ids]}")
            for k in img_ids:
                if offset + k - 1 >= len(feats):
                    raise ValueError(f"row {b} refers to image {k} but only {len(feats)} images were given in pixel_values")
                f = feats[offset + k - 1]
                pos = (row == -k).nonzero().squeeze(1)  # ascending = row-major order of the reference index_put
                if pos.numel() % f.shape[0]:
                    raise ValueError(
                        f"row {b}: {pos.numel()} placeholder tokens for image {k}, which needs blocks of {f.shape[0]} tokens "
                        "(processor and model disagree on num_crops/crop size?)")
                b_idx.append(torch.full_like(pos, b))
                s_idx.append(pos)
                values.append(f.repeat(pos.numel() // f.shape[0], 1))  # a repeated <|image_k|> gets the same features
            offset += len(img_ids)
        if offset != len(feats):
            raise ValueError(f"pixel_values holds {len(feats)} images but the prompt refers to {offset}")
        return embeds.index_put((torch.cat(b_idx), torch.cat(s_idx)), torch.cat(values).to(embeds.dtype))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                pixel_values=None, image_sizes=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        return super().forward(input_ids=None, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


class Phi3VPreTrainedModel(PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.LayerNorm, Phi3RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, Phi3VImageEmbedding):
            module.glb_GN.zero_()
            module.sub_GN.zero_()
        elif type(module).__name__ == "CLIPVisionEmbeddings":
            module.class_embedding.normal_(0.0, std)


class Phi3VForCausalLM(Phi3VPreTrainedModel, GenerationMixin):
    """Phi-3(.5)-vision for causal LM: forward/generate as in HF causal LMs plus ``pixel_values``/``image_sizes``."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None, past_key_values=None,
                use_cache=None, labels=None, position_ids=None, inputs_embeds=None, logits_to_keep=0, **kwargs):
        """Logits (and loss when ``labels`` is given; -100 and negative ids ignored, shifted inside)."""
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Left or right padding: positions count only attended tokens (equals arange for unpadded rows).
            seq = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            pos = attention_mask.long().cumsum(-1) - 1
            position_ids = pos.clamp_min(0)[:, -seq:]
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
                             image_sizes=image_sizes, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).masked_fill(labels < 0, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        """As in GenerationMixin, but image inputs only reach the prefill step (decode steps never rerun CLIP)."""
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        cached = past_key_values is not None and past_key_values.get_seq_length() > 0
        if cached:
            inputs.pop("pixel_values", None)
            inputs.pop("image_sizes", None)
        return inputs

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, torch_dtype=None, dtype=None, device_map=None,
                        attn_implementation=None, config: Phi3VConfig | None = None, revision: str | None = None,
                        cache_dir: str | None = None, token=None, local_files_only: bool | None = None, **kwargs):
        """Load an official-layout checkpoint (dir or hub id) onto ONE device.

        ``device_map``: None -> cpu, "auto" -> cuda if available, or any device string / {"": device}.
        ``torch_dtype``/``dtype``: None/"auto" -> float32 on CPU, bf16 (else fp16) on CUDA.
        ``attn_implementation``: None/"auto" -> flash_attention_2 when importable on CUDA, else sdpa.
        Missing, unexpected or wrongly shaped tensors raise CheckpointError naming them.
        """
        if model_args:
            raise TypeError("positional model arguments are not supported")
        unknown = set(kwargs) - {"trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "force_download"}
        if unknown:
            raise TypeError(f"unsupported from_pretrained arguments: {sorted(unknown)}")
        path = resolve_model_dir(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only)
        if config is None:
            config = Phi3VConfig.from_pretrained(path)
        if isinstance(device_map, dict):
            if set(device_map) != {""}:
                raise ValueError("only single-device loading is supported: device_map={'': device}")
            device_map = device_map[""]
        device = resolve_device(device_map if device_map is not None else "cpu")
        dt = resolve_dtype(dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "auto"), device)
        attn = resolve_attn(attn_implementation, device, dt)
        config._attn_implementation = attn
        with torch.device("meta"):
            model = cls(config)
        state = load_checkpoint_state(path, model, dt, device)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model._materialize_buffers(device)
        model.config.dtype = dt
        model.name_or_path = str(pretrained_model_name_or_path)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        model.generation_config = load_generation_config(path, config)
        model.set_attention(attn)
        model.eval()
        gc.collect()
        return model

    def set_attention(self, attn: str) -> None:
        """Use one attention implementation for the LM and the CLIP tower."""
        self.config._attn_implementation = attn
        self.model.config._attn_implementation = attn
        vm = self.model.vision_embed_tokens.img_processor.vision_model
        vm.config._attn_implementation = attn
        for layer in vm.encoder.layers:
            layer.self_attn.config._attn_implementation = attn

    def _materialize_buffers(self, device: torch.device) -> None:
        """Recreate the non-persistent buffers (rotary inv_freq, CLIP position_ids) left on meta by a meta-device build."""
        self.model.rotary_emb = Phi3RotaryEmbedding(config=self.config).to(device)
        emb = self.model.vision_embed_tokens.img_processor.vision_model.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
        leftover = [n for n, b in self.named_buffers() if b.device.type == "meta"]
        leftover += [n for n, p in self.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise CheckpointError(f"tensors still uninitialised after loading: {leftover[:10]}")

    def save_pretrained(self, save_directory: str, max_shard_size: int | str = "2GB", safe_serialization: bool = True,
                        **kwargs) -> None:
        """Write config.json, generation_config.json and sharded safetensors (+ index) with the official names."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("only safetensors checkpoints are written")
        os.makedirs(save_directory, exist_ok=True)
        self.config.architectures = ["Phi3VForCausalLM"]
        self.config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        write_sharded_safetensors(state, save_directory, parse_size(max_shard_size), save_file)
