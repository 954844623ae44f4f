"""
Behavior logs -> token streams on disk, the held-out split, and training batches.

HeTLM reads a user's page visits as a sentence: each session becomes `<bos> p1 p2 ... pn <eos>`
and a user's stream is their sessions in time order. BehaviorLM splits pages into frequent
*anchor* behaviors and the long *tail*; the anchor set is computed here and stored in meta.json.

    python data.py --builtin                                   # simulated site -> data/builtin
    python data.py msnbc990928.seq.gz --out_dir=data/msnbc     # UCI MSNBC (.seq with % header)
    python data.py BMS.dat.gz --out_dir=data/bms               # BMS-WebView-1 (`session page` pairs)
    python data.py log.csv --out_dir=data/mysite --time_col=time --session_gap=1800
    python data.py log.csv --out_dir=data/mysite_s --time_col=time --split=session  # HeTLM's session task
    python data.py ml-1m.inter --out_dir=data/ml1m             # RecBole atomic file
    python data.py ml-1m/ratings.dat --out_dir=data/ml1m       # MovieLens ratings.dat

Input formats: logs.py (events, seq, pairs, inter, ratings, and how `auto` tells them apart).

A prepared folder: tokens.bin (uint32 stream of every user), offsets.npy (user u's stream is
tokens[offsets[u]:offsets[u+1]]), val_pos.npy / test_pos.npy (absolute index of each user's
validation / test target, -1 for users with < 3 pages; with --split=session the first page of the
held-out session, -1 for users with < 3 sessions; a user's training data ends before val_pos),
users.txt, tokenizer.json, meta.json. The folder is built whole in a temporary folder beside it
(NAME.tmpPID) and swapped in by renames only when complete, so a failure of any kind (bad line,
full disk, kill) leaves the previous dataset as it was. Files derived from the old dataset
(DERIVED: segments.npy, clusters.npy, ...) never survive a new prepare; other files there (an
input log, notes) are kept. load_data checks every file against meta.json before use.

Sessions from time (event logs with time_col; default 1800 s, inf for rating logs: inter and
ratings files, event logs with a `rating` column, and logs whose 30-minute sessions would mostly
hold a single event: default_session_gap): a gap > session_gap seconds starts a session;
--session_gap=0 or inf turns time-based sessions off (a user's history is then one session, cut
only by session_col). Rating logs (MovieLens: hours or days between ratings) cut at the default
30 minutes are mostly one-event sessions, each costing a <bos> and an <eos> token; the summary
prints the events per session and names the setting when most sessions hold one event.

The command line refuses a log that leaves nothing to learn or score: no page left after
min_count, or no user with the 3 events (--split=session: 3 sessions) the split needs.
"""

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from configurator import ConfigError, DataError, Progress, one_line
from files import building, leftovers, write_atomic
from logs import FORMATS, read_log
from tokenizer import BOS, EOS, N_SPECIAL, PAD, UNK, PageTokenizer


# -----------------------------------------------------------------------------
# prepare: sessions, the held-out split, tokenizer on the training part, anchors, atomic write

ANCHOR_MIN_HELD, ANCHOR_FALLBACK_MASS = 0.1, 0.5   # see anchor_split


def anchor_split(counts, anchor_share=0.01, anchor_mass=0.0, min_held=ANCHOR_MIN_HELD,
                 fallback_mass=ANCHOR_FALLBACK_MASS):
    """BehaviorLM's anchor set from per-token training-target counts (V,).

    share rule (default): pages whose share of training page-targets exceeds anchor_share.
    mass rule (anchor_mass > 0): the smallest set of most frequent pages holding >= anchor_mass.
    fallback: with thousands of pages few or no pages pass 1% (UCI Online Retail: none of 3,661),
    which leaves no anchors; when the share rule's anchors hold less than `min_held` of the
    targets, the mass rule at `fallback_mass` is used instead (rule 'mass (fallback)'), so the
    anchor set is empty only for a log with no page targets at all.
    Special tokens are never anchors and are not in the total. Returns (ids, rule, share held)."""
    counts = np.asarray(counts, dtype=np.int64).copy()
    counts[:N_SPECIAL] = 0
    total = counts.sum()
    if total == 0:
        return np.zeros(0, dtype=np.int64), ("mass" if anchor_mass > 0 else "share"), 0.0
    rule, mass = ("mass", anchor_mass) if anchor_mass > 0 else ("share", 0.0)
    if rule == "share":
        ids = np.flatnonzero(counts > anchor_share * total)
        if counts[ids].sum() < min_held * total:
            rule, mass = "mass (fallback)", fallback_mass
    if mass > 0:
        order = np.argsort(-counts, kind="stable")  # most frequent first, ties by id
        k = int(np.searchsorted(np.cumsum(counts[order]), mass * total - 1e-9)) + 1
        ids = np.sort(order[:min(k, int((counts > 0).sum()))])
    return ids.astype(np.int64), rule, float(counts[ids].sum() / total)


