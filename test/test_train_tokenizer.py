"""The embedded model's small BPE tokenizer keeps the official special tokens, roles and quirks."""
import json
import os

import pytest

from phi3v_spatial.engine import prompts
from phi3v_spatial.train.tokenizer_training import ADDED_TOKENS, load_fast_tokenizer, train_tokenizer

CORPUS = [
    prompts.chat_prompt(prompts.relation_question(a, r, b), 1) + prompts.answer_target(x)
    for a in ("red cube", "blue sphere", "green cylinder", "yellow cone")
    for b in ("purple cube", "orange sphere")
    for r in ("left of", "right of", "above", "below", "behind", "in front of")
    for x in (prompts.YES, prompts.NO)
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(CORPUS * 2, str(tmp_path_factory.mktemp("tok")), vocab_size=400)


def test_special_tokens_have_the_official_roles(tok_dir):
    tok = load_fast_tokenizer(tok_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.convert_tokens_to_ids("</s>")) == (0, 1, 2)
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in ADDED_TOKENS}
    assert len(set(ids.values())) == len(ADDED_TOKENS) and tok.unk_token_id not in ids.values()
    # each special string is one token, never split
    for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|system|>", "<|image|>"):
        assert tok(t, add_special_tokens=False)["input_ids"] == [ids[t]]
    cfg = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    assert cfg["add_bos_token"] and not cfg["add_eos_token"] and cfg["padding_side"] == "right"
    assert cfg["chat_template"].startswith("{% for message in messages %}")
    smap = json.load(open(os.path.join(tok_dir, "special_tokens_map.json")))
    assert smap["eos_token"]["content"] == smap["pad_token"]["content"] == "<|endoftext|>"
    # the file's own flags: <|assistant|> and <|image|> strip the whitespace after them, <|end|> does not
    flags = {a["content"]: a for a in json.load(open(os.path.join(tok_dir, "tokenizer.json")))["added_tokens"]}
    assert flags["<|assistant|>"]["rstrip"] and flags["<|image|>"]["rstrip"] and not flags["<|end|>"]["rstrip"]
    assert flags["<|end|>"]["special"] and not flags["</s>"]["special"]


def test_chat_layout_tokenises_like_the_official_tokenizer(tok_dir, official_tokenizer_dir):
    """Same token *pattern* around the special tokens: <s> first, `▁` + <0x0A> after <|user|> and <|end|>,
    the newline swallowed by <|assistant|>, answer target = ▁answer <|end|> ▁ <0x0A> <|endoftext|>."""
    ours = load_fast_tokenizer(tok_dir)
    official = load_fast_tokenizer(official_tokenizer_dir)
    text = prompts.chat_prompt("Where is the red cube?", 0) + prompts.answer_target("yes")

    def skeleton(tok):
        toks = tok.convert_ids_to_tokens(tok(text)["input_ids"])
        keep = {"<s>", "<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>", "<0x0A>", "▁yes"}
        # a lone "▁" counts only where SentencePiece puts it: right before a newline byte
        return [t for i, t in enumerate(toks)
                if t in keep or (t == "▁" and i + 1 < len(toks) and toks[i + 1] == "<0x0A>")]

    assert skeleton(ours) == skeleton(official) == [
        "<s>", "<|user|>", "▁", "<0x0A>", "<|end|>", "▁", "<0x0A>", "<|assistant|>", "▁yes", "<|end|>", "▁", "<0x0A>",
        "<|endoftext|>"]


def test_unseen_characters_fall_back_to_bytes_and_round_trip(tok_dir):
    tok = load_fast_tokenizer(tok_dir)
    text = "Zürich 42 ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert len(tok) < 600  # small vocabulary: 400 base + 45 added tokens
