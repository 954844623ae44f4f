"""
Page-level tokenizer: every page (URL path, app, behavior, item) is ONE token.

This is HeTLM's tokenizer ("the language of browsing"): a user's log of page visits is a
sentence with no grammar, so there are no sub-words to learn; the vocabulary is the set of pages.
Ids are deterministic: the special tokens first, then pages by descending TRAINING frequency,
ties broken by the page string. Pages seen fewer than `min_count` times in training map to <unk>.
Saved as readable JSON (pages and their training counts), never pickled.

Used by:
    python data.py INPUT --out_dir=data/NAME     # fits it on the training regions, writes tokenizer.json
    python data.py --builtin                     # the same for the built-in simulated site
and loaded by train.py / evaluate.py / sample.py through data.load_data() or the checkpoint.
"""

import json

import numpy as np

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD, UNK, BOS, EOS = 0, 1, 2, 3
N_SPECIAL = len(SPECIALS)


def sort_pages(counter, min_count=1):
    """(kept pages in id order, their counts, count that falls to <unk>) for a {page: count} dict."""
    kept = [(-c, p) for p, c in counter.items() if c >= min_count]
    kept.sort()  # descending count, then page string: the same ids on every run and machine
    unk_count = sum(c for c in counter.values() if c < min_count)
    return [p for _, p in kept], [-c for c, _ in kept], unk_count


class PageTokenizer:
    """id <-> page string. State is real (a vocabulary and its counts), hence a class."""

    def __init__(self, pages, counts, min_count=1):
        self.pages = list(pages)                          # id -> page string, specials included
        self.counts = np.asarray(counts, dtype=np.int64)  # training count per id
        self.min_count = int(min_count)
        assert self.pages[:N_SPECIAL] == SPECIALS, "the first ids must be the special tokens"
        assert len(self.counts) == len(self.pages)
        self.index = {p: i for i, p in enumerate(self.pages)}
        if len(self.index) != len(self.pages):
            raise ValueError("duplicate page strings in the vocabulary")

    @classmethod
    def from_counts(cls, counter, min_count=1):
        """Fit from {page: training count}. Pages with count < min_count become <unk>."""
        clash = [p for p in counter if p in SPECIALS]
        if clash:
            raise ValueError(f"page names {clash} collide with the special tokens {SPECIALS}")
        pages, counts, unk_count = sort_pages(counter, min_count)
        return cls(SPECIALS + pages, [0, unk_count, 0, 0] + counts, min_count)

    @property
    def vocab_size(self):
        return len(self.pages)

    def page_id(self, page):
        return self.index.get(page, UNK)

    def encode(self, pages):
        """Iterable of page strings -> uint32 ids (unknown pages -> <unk>). uint32: > 65,535 pages work."""
        get = self.index.get
        return np.fromiter((get(p, UNK) for p in pages), dtype=np.uint32)

    def decode(self, ids):
        return [self.pages[int(i)] for i in ids]

    def save(self, path):
        from files import atomic_output   # whole or absent: a reader never sees half a vocabulary
        with atomic_output(path) as f:
            json.dump({"pages": self.pages, "counts": self.counts.tolist(),
                       "min_count": self.min_count}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return cls(d["pages"], d["counts"], d.get("min_count", 1))

    def __len__(self):
        return len(self.pages)

    def __repr__(self):
        return f"PageTokenizer({self.vocab_size - N_SPECIAL} pages + {N_SPECIAL} specials, min_count={self.min_count})"