def describe_anchors(a):
    """One line on meta['anchor']: which rule won, how many anchors, their share of targets."""
    if a["rule"] == "share":
        rule = f"share > {a['anchor_share']}"
    elif a["rule"] == "mass":
        rule = f"top pages holding >= {a['anchor_mass']:.0%}"
    else:  # no page passed the share rule with enough mass
        rule = (f"fallback: pages over {a['anchor_share']} held under {a['min_held']:.0%} of targets, "
                f"so the top pages holding >= {a['fallback_mass']:.0%}")
    return (f"anchors ({rule}): {a['n_anchors']:,} of {a.get('n_pages', 0):,} pages holding {a['share']:.1%} "
            f"of training targets; tail: the other pages")


def sort_events(ev):
    """Group events by user (stably; by time when there is time)."""
    user, t = ev["user"], ev["time"]
    if t is not None:
        order = np.lexsort((t, user))  # stable: equal times keep file order
    elif len(user) > 1 and np.any(user[1:] < user[:-1]):
        order = np.argsort(user, kind="stable")
    else:
        return ev
    return {**ev, **{k: ev[k][order] for k in ("user", "page", "time", "session", "line_start") if ev[k] is not None}}


def session_starts(ev, session_gap):
    """(n,) bool: where a session starts in events grouped by sort_events."""
    user, t = ev["user"], ev["time"]
    start = np.ones(len(user), dtype=bool)
    start[1:] = user[1:] != user[:-1]
    if ev["line_start"] is not None:
        start |= ev["line_start"]
    if t is not None and 0 < session_gap < math.inf:  # 0 or inf: no time-based sessions
        start[1:] |= np.diff(t) > session_gap
    if ev["session"] is not None:
        start[1:] |= ev["session"][1:] != ev["session"][:-1]
    return start


SINGLE_EVENT_SESSIONS = 0.5   # above this share of one-event 30-minute sessions, a log is one session per user


def default_session_gap(ev, fmt, split):
    """(session_gap, why) when --session_gap is not given. Rating logs (inter, ratings, a `rating`
    column): one session per user, ordered by time (SASRec's ML-1M). Otherwise 30 minutes, as web
    sessions, unless most 30-minute sessions would hold a single event (purchases, sparse app
    launches): those carry no order inside a session and cost a <bos> and an <eos> per event, so
    the history is one session. Measured on Online Retail cut to one item per invoice (93% single-
    event sessions): validation NDCG@10 0.0308 / 0.0283 with 30-minute sessions, 0.0505 / 0.0465
    as one session (two seeds; docs/recipe.md). --split=session keeps 30 minutes (it needs
    sessions). ev: grouped by sort_events."""
    if fmt in ("inter", "ratings") or (ev.get("rating_col") and ev["time"] is not None):
        what = f"{fmt} file" if fmt != "events" else f"column {ev['rating_col']!r}"
        return math.inf, f"a rating log ({what}): one session per user, in time order"
    if ev["time"] is not None and ev["session"] is None and split == "page":
        start = session_starts(ev, 1800.0)
        single = float(np.mean(np.diff(np.r_[np.flatnonzero(start), len(start)]) == 1))
        if single > SINGLE_EVENT_SESSIONS:
            return math.inf, (f"{single:.0%} of 30-minute sessions would hold a single event: one session per "
                              "user, in time order")
    return 1800.0, "30 minutes, as web sessions"



DERIVED = ("meta.json", "tokens.bin", "offsets.npy", "val_pos.npy", "test_pos.npy", "users.txt", "tokenizer.json",
           "segments.npy", "clusters.npy", "clusters.json")  # computed from a dataset: never carried to a new one


SPLITS = {  # how a user's held-out targets are chosen; users without enough are training-only
    "page": "leave-last-out: the last page is the test target, the one before the validation target",
    "session": "leave-last-session-out: the last session is the test session, the one before the validation "
               "session, all earlier sessions the context and training data (HeTLM's task; sessions.py)",
}


