"""The label mask: only answer + <|end|> + newline + <|endoftext|> are learned, with either tokenizer."""
import os

import numpy as np
import pytest
import torch

from phi3v_spatial.data.records import SpatialRecord
from phi3v_spatial.engine import prompts
from phi3v_spatial.train.collator import IGNORE_INDEX, SpatialCollator, encode_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "models", "phi3v-spatial-tiny")


def _tiny_dir(tmp_path, tokenizer_dir):
    from phi3v_spatial.model.tiny import save_random_checkpoint
    from phi3v_spatial.train.tokenizer_training import load_fast_tokenizer

    pad = load_fast_tokenizer(tokenizer_dir).pad_token_id
    return save_random_checkpoint(str(tmp_path / "tiny"), tokenizer_dir, seed=0, num_crops=1, pad_token_id=pad)


def _images(tmp_path, n=1):
    from PIL import Image

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(p)
        paths.append(p.name)
    return paths


def _records(tmp_path):
    imgs = _images(tmp_path, 2)
    return [
        SpatialRecord(id="a", images=imgs[:1], question=prompts.relation_question("red cube", "left of", "blue sphere"),
                      answer="yes", type="yesno"),
        SpatialRecord(id="b", images=imgs, question=prompts.choice_question("Which object moved?", ["red cube", "blue cone"]),
                      answer="blue cone", type="multiframe", choices=["red cube", "blue cone"]),
        SpatialRecord(id="c", images=imgs[:1], question="What objects are in the image?",
                      answer="There are 2 objects: a blue cone and a red cube.", type="describe"),
    ]


def _check_mask(processor, records, root):
    tok = processor.tokenizer
    batch = SpatialCollator(processor)([(r, root) for r in records])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == len(records)
    for row, r in enumerate(records):
        learned = labels[row][labels[row] != IGNORE_INDEX].tolist()
        target = prompts.answer_target(r.answer)
        # exactly the target's tokens...
        assert learned == tok(target, add_special_tokens=False)["input_ids"]
        # ...which decode back to answer + <|end|> + newline + <|endoftext|> (SentencePiece puts a space before the newline)
        decoded = tok.decode(learned, skip_special_tokens=False)
        assert decoded.replace(" \n", "\n") == target
        assert tok.convert_ids_to_tokens(learned)[-1] == prompts.ENDOFTEXT
        # the learned tokens are the last real tokens of the row; prompt, image slots and padding are masked
        n_real = int(mask[row].sum())
        assert (labels[row, n_real - len(learned):n_real] == torch.tensor(learned)).all()
        assert (labels[row, : n_real - len(learned)] == IGNORE_INDEX).all()
        assert (labels[row, n_real:] == IGNORE_INDEX).all()
        assert (ids[row, n_real:] == tok.pad_token_id).all()
        assert (labels[row][ids[row] < 0] == IGNORE_INDEX).all() and (ids[row] < 0).any()
        # the prompt part is what inference feeds: the processor's ids of the prompt alone
        prompt_ids = processor(prompts.chat_prompt(r.question, len(r.images)),
                               images=[__import__("PIL.Image").Image.open(os.path.join(root, p)).convert("RGB") for p in r.images],
                               return_tensors="pt")["input_ids"][0]
        assert ids[row, : n_real - len(learned)].tolist() == prompt_ids.tolist()
    # right padding: the shorter rows end in padding, image tensors of all samples concatenated in order
    assert batch["pixel_values"].shape[0] == sum(len(r.images) for r in records)
    assert batch["image_sizes"].shape == (sum(len(r.images) for r in records), 2)


def test_label_mask_with_the_official_tokenizer(tmp_path, official_tokenizer_dir):
    from phi3v_spatial.model import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(_tiny_dir(tmp_path, official_tokenizer_dir), num_crops=1)
    records = _records(tmp_path)
    _check_mask(processor, records, str(tmp_path))
    # the official ids of the yes target: ▁yes <|end|> ▁ <0x0A> <|endoftext|>
    sample = encode_record(processor, records[0], str(tmp_path))
    assert [i for i in sample.labels if i != IGNORE_INDEX] == [4874, 32007, 29871, 13, 32000]
    assert sample.input_ids[len(sample.input_ids) - 6] == 32001   # <|assistant|> right before the answer


def test_label_mask_with_the_embedded_tokenizer(tmp_path):
    if not os.path.isfile(os.path.join(EMBEDDED, "tokenizer.json")):
        pytest.skip("embedded model not built (make embedded)")
    from phi3v_spatial.model import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(_tiny_dir(tmp_path, EMBEDDED), num_crops=1)
    _check_mask(processor, _records(tmp_path), str(tmp_path))


