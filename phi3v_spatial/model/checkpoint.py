"""Reading and writing Phi-3-vision checkpoint folders (official layout), apart from the modules themselves.

As transformers splits configuration / modeling / processing, the file I/O lives here: finding the weight files
(sharded or single safetensors, ``pytorch_model*.bin`` read with ``weights_only=True``), mapping names, checking
the tensor set and shapes against the model (an error names every missing, unexpected or mis-shaped tensor),
the generation config with every Phi-3 stop token, and writing sharded safetensors with the official names.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers import GenerationConfig

from .configuration_phi3v import Phi3VConfig
from .processing_phi3v import STOP_TOKENS  # the turn/stop tokens; generation stops on any of them

IMG_PREFIX = "model.vision_embed_tokens.img_processor."
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# Tensors some fine-tuning tools write that are not parameters here (the shared wte, CLIP's old position_ids buffer).
IGNORED_CHECKPOINT_KEYS = (
    re.compile(r"^model\.vision_embed_tokens\.wte\.weight$"),
    re.compile(r"\.embeddings\.position_ids$"),
    re.compile(r"rotary_emb\.inv_freq$"),
)


class CheckpointError(RuntimeError):
    """A checkpoint whose tensors do not fit the model: the message names the offending tensors."""


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / 123 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"bad shard size {size!r}")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def write_sharded_safetensors(state: dict, out_dir: str, max_bytes: int, save_file=None, n_shards: int | None = None):
    """Split ``state`` into shards (by size, or into exactly ``n_shards``) named like the official ones + index."""
    if save_file is None:
        from safetensors.torch import save_file
    names = list(state)
    sizes = {k: state[k].numel() * state[k].element_size() for k in names}
    total = sum(sizes.values())
    shards: list[list[str]] = [[]]
    if n_shards:
        target = total / n_shards
        acc = 0
        for k in names:
            if shards[-1] and acc + sizes[k] / 2 > target * len(shards) and len(shards) < n_shards:
                shards.append([])
            shards[-1].append(k)
            acc += sizes[k]
    else:
        acc = 0
        for k in names:
            if shards[-1] and acc + sizes[k] > max_bytes:
                shards.append([])
                acc = 0
            shards[-1].append(k)
            acc += sizes[k]
    n = len(shards)
    for stale in os.listdir(out_dir):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(out_dir, stale))
    if n == 1:
        save_file({k: state[k] for k in shards[0]}, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    weight_map, files = {}, []
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k] for k in keys}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return files


def resolve_model_dir(name_or_path: str, revision=None, cache_dir=None, token=None, local_files_only=None) -> str:
    """A local directory as is; anything else is a hub id fetched (or found in the cache) with huggingface_hub."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id=path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=bool(local_files_only),
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as err:  # offline, unknown repo, ...: say what was tried
        raise OSError(f"{path!r} is not a local directory and could not be fetched from the Hugging Face hub: {err}") from err


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint dir: sharded/single safetensors, else pytorch_model*.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [x for x in files if not os.path.isfile(os.path.join(path, x))]
            if missing:
                raise CheckpointError(f"{index_name} in {path} lists shard files that are missing: {missing}")
            return [os.path.join(path, x) for x in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    bins = sorted(x for x in os.listdir(path) if re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", x))
    if bins:
        return [os.path.join(path, x) for x in bins]
    raise CheckpointError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def _iter_tensors(files: Iterable[str], device: torch.device):
    from safetensors import safe_open

    for fname in files:
        if fname.endswith(".safetensors"):
            dev = str(device) if device.type != "meta" else "cpu"
            with safe_open(fname, framework="pt", device=dev) as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
        else:
            sd = torch.load(fname, map_location="cpu", weights_only=True)
            for k in list(sd):
                yield k, sd.pop(k)


def normalize_key(key: str) -> str | None:
    """Official name for a checkpoint key (None = known extra to drop)."""
    for pat in IGNORED_CHECKPOINT_KEYS:
        if pat.search(key):
            return None
    if key.startswith(IMG_PREFIX) and not key.startswith(IMG_PREFIX + "vision_model."):
        key = IMG_PREFIX + "vision_model." + key[len(IMG_PREFIX):]  # written by a 5.x CLIPVisionModel without the prefix
    return key


def load_checkpoint_state(path: str, model: nn.Module, dtype: torch.dtype, device: torch.device) -> dict:
    """Read every tensor, map names, check the set and the shapes against ``model``; raise naming all problems."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, unexpected, mismatched = {}, [], []
    for key, tensor in _iter_tensors(checkpoint_files(path), device):
        name = normalize_key(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[name]:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {expected[name]}")
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    missing = sorted(set(expected) - set(state) - {m.split(":")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_head(sorted(unexpected))}")
        if mismatched:
            parts.append(f"{len(mismatched)} tensor(s) with mismatched shapes: {_head(mismatched)}")
        raise CheckpointError(f"checkpoint {path} does not match the model config: " + "; ".join(parts))
    return state


def _head(items: list[str], n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def stop_token_ids(model_dir: str) -> list[int]:
    """Ids of <|end|>, <|endoftext|>, </s> from the tokenizer files next to the weights (empty if there are none)."""
    tok = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(tok):
        return []
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(tok)
    return [i for i in (t.token_to_id(s) for s in STOP_TOKENS) if i is not None]


def load_generation_config(path: str, config: Phi3VConfig) -> GenerationConfig:
    """generation_config.json (or the model config) with eos = every Phi-3 stop token the tokenizer knows."""
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        gen = GenerationConfig.from_pretrained(path)
    else:
        gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                               pad_token_id=config.pad_token_id)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else ([gen.eos_token_id] if gen.eos_token_id is not None else [])
    stops = stop_token_ids(path)
    merged = list(dict.fromkeys(stops + [int(e) for e in eos]))
    if merged:
        gen.eos_token_id = merged
    if gen.pad_token_id is None:
        gen.pad_token_id = config.pad_token_id
    return gen