def check_settings(session_gap=None, min_count=1, anchor_share=0.01, anchor_mass=0.0, split="page"):
    """One-line DataError for a preparation setting out of its range."""
    if split not in SPLITS:
        raise DataError(f"--split={split}: expected one of {', '.join(SPLITS)}")
    if session_gap is not None and not session_gap >= 0:  # nan too
        raise DataError(f"--session_gap={session_gap}: must be >= 0 seconds (0 or inf: no time-based sessions)")
    if min_count < 1:
        raise DataError(f"--min_count={min_count}: must be >= 1")
    if not 0 <= anchor_share < 1:
        raise DataError(f"--anchor_share={anchor_share}: must be in [0, 1)")
    if not 0 <= anchor_mass <= 1:
        raise DataError(f"--anchor_mass={anchor_mass}: must be in [0, 1] (0: use --anchor_share)")


def prepare(input_path, data_dir, fmt="auto", user_col="user", page_col="page", time_col=None, session_col=None,
            sep=None, session_gap=None, min_count=1, anchor_share=0.01, anchor_mass=0.0, require_eval=False,
            split="page"):
    """Read a behavior log, split it (SPLITS), tokenize, and write a dataset folder, atomically
    (see building). require_eval (the command line sets it): refuse a log where no user has the 3
    events (3 sessions) a validation and a test target need. Returns meta."""
    check_settings(session_gap, min_count, anchor_share, anchor_mass, split)
    with building(data_dir, DERIVED) as folder:
        return build_dataset(input_path, folder, fmt, user_col, page_col, time_col, session_col, sep, session_gap,
                             min_count, anchor_share, anchor_mass, require_eval, split=split)


def split_events(ev, start, split, require_eval, input_path):
    """The split (SPLITS): val_ev / test_ev = index of each user's first held-out event of each kind;
    everything from val_ev on is held out. Users with < 3 pages (sessions) are training only.
    Returns (evaluable, val_ev, test_ev, last, n_ev, train) over users (train: over events)."""
    user = ev["user"]
    n, n_users = len(user), len(ev["users"])
    n_ev = np.bincount(user, minlength=n_users)                  # (U,) events per user
    last = np.cumsum(n_ev) - 1                                   # (U,) index of each user's last event
    if split == "page":
        evaluable, test_ev, val_ev = n_ev >= 3, last, last - 1
        unit, most = "events", n_ev.max()
    else:
        firsts = np.flatnonzero(start)                           # (S,) first event of every session
        n_ss = np.bincount(user[firsts], minlength=n_users)      # (U,) sessions per user (>= 1)
        last_s = np.cumsum(n_ss) - 1                             # (U,) each user's last session
        evaluable, test_ev, val_ev = n_ss >= 3, firsts[last_s], firsts[np.maximum(last_s - 1, 0)]
        unit, most = "sessions", n_ss.max()
    if require_eval and not evaluable.any():
        hint = ("is --user_col the user, not the event?" if split == "page" else
                "the session split needs users with several sessions (--time_col with --session_gap, "
                "--session_col, or seq lines with a `user:` prefix)")
        raise DataError(f"{input_path}: no user has 3 or more {unit} (the most: {most}), so there is no "
                        f"validation or test target (--split={split}); {hint}")
    train = np.arange(n) < np.where(evaluable, val_ev, last + 1)[user]
    return evaluable, val_ev, test_ev, last, n_ev, train


def lay_out(start, page_tokens, last, n_ev, evaluable, val_ev, test_ev):
    """The token stream: each session is <bos> p1 .. pn <eos>, so event i sits at i + 2*session(i) + 1.
    Returns (tokens, offsets (U+1,) of each user's first token, val_pos / test_pos (U,) the token of
    each user's first validation / test target (-1: none), events per session)."""
    n = len(page_tokens)
    sess = np.cumsum(start) - 1                                  # (N,) global session index
    pos = np.arange(n, dtype=np.int64) + 2 * sess + 1            # (N,) absolute token index of each event
    n_sessions = int(sess[-1]) + 1
    tokens = np.empty(n + 2 * n_sessions, dtype=np.uint32)
    tokens[pos] = page_tokens
    firsts = np.flatnonzero(start)
    tokens[pos[firsts] - 1] = BOS
    tokens[pos[np.append(firsts[1:] - 1, n - 1)] + 1] = EOS
    offsets = np.append(pos[last - n_ev + 1] - 1, len(tokens)).astype(np.int64)  # (U+1,)
    val_pos = np.where(evaluable, pos[np.maximum(val_ev, 0)], -1).astype(np.int64)
    test_pos = np.where(evaluable, pos[test_ev], -1).astype(np.int64)
    per_session = np.bincount(sess)                              # (S,) events per session
    return tokens, offsets, val_pos, test_pos, per_session