def test_label_mask_with_a_freshly_trained_tokenizer(tmp_path):
    """The embedded tokenizer's recipe, without needing models/ to be built."""
    from phi3v_spatial.model import Phi3VProcessor
    from phi3v_spatial.train.tokenizer_training import train_tokenizer

    records = _records(tmp_path)
    texts = [prompts.chat_prompt(r.question, len(r.images)) + prompts.answer_target(r.answer) for r in records] * 4
    tok_dir = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=320)
    processor = Phi3VProcessor.from_pretrained(_tiny_dir(tmp_path, tok_dir), num_crops=1)
    _check_mask(processor, records, str(tmp_path))


def test_multi_turn_packing_learns_every_answer_and_keeps_the_first_prompt(tmp_path):
    """turns > 1: the first turn is exactly the inference prompt, every answer is learned, the rest is masked."""
    from phi3v_spatial.model import Phi3VProcessor
    from phi3v_spatial.train.tokenizer_training import train_tokenizer

    img = _images(tmp_path, 1)
    records = [SpatialRecord(id=f"q{i}", images=img, question=prompts.relation_question(s, "left of", o),
                             answer=a, type="yesno")
               for i, (s, o, a) in enumerate([("red cube", "blue sphere", "yes"), ("blue sphere", "red cube", "no"),
                                              ("green cone", "red cube", "yes")])]
    other = SpatialRecord(id="z", images=_images(tmp_path, 2)[1:], question="How many objects are there?", answer="2",
                          type="count")
    texts = [prompts.chat_prompt(r.question, 1) + prompts.answer_target(r.answer) for r in records] * 4
    processor = Phi3VProcessor.from_pretrained(_tiny_dir(tmp_path, train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=320)),
                                               num_crops=1)
    tok, root = processor.tokenizer, str(tmp_path)
    items = [(r, root) for r in records + [other]]
    collator = SpatialCollator(processor, turns=3, items=items)
    s = collator.encode(records[1], root)
    # deterministic partners: the next records of the same image, wrapping around
    first = encode_record(processor, records[1], root)
    n_prompt = first.labels.count(IGNORE_INDEX)
    assert s.input_ids[:n_prompt] == first.input_ids[:n_prompt]
    learned = [i for i in s.labels if i != IGNORE_INDEX]
    eot = tok.convert_tokens_to_ids(prompts.ENDOFTEXT)
    expect = []
    for k, r in enumerate([records[1], records[2], records[0]]):
        t = tok(prompts.answer_target(r.answer), add_special_tokens=False)["input_ids"]
        expect += t if k == 2 else [i for i in t if i != eot]
    assert learned == expect
    follow = tok(prompts.chat_prompt(records[2].question, 0), add_special_tokens=False)["input_ids"]
    text_ids = [i for i in s.input_ids if i >= 0]
    assert any(text_ids[j:j + len(follow)] == follow for j in range(len(text_ids)))
    # a record alone on its image stays a single turn; turns=1 is the plain collator
    assert collator.encode(other, root).input_ids == encode_record(processor, other, root).input_ids
    assert SpatialCollator(processor).encode(records[1], root).input_ids == first.input_ids


def test_multi_turn_chat_never_asks_about_the_same_object_pair_twice(tmp_path):
    """'Is A left of B?' answered earlier in the chat would give away 'Is B left of A?' (no image needed)."""
    from phi3v_spatial.model import Phi3VProcessor
    from phi3v_spatial.train.tokenizer_training import train_tokenizer

    img = _images(tmp_path, 1)
    qs = [("red cube", "left of", "blue sphere", "yes"), ("blue sphere", "left of", "red cube", "no"),
          ("red cube", "right of", "blue sphere", "no"), ("green cone", "above", "red cube", "yes"),
          ("green cone", "right of", "blue sphere", "yes")]
    records = [SpatialRecord(id=f"q{i}", images=img, question=prompts.relation_question(s, rel, o), answer=a,
                             type="yesno", relation=rel, subj=s, obj=o) for i, (s, rel, o, a) in enumerate(qs)]
    texts = [prompts.chat_prompt(r.question, 1) + prompts.answer_target(r.answer) for r in records] * 4
    processor = Phi3VProcessor.from_pretrained(_tiny_dir(tmp_path, train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=320)),
                                               num_crops=1)
    tok, root = processor.tokenizer, str(tmp_path)
    collator = SpatialCollator(processor, turns=5, items=[(r, root) for r in records])

    def asked(sample):
        text = tok.decode([i for i in sample.input_ids if i >= 0])
        return [r.id for r in records if r.question in text]

    # q0 is about {red cube, blue sphere}: q1 and q2 (same pair) are skipped, the other pairs follow in file order
    assert asked(collator.encode(records[0], root)) == ["q0", "q3", "q4"]
    assert asked(collator.encode(records[2], root)) == ["q2", "q3", "q4"]
    assert asked(collator.encode(records[3], root)) == ["q0", "q3", "q4"]
