"""Side-by-side speed measurements of the engine's choices, each against the straightforward alternative.

Run with `make bench`. Every ratio below is measured in this one run on this machine, on a random checkpoint
of moderate size (the numbers are about code paths, not answer quality):

1. relation scoring: shared prefix (images) computed once + per-candidate suffix vs a full forward per candidate;
2. generation: greedy decoding over the KV cache vs recomputing the whole sequence for every token;
3. vision: encoding only the used HD crops vs encoding every zero-padded crop slot as the reference does
   (a 480x240 frame at num_crops=4 uses 3 of the 5 slots);
4. image intake: numpy decode of a raw bgr8 frame vs a JPEG decode of the same frame.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from phi3v_spatial.engine import prompts  # noqa: E402
from phi3v_spatial.engine.engine import SpatialEngine  # noqa: E402
from phi3v_spatial.engine.images import decode_compressed, decode_raw  # noqa: E402
from phi3v_spatial.engine.parsing import Relation  # noqa: E402


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tokenizer_dir() -> str:
    shared = os.path.join(os.path.dirname(ROOT), "shared", "phi3v-tokenizer")
    if os.path.isfile(os.path.join(shared, "tokenizer.json")):
        return shared
    from phi3v_spatial.paths import default_model_dir

    return default_model_dir()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    from phi3v_spatial.model.tiny import save_random_checkpoint

    tmp = tempfile.mkdtemp(prefix="phi3v-bench-")
    save_random_checkpoint(tmp, tokenizer_dir(), seed=0, num_crops=4, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, crop_size=112,
                           vision_hidden_size=128, vision_layers=4, vision_heads=4, vision_intermediate_size=256)
    eng = SpatialEngine.from_pretrained(tmp, device="cpu")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(2)]
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
          f"torch={torch.__version__} python={platform.python_version()}")
    print(f"model: random Phi3V, LM 4x256, CLIP 4x128 @112px, num_crops=4, 2 frames 320x240; median of {args.repeat}\n")
    rows = []

    # 1. relation scoring
    cands = [Relation(f"obj{i} cube", "left of", "blue sphere") for i in range(args.candidates)]

    def naive_scores():
        with torch.inference_mode():
            for c in cands:
                text = prompts.chat_prompt(prompts.relation_question(c.subject, c.relation, c.object), len(frames))
                eng.model(**eng._encode(text, frames)).logits[0, -1]

    t_prefix = timeit(lambda: eng.query_relations(cands, frames), args.repeat)
    t_naive = timeit(naive_scores, args.repeat)
    rows.append((f"relation scoring, {args.candidates} candidates", "prefix cache", t_prefix, "full forward each", t_naive))

    # 2. greedy generation
    text = prompts.chat_prompt("Describe the scene.", len(frames))

    def kv_decode():
        eng._generate(text, frames, args.tokens, None, None)

    def recompute_decode():
        with torch.inference_mode():
            batch = eng._encode(text, frames)
            ids = batch["input_ids"]
            for _ in range(args.tokens):
                out = eng.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                                image_sizes=batch["image_sizes"], use_cache=False)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)

    # Force the same number of tokens on both paths: stop ids are ignored for the measurement.
    stops, eng.stop_ids = eng.stop_ids, set()
    t_kv = timeit(kv_decode, args.repeat)
    eng.stop_ids = stops
    t_re = timeit(recompute_decode, max(1, args.repeat // 2))
    rows.append((f"greedy decode, {args.tokens} tokens", "KV cache", t_kv, "recompute sequence", t_re))

    # 3. vision crops
    wide = rng.integers(0, 256, (240, 480, 3), dtype=np.uint8)  # 2:1 -> 2x1 HD crops, 2 of 4 local slots padding
    batch = eng._encode(prompts.chat_prompt("x", 1), [wide])
    emb = eng.model.model.vision_embed_tokens
    pv, sizes = batch["pixel_values"], batch["image_sizes"]
    h_c, w_c = (int(v) // emb.crop for v in sizes[0])
    used = pv[0, : 1 + h_c * w_c]
    with torch.inference_mode():
        t_used = timeit(lambda: emb.clip_features(used), args.repeat)
        t_all = timeit(lambda: emb.clip_features(pv[0]), args.repeat)
    rows.append((f"CLIP encode, {1 + h_c * w_c} of {pv.shape[1]} crop slots used", "used crops", t_used, "all slots", t_all))

    # 4. image intake
    import cv2

    bgr = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    raw = bgr.tobytes()
    ok, jpg = cv2.imencode(".jpg", bgr)
    jpg = jpg.tobytes()
    t_raw = timeit(lambda: decode_raw("bgr8", 480, 640, 640 * 3, raw), args.repeat * 20)
    t_jpg = timeit(lambda: decode_compressed(jpg), args.repeat * 20)
    rows.append(("640x480 frame to RGB", "raw bgr8 (numpy)", t_raw, "jpeg (OpenCV)", t_jpg))

    w = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{w}}  {'ours':>22}  {'alternative':>24}  speed-up")
    for name, a_name, a, b_name, b in rows:
        print(f"{name:<{w}}  {a_name:>12} {a * 1e3:7.2f} ms  {b_name:>16} {b * 1e3:7.2f} ms  {b / a:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