def build_dataset(input_path, folder, fmt="auto", user_col="user", page_col="page", time_col=None, session_col=None,
                  sep=None, session_gap=None, min_count=1, anchor_share=0.01, anchor_mass=0.0, require_eval=False,
                  source=None, split="page"):
    """prepare's work, written into `folder` (a fresh folder from building). Returns meta."""
    settings = dict(fmt=fmt, user_col=user_col, page_col=page_col, time_col=time_col, session_col=session_col,
                    sep=sep, session_gap=session_gap, min_count=min_count, anchor_share=anchor_share,
                    anchor_mass=anchor_mass, split=split)
    t0 = time.time()
    fmt, ev = read_log(input_path, fmt, user_col, page_col, time_col, session_col, sep)
    settings.update(ev.get("columns", {}))           # the columns read (some found by name)
    ev, session_rule = sort_events(ev), "as set"
    if session_gap is None:
        session_gap, session_rule = default_session_gap(ev, fmt, split)
    settings.update(fmt=fmt, session_gap=session_gap)
    start = session_starts(ev, session_gap)
    page = ev["page"]
    n, n_users = len(page), len(ev["users"])

    evaluable, val_ev, test_ev, last, n_ev, train = split_events(ev, start, split, require_eval, input_path)

    # vocabulary and frequencies from the training part only; unseen val/test pages -> <unk>
    raw_counts = np.bincount(page[train], minlength=len(ev["pages"]))
    counter = {ev["pages"][i]: int(raw_counts[i]) for i in np.flatnonzero(raw_counts)}
    try:
        tok = PageTokenizer.from_counts(counter, min_count)
    except ValueError as e:  # a page literally named <pad>/<unk>/<bos>/<eos>
        raise DataError(f"{input_path}: {e}; rename those pages") from None
    if tok.vocab_size == N_SPECIAL:
        raise DataError(f"{input_path}: no page is left in the vocabulary: --min_count={min_count} but the most "
                        f"frequent page is seen {max(counter.values(), default=0)} times in training")
    lookup = tok.encode(ev["pages"])                             # raw page id -> token id (uint32)

    tokens, offsets, val_pos, test_pos, per_session = lay_out(start, lookup[page], last, n_ev, evaluable, val_ev,
                                                              test_ev)
    n_sessions = len(per_session)

    anchor_ids, rule, held = anchor_split(tok.counts, anchor_share, anchor_mass)
    n_eval = int(evaluable.sum())
    meta = {"source": source or input_path, "format": fmt, "split": split, "n_users": n_users, "n_eval_users": n_eval,
            "n_events": n, "n_sessions": n_sessions, "n_tokens": len(tokens), "n_train_targets": int(train.sum()),
            "session_events_median": float(np.median(per_session)),
            "single_event_sessions": float((per_session == 1).mean()),
            "session_rule": session_rule if ev["time"] is not None else "no times",
            "columns_found": [list(f) for f in ev.get("found", [])],
            "vocab_size": tok.vocab_size, "n_pages": tok.vocab_size - N_SPECIAL,
            "n_pages_in_input": len(ev["pages"]),
            "val_unk_rate": float((tokens[val_pos[evaluable]] == UNK).mean()) if n_eval else 0.0,
            "test_unk_rate": float((tokens[test_pos[evaluable]] == UNK).mean()) if n_eval else 0.0,
            "anchor": {"rule": rule, "anchor_share": anchor_share, "anchor_mass": anchor_mass,
                       "min_held": ANCHOR_MIN_HELD, "fallback_mass": ANCHOR_FALLBACK_MASS, "n_pages": tok.vocab_size - N_SPECIAL,
                       "ids": anchor_ids.tolist(), "n_anchors": len(anchor_ids), "share": held},
            "settings": settings, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    files = [("tokens.bin", tokens), ("offsets.npy", offsets), ("val_pos.npy", val_pos),
             ("test_pos.npy", test_pos), ("users.txt", ev["users"]), ("tokenizer.json", tok)]
    for name, obj in Progress(files, desc="writing", leave=False):
        write_atomic(os.path.join(folder, name), obj)
    meta["seconds"] = round(time.time() - t0, 2)
    write_atomic(os.path.join(folder, "meta.json"), meta)
    return meta


# -----------------------------------------------------------------------------
# loading, training windows, batches, evaluation examples

class BehaviorData:
    """A prepared dataset folder, memory-mapped, every file checked against meta.json on load (one
    DataError naming the file otherwise). State is real (files, lazy user ids), hence a class."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        path = lambda name: os.path.join(data_dir, name)
        if not os.path.isfile(path("meta.json")):
            from files import marked_by
            swapped = [p for p, kind, pid in leftovers(data_dir) if kind == ".old" and marked_by(p) == pid]
            if swapped and not os.path.exists(data_dir):   # a prepare killed between its two renames
                raise DataError(f"{data_dir}: missing; a prepare killed while swapping it left the dataset in "
                                f"{swapped[0]}: rename that back, or prepare again (data.py puts it back)")
            raise DataError(f"{data_dir}: not a prepared dataset (no meta.json); "
                            f"run `python data.py INPUT --out_dir={data_dir}` or `python data.py --builtin`")
        self.meta = meta = read_json(path("meta.json"))
        for key in ("n_users", "n_tokens", "vocab_size"):
            if not isinstance(meta.get(key), int) or isinstance(meta[key], bool) or meta[key] < 0:
                raise DataError(f"{path('meta.json')}: {key} missing or not a count; prepare it again")
        n_users, n_tokens = meta["n_users"], meta["n_tokens"]
        try:
            self.tokenizer = PageTokenizer.load(path("tokenizer.json"))
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise DataError(f"{path('tokenizer.json')}: not a tokenizer ({one_line(e)}); prepare it again") from None
        self.vocab_size = self.tokenizer.vocab_size
        if self.vocab_size != meta["vocab_size"]:
            raise DataError(f"{path('tokenizer.json')}: {self.vocab_size} ids, meta.json says {meta['vocab_size']}")
        size = os.path.getsize(path("tokens.bin")) if os.path.isfile(path("tokens.bin")) else None
        if size != 4 * n_tokens or n_tokens == 0:
            raise DataError(f"{path('tokens.bin')}: " + ("missing" if size is None else f"{size:,} bytes") +
                            f", expected 4 x {n_tokens:,} tokens (meta.json); prepare it again")
        self.tokens = np.memmap(path("tokens.bin"), dtype=np.uint32, mode="r")     # (n_tokens,)
        self.offsets = load_array(path("offsets.npy"), n_users + 1)                # (U+1,)
        self.val_pos = load_array(path("val_pos.npy"), n_users)                    # (U,) -1: training only
        self.test_pos = load_array(path("test_pos.npy"), n_users)                  # (U,)
        self.n_users = n_users
        self.split = meta.get("split", "page")                                     # a key of SPLITS
        o = np.asarray(self.offsets)
        if o[0] != 0 or o[-1] != n_tokens or (np.diff(o) < 0).any():
            raise DataError(f"{path('offsets.npy')}: not increasing from 0 to n_tokens={n_tokens:,}; prepare it again")
        for name, pos, end in (("val_pos.npy", self.val_pos, self.test_pos), ("test_pos.npy", self.test_pos, o[1:])):
            pos = np.asarray(pos)  # -1, or a position inside the user's stream (a val target before the test one)
            if ((pos != -1) & ((pos <= o[:-1]) | (pos >= end))).any() or ((pos == -1) != (self.test_pos == -1)).any():
                raise DataError(f"{path(name)}: positions outside their users' streams; prepare it again")
        top = int(self.tokens.max())  # one vectorized pass (a few ms for 7M tokens): no id beyond the vocabulary
        if top >= self.vocab_size:
            raise DataError(f"{path('tokens.bin')}: token id {top:,} outside the vocabulary of {self.vocab_size:,}")
        try:
            self.anchor_ids = np.asarray(meta["anchor"]["ids"], dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path('meta.json')}: no anchor ids; prepare it again") from None
        if self.anchor_ids.ndim != 1 or ((self.anchor_ids < N_SPECIAL) | (self.anchor_ids >= self.vocab_size)).any():
            raise DataError(f"{path('meta.json')}: anchor ids outside the pages of the vocabulary")
        self.train_end = np.where(self.val_pos >= 0, self.val_pos, o[1:]).astype(np.int64)  # (U,)
        self.segments = load_array(path("segments.npy"), n_users, mmap=False) if os.path.isfile(path("segments.npy")) else None
        self._user_ids, self._user_index = None, None

    def user_ids(self):
        if self._user_ids is None:
            path = os.path.join(self.data_dir, "users.txt")
            try:
                with open(path, encoding="utf-8") as f:
                    self._user_ids = f.read().split("\n")[:self.n_users]
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: cannot read ({one_line(e)}); prepare it again") from None
            if len(self._user_ids) < self.n_users:
                raise DataError(f"{path}: {len(self._user_ids):,} users, meta.json says {self.n_users:,}")
        return self._user_ids

    def user_index(self, uid):
        if self._user_index is None:
            self._user_index = {u: i for i, u in enumerate(self.user_ids())}
        if uid not in self._user_index:
            raise KeyError(f"unknown user {uid!r} in {self.data_dir}")
        return self._user_index[uid]

    def __repr__(self):
        return (f"BehaviorData({self.data_dir}: {self.n_users} users, {len(self.tokens)} tokens, "
                f"{self.vocab_size} ids)")


def load_data(data_dir):
    """The one loader of a prepared folder (every script uses it): BehaviorData, checked."""
    return BehaviorData(data_dir)


def read_json(path):
    """A JSON object from path, or a DataError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not JSON ({one_line(e)}); prepare it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a JSON object; prepare it again")
    return obj


def load_array(path, n, mmap=True):
    """A 1-D integer .npy array of n entries (memory-mapped), or a DataError naming the file."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({one_line(e)}); prepare it again") from None
    if a.ndim != 1 or a.dtype.kind not in "iu" or len(a) != n:
        raise DataError(f"{path}: expected {n:,} integers, found shape {a.shape} of {a.dtype}; prepare it again")
    return a


def train_windows(data, block_size):
    """(n_windows, 2) int64 [start, end) token ranges, each inside ONE user's train region.

    A region of L tokens is cut into ceil((L-1)/block_size) windows of up to block_size+1 tokens;
    consecutive windows share their boundary token, so every target is predicted exactly once."""
    start, end = data.offsets[:-1].astype(np.int64), data.train_end
    n_win = np.maximum(end - start - 1 + block_size - 1, 0) // block_size   # (U,) 0 when L < 2
    first = np.repeat(start, n_win)                                        # (W,)
    k = np.arange(int(n_win.sum())) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window index in user
    s = first + k * block_size
    e = np.minimum(s + block_size + 1, np.repeat(end, n_win))
    return np.stack([s, e], axis=1)


def get_batch(data, windows, rows, last_only=False):
    """Gather windows[rows] -> x, y torch.int64 (B, T), T = longest window - 1, right-padded.

    x pads are <pad>; y is -1 at pads and where the target is <bos> or <pad> (trivially predictable).
    last_only: only each row's last position keeps its target (stage 2: one chosen sample per row,
    the rest of the window is its context)."""
    w = windows[np.asarray(rows)]
    n_in = w[:, 1] - w[:, 0] - 1                                  # (B,) input length of each row
    T = int(n_in.max())
    idx = w[:, :1] + np.arange(T + 1)                             # (B, T+1) absolute token indices
    valid = np.arange(T)[None, :] < n_in[:, None]                 # (B, T) real positions
    tok = data.tokens[np.minimum(idx, len(data.tokens) - 1)].astype(np.int64)
    x = np.where(valid, tok[:, :-1], PAD)
    y = np.where(valid, tok[:, 1:], -1)
    y[(y == BOS) | (y == PAD)] = -1
    if last_only:
        y[np.arange(T)[None, :] != (n_in - 1)[:, None]] = -1
    return torch.from_numpy(x), torch.from_numpy(y)



def epoch_batches(lengths, batch_tokens, epoch, seed, bucket=64, groups=None):
    """One epoch's micro-batches (arrays of window indices), a function of (seed, epoch) only.

    Behavior logs are mostly short histories with a long tail of long ones, so a fixed number of
    rows wastes most of the compute on padding or starves the optimizer. Instead windows are
    shuffled, sorted by length inside chunks of about `bucket` batches, and cut into batches of
    at most `batch_tokens` padded tokens (rows x longest row); then the batches are shuffled.
    groups (one int per window, e.g. its user's cluster): every batch holds one group only, so a
    clusterwise model runs each batch with one parameter set at the cost of a single model."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    n_in = lengths - 1                                  # input tokens of each window
    chunk = max(1, int(bucket * batch_tokens / max(1.0, float(n_in.mean()))))
    parts = [perm] if groups is None else [perm[groups[perm] == g] for g in np.unique(groups)]
    batches = []
    for c, part in ((c, p) for p in parts for c in range(0, len(p), chunk)):
        part = part[c:c + chunk]
        part = part[np.argsort(n_in[part], kind='stable')]   # ascending: a batch's last row is its longest
        L, i = n_in[part], 0
        while i < len(part):
            k = max(1, batch_tokens // int(L[i]))
            while k > 1 and k * int(L[min(i + k, len(part)) - 1]) > batch_tokens:
                k = max(1, batch_tokens // int(L[min(i + k, len(part)) - 1]))
            batches.append(part[i:i + k])
            i += k
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


class BatchSchedule:
    """Micro-batch number -> window indices of this process. A function of the step number alone,
    so a resumed run continues the data order where it stopped (no batch is seen twice).
    With W processes, micro-batch s of process r is batch s*W + r of the epoch's list."""

    def __init__(self, lengths, batch_tokens, rank, world_size, seed, groups=None):
        self.lengths, self.batch_tokens, self.seed, self.groups = lengths, batch_tokens, seed, groups
        self.rank, self.world = rank, world_size
        self.starts = [0]           # first micro-batch number of each epoch seen so far
        self._epoch, self._batches = None, None
        if len(lengths) == 0:
            raise DataError("no training windows: every user's training part is shorter than 2 tokens")

    def _load(self, epoch):
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.batch_tokens, epoch, self.seed, groups=self.groups)
        return self._batches

    def __call__(self, step):
        epoch = 0
        while True:
            if epoch + 1 == len(self.starts):   # learn where the next epoch starts
                n = len(self._load(epoch)) // self.world
                if n == 0:
                    raise ConfigError(f"one epoch holds fewer micro-batches than the {self.world} processes; "
                                      f"lower --batch_tokens (now {self.batch_tokens})")
                self.starts.append(self.starts[-1] + n)
            if step < self.starts[epoch + 1]:
                break
            epoch += 1
        j = step - self.starts[epoch]
        return self._load(epoch)[j * self.world + self.rank]


def pick_users(users, max_users, seed):
    """Indices of a fixed random subset of `users`, in order (all when max_users is 0 or None)."""
    if max_users and max_users < len(users):
        return np.sort(np.random.default_rng(seed).choice(len(users), size=max_users, replace=False))
    return np.arange(len(users))


def eval_examples(data, split, max_users=None, seed=0):
    """(users, ctx_start, ctx_end, targets) int64, one row per evaluable user; target = tokens[ctx_end].
    max_users > 0 keeps a fixed random subset (same seed -> same users, so periodic evaluations and
    the baselines' choices on validation are comparable)."""
    pos = {"val": data.val_pos, "test": data.test_pos}[split]
    users = np.flatnonzero(np.asarray(pos) >= 0).astype(np.int64)
    users = users[pick_users(users, max_users, seed)]
    ctx_end = np.asarray(pos[users], dtype=np.int64)
    return users, data.offsets[users].astype(np.int64), ctx_end, data.tokens[ctx_end].astype(np.int64)


BUILTIN_DIR = "data/builtin"    # the built-in dataset, generated on first use (shop.py)


def ensure_builtin(data_dir=BUILTIN_DIR):
    """The built-in dataset at data_dir, generated on first use. A dataset prepared there from
    another log (no segments.npy) is the user's: used as it is, never replaced."""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        print(f"building the built-in dataset into {data_dir} ...")
        from shop import make_builtin
        print(summary(make_builtin(data_dir)))
    elif not os.path.isfile(os.path.join(data_dir, "segments.npy")):
        source = read_json(os.path.join(data_dir, "meta.json")).get("source")
        print(f"note: {data_dir} holds a dataset prepared from {source}, not the built-in shop: using it as it is "
              f"(python data.py --builtin --out_dir=data/shop makes the shop elsewhere)")
    return load_data(data_dir)


def summary(meta):
    split = meta.get("split", "page")
    text = (f"{meta['source']} ({meta['format']}) -> {meta['n_users']:,} users ({meta['n_eval_users']:,} with val/test"
            f"{' sessions' if split == 'session' else ''}), "
            f"{meta['n_events']:,} events in {meta['n_sessions']:,} sessions, {meta['n_tokens']:,} tokens\n")
    if meta.get("columns_found"):
        show = lambda role, name: {"time unit": f"times in {name}", "note": name}.get(role, f"{role} {name!r}")
        text += ("found by name: " + ", ".join(show(role, name) for role, name in meta["columns_found"])
                 + " (--user_col/--page_col/--time_col/--session_col choose others; --time_col= reads no times)\n")
    if "single_event_sessions" in meta:
        text += (f"sessions: median {meta['session_events_median']:g} events, "
                 f"{meta['single_event_sessions']:.0%} hold a single event\n")
        gap = meta["settings"].get("session_gap", 0)
        if meta.get("session_rule", "as set") not in ("as set", "no times"):
            cut = "--session_gap=1800 cuts it at 30-minute gaps" if gap == math.inf else "--session_gap=SECONDS to change"
            text += f"session_gap {gap:g} s: {meta['session_rule']} ({cut})\n"
        if meta["settings"].get("time_col") and 0 < gap < math.inf and meta["single_event_sessions"] > SINGLE_EVENT_SESSIONS:
            text += (f"note: most sessions hold one event (each costs a <bos> and an <eos> token): the gaps between "
                     f"a user's events mostly exceed --session_gap={gap:g} s (a rating log?); --session_gap=inf "
                     f"makes each user's history one session, or set a longer gap\n")
    return text + (f"pages: {meta['n_pages']:,} in the training vocabulary (of {meta['n_pages_in_input']:,} in the input); "
                   f"unk rate val {meta['val_unk_rate']:.4f} test {meta['test_unk_rate']:.4f}\n"
                   f"{describe_anchors(meta['anchor'])}; prepared in {meta['seconds']:.1f} s")


def main(argv=None):
    from shop import N_ITEMS, make_builtin   # the simulated shop (--builtin)
    p = argparse.ArgumentParser(description="Prepare a behavior log for nanoBehavior (see the module docstring).")
    p.add_argument("input", nargs="?", help="event log, sequence file or pair file (.gz fine)")
    p.add_argument("--out_dir", help="dataset folder to write, e.g. data/msnbc")
    p.add_argument("--builtin", action="store_true", help="build the simulated shop into data/builtin (or --out_dir)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--user_col", default="user")
    p.add_argument("--page_col", default="page")
    p.add_argument("--time_col", default=None)
    p.add_argument("--session_col", default=None)
    p.add_argument("--sep", default=None, help="event-log separator: ',' '\\t' or 'jsonl' (default: by extension)")
    p.add_argument("--session_gap", type=float, default=None,
                   help="with time: seconds of inactivity that start a session (default 1800 for event logs, "
                        "inf for .inter and ratings.dat); 0 or inf: no time-based sessions")
    p.add_argument("--split", default="page", choices=list(SPLITS),
                   help="page: the last two pages of each user are held out; session: the last two sessions")
    p.add_argument("--min_count", type=int, default=1, help="rarer training pages map to <unk>")
    p.add_argument("--anchor_share", type=float, default=0.01, help="anchors: pages over this share of targets")
    p.add_argument("--anchor_mass", type=float, default=0.0, help="anchors: the top pages holding this share, in (0, 1]")
    p.add_argument("--seed", type=int, default=1337, help="built-in dataset only")
    p.add_argument("--n_users", type=int, default=5000, help="built-in dataset only: simulated users")
    p.add_argument("--n_items", type=int, default=N_ITEMS, help="built-in dataset only: items per category (8 categories)")
    p.add_argument("--session_scale", type=float, default=1.0, help="built-in dataset only: x mean sessions per user")
    p.add_argument("--repeat", type=float, default=0.0,
                   help="built-in dataset only: probability in [0, 1] that the next event revisits one of the user's "
                        "earlier pages (recent ones most), for a repeat-heavy log; 0: the built-in shop")
    args = p.parse_args(argv)
    if args.builtin == bool(args.input):
        p.error("give an INPUT file or --builtin (one of them)")
    if not args.builtin and not args.out_dir:
        p.error("--out_dir is required with an INPUT file")
    try:
        if args.builtin:
            if args.n_users < 1 or args.n_items < 4 or not args.session_scale > 0 or not 0 <= args.repeat <= 1:
                raise DataError("--n_users >= 1, --n_items >= 4, --session_scale > 0 and 0 <= --repeat <= 1 are needed")
            meta = make_builtin(args.out_dir or "data/builtin", args.seed, args.n_users, args.n_items, args.session_scale,
                                args.split, args.repeat)
        else:
            sep = {"\\t": "\t", "tab": "\t"}.get(args.sep, args.sep)
            meta = prepare(args.input, args.out_dir, args.format, args.user_col, args.page_col, args.time_col,
                           args.session_col, sep, args.session_gap, args.min_count, args.anchor_share, args.anchor_mass,
                           require_eval=True, split=args.split)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the previous dataset (if any) is unchanged", file=sys.stderr)
        sys.exit(130)
    print(summary(meta))


if __name__ == "__main__":
    main()
