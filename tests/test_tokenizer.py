"""Tests for tokenizer.py: the page-level tokenizer (HeTLM). Fast, offline."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer import BOS, EOS, N_SPECIAL, PAD, SPECIALS, UNK, PageTokenizer  # noqa: E402


def test_specials_first():
    assert SPECIALS == ["<pad>", "<unk>", "<bos>", "<eos>"] and (PAD, UNK, BOS, EOS, N_SPECIAL) == (0, 1, 2, 3, 4)
    tok = PageTokenizer.from_counts({"a": 1})
    assert tok.pages[:4] == SPECIALS and tok.vocab_size == 5


def test_round_trip():
    tok = PageTokenizer.from_counts({"home": 5, "cart": 2, "p/1": 3})
    pages = ["home", "p/1", "cart", "home"]
    ids = tok.encode(pages)
    assert ids.dtype == np.uint32
    assert tok.decode(ids) == pages
    assert tok.encode(["never-seen"]).tolist() == [UNK]
    assert tok.page_id("never-seen") == UNK and tok.page_id("home") == N_SPECIAL


def test_id_order_by_count_then_name_and_deterministic():
    counts = {"b": 3, "a": 3, "z": 9, "c": 1, "y": 3}
    tok = PageTokenizer.from_counts(counts)
    assert tok.pages[N_SPECIAL:] == ["z", "a", "b", "y", "c"]
    assert tok.counts[N_SPECIAL:].tolist() == [9, 3, 3, 3, 1]
    reversed_dict = dict(reversed(list(counts.items())))
    assert PageTokenizer.from_counts(reversed_dict).pages == tok.pages  # insertion order does not matter


def test_min_count_maps_rare_pages_to_unk():
    tok = PageTokenizer.from_counts({"a": 5, "b": 2, "c": 1, "d": 1}, min_count=2)
    assert tok.pages[N_SPECIAL:] == ["a", "b"]
    assert tok.counts[UNK] == 2 and tok.counts[PAD] == 0 and tok.counts[BOS] == 0
    assert tok.encode(["c", "d", "a"]).tolist() == [UNK, UNK, N_SPECIAL]


def test_save_load_json(tmp_path):
    tok = PageTokenizer.from_counts({"x": 4, "y": 7, "é/ü": 1}, min_count=1)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    d = json.load(open(path, encoding="utf-8"))  # plain JSON, with counts
    assert d["pages"][N_SPECIAL:] == ["y", "x", "é/ü"] and d["counts"][N_SPECIAL:] == [7, 4, 1]
    tok2 = PageTokenizer.load(path)
    assert tok2.pages == tok.pages and np.array_equal(tok2.counts, tok.counts) and tok2.min_count == 1
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json"]  # no temp file left behind


def test_more_than_65535_pages(tmp_path):
    n = 70_000
    counts = {f"page{i}": n - i for i in range(n)}  # distinct counts: page i gets id i + 4
    tok = PageTokenizer.from_counts(counts)
    assert tok.vocab_size == n + N_SPECIAL
    ids = tok.encode(["page0", "page69999", "page65600"])
    assert ids.tolist() == [4, n + 3, 65604] and ids.max() > 65535
    path = str(tmp_path / "t.json")
    tok.save(path)
    assert PageTokenizer.load(path).decode(ids) == ["page0", "page69999", "page65600"]


def test_page_named_like_a_special_is_rejected():
    with pytest.raises(ValueError, match="special"):
        PageTokenizer.from_counts({"<bos>": 3, "a": 1})
