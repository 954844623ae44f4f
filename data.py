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

Input formats (gzip is detected by its magic bytes, whatever the file name; UTF-8 text, a byte-order
mark is skipped; a NUL byte, a non-UTF-8 line or a cut gzip stops with file:line):
- events: .csv/.tsv/.jsonl with a header (jsonl: one object per line); columns user_col, page_col,
  optional time_col (epoch seconds or ISO-8601; naive times are UTC; epoch milliseconds are
  recognised) and session_col. Columns left at their defaults and missing are looked up by their
  usual names (COLUMN_NAMES: user_id, item_id, timestamp, session_id, ...), time and session
  columns too unless --time_col= / --session_col= (empty) say none; a log with a session column
  and no user column makes each session a user; the summary names what it found. With time,
  a user's events are stably sorted by time and a gap > session_gap seconds starts a new session;
  a change of session id starts one too. With neither, a user's events are one session.
- seq: one sequence (= one session) per line, whitespace-separated pages. A first token ending in
  ':' is the user id (`u42: a b c`; lines with the same id are one user's sessions); otherwise the
  user id is the line number. UCI MSNBC layout: a file opening with '%' lines has a header up to
  the line '% Sequences:'; a word line inside it names the pages, so page k is the k-th name.
- pairs: `user page` per line, in order (BMS-WebView-1); each user is one session.
- inter: a RecBole atomic .inter file, tab-separated with a typed header (`user_id:token
  item_id:token rating:float timestamp:float`); fields user_id, item_id, timestamp unless
  --user_col/--page_col/--time_col name others. A user's events are sorted by time, one session.
- ratings: MovieLens `user::item::rating::time` lines (ratings.dat); sorted by time, one session
  per user. (Both are rating logs: --session_gap=1800 would cut them by time, as event logs.)
- auto: by extension (.csv .tsv .jsonl .ndjson .json -> events, .seq -> seq, .inter -> inter,
  after stripping .gz), else by content: first line '%' -> seq, `a::b::c[::d]` -> ratings, tab-
  separated `name:type` fields -> inter, '{' -> events, a header holding user_col and page_col
  -> events, all but one (or 90%) of the first 1000 lines with exactly two fields -> pairs (a
  malformed line is then reported, not read as a sequence), else seq.

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
import csv
import gzip
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from array import array
from bisect import bisect
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import torch

from configurator import Progress
from files import MARKER as MARKER_NAME
from tokenizer import BOS, EOS, N_SPECIAL, PAD, UNK, PageTokenizer


class DataError(ValueError):
    """Bad input or a missing dataset; the message is one line naming the file (and line)."""


# -----------------------------------------------------------------------------
# reading: every reader maps user and page strings to raw integer ids as it goes (one dict each)

def lines(path, newline=None):
    """Yield (line number, line) of a plain or gzip text file (gzip by magic bytes), with a progress bar.
    A UTF-8 byte-order mark is dropped; a NUL byte, non-UTF-8 bytes or a cut gzip stop with file:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file" + (" (a folder)" if os.path.isdir(path) else ""))
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if gz else raw, encoding="utf-8-sig", newline=newline)
        bar = Progress(total=os.fstat(raw.fileno()).st_size, unit="B", unit_scale=True, leave=False,
                       desc=f"reading {os.path.basename(path)}")  # compressed bytes
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if lineno & 0xFFFF == 0:
                    bar.update(raw.tell() - bar.n)
                if "\0" in line:
                    raise DataError(f"{path}:{lineno}: NUL byte in the line (a binary or UTF-16 file?)")
                yield lineno, line
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{first_non_utf8_line(path, gz)}: not UTF-8 text ({e.reason}); "
                            "save the file as UTF-8") from None
        except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
            what = "gzip data cut short or corrupt" if gz else "cannot read"
            raise DataError(f"{path}:{lineno + 1}: {what} ({e})") from None
        finally:
            bar.close()


def first_non_utf8_line(path, gz):
    """The number of the first line that is not UTF-8 (the decoder reads ahead in chunks, so the
    error it raises does not say which line); only called on the error path."""
    with (gzip.open if gz else open)(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return "?"


def parse_time(value):
    """Epoch seconds (number or numeric string) or ISO-8601 string -> float seconds; ValueError if bad."""
    try:
        t = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        dt = datetime.fromisoformat(str(value).strip())
        t = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()  # naive times are UTC
    if not math.isfinite(t):
        raise ValueError(value)
    return t


def detect_format(path, user_col="user", page_col="page"):
    """'events' | 'seq' | 'pairs' by the rule in the module docstring."""
    name = os.path.basename(path).lower().removesuffix(".gz")
    ext = os.path.splitext(name)[1]
    if ext in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        return "events"
    if ext == ".seq":
        return "seq"
    if ext == ".inter":
        return "inter"
    it = lines(path)
    first = [ln.strip() for _, ln in itertools.islice((x for x in it if x[1].strip()), 1000)]
    it.close()
    if not first:
        raise DataError(f"{path}: empty file (no events)")
    if first[0].startswith("%"):
        return "seq"
    if "::" in first[0] and len(first[0].split("::")) in (3, 4):
        return "ratings"
    fields = first[0].split("\t")
    if len(fields) >= 2 and all(f.count(":") == 1 and f.split(":")[1] for f in fields):
        return "inter"                                 # a RecBole typed header, `name:type` in every field
    if first[0].startswith("{"):
        return "events"
    for s in ",\t":   # a header that names a user and a page column (as given, or by COLUMN_NAMES)
        header = [c.strip() for c in first[0].split(s)]
        u, p, _, _, _ = pick_columns(header, user_col, page_col, "", "")
        if {u, p} <= set(header):
            return "events"
    # pairs when all but one line (or 90%) have two fields, so one malformed line is reported by
    # read_pairs, not taken as a sign of a sequence file (which would silently make users into pages)
    n_pairs = sum(len(ln.split()) == 2 for ln in first)
    pairs = n_pairs > 0 and n_pairs >= min(len(first) - 1, 0.9 * len(first))
    if pairs or first[0].split()[0].endswith(":"):
        return "pairs" if pairs else "seq"
    if n_pairs >= 0.5 * len(first):   # mostly `user page` lines: a pairs file with bad lines, or sequences?
        bad = next(i for i, ln in enumerate(first) if len(ln.split()) != 2)
        raise DataError(f"{path}: {n_pairs} of the first {len(first)} lines have two fields, as `user page` pairs, but "
                        f"others do not (the {bad + 1}th non-blank line has {len(first[bad].split())}): pass "
                        "--format=pairs (bad lines are then reported) or --format=seq (one session per line)")
    return "seq"


def read_seq(path):
    """One sequence (= session) per line; optional `id:` first token; MSNBC '%' header with page names."""
    uid, pid, users, pages, n_pages = {}, {}, array("q"), array("q"), array("q")  # users per LINE here
    names, in_header = [], None
    for lineno, line in lines(path):
        if in_header is None:
            in_header = line.startswith("%")  # the UCI MSNBC layout opens with '% ...'
        if in_header:  # ... and its header ends at '% Sequences:'
            if line.startswith("%"):
                in_header = "sequences" not in line.lower()
            else:
                names += line.split()  # "frontpage news tech ..." names pages 1, 2, 3, ...
            continue
        toks = line.split()
        if not toks or toks[0].startswith("%"):
            continue  # blank lines and '%' comments
        user = str(lineno)
        if toks[0].endswith(":"):
            user, toks = toks[0][:-1], toks[1:]
            if not user or not toks:
                raise DataError(f"{path}:{lineno}: malformed line (expected `id: page page ...`)")
        users.append(uid.setdefault(user, len(uid)))
        pages.extend([pid.setdefault(t, len(pid)) for t in toks])
        n_pages.append(len(toks))
    if in_header:
        raise DataError(f"{path}: '%' header without a '% Sequences:' line")
    n_pages = np.frombuffer(n_pages, dtype=np.int64)
    ev = events(path, "seq", uid, pid, np.repeat(np.frombuffer(users, dtype=np.int64), n_pages), pages)
    ev["line_start"] = np.zeros(len(ev["page"]), dtype=bool)
    ev["line_start"][np.cumsum(n_pages) - n_pages] = True  # each line is a session
    if names:  # MSNBC: category numbers 1..17 -> their names
        ev["pages"] = [names[int(p) - 1] if p.isdigit() and 1 <= int(p) <= len(names) else p for p in ev["pages"]]
    return ev


def read_pairs(path):
    """`user page` per line, in order; each user's events are one session."""
    uid, pid, users, pages = {}, {}, array("q"), array("q")
    for lineno, line in lines(path):
        toks = line.split()
        if len(toks) != 2:
            if not toks:
                continue
            raise DataError(f"{path}:{lineno}: malformed line (expected `user page`, got {len(toks)} fields; "
                            "--format=seq reads one session per line)")
        users.append(uid.setdefault(toks[0], len(uid)))
        pages.append(pid.setdefault(toks[1], len(pid)))
    return events(path, "pairs", uid, pid, users, pages)


def read_ratings(path):
    """MovieLens `user::item::rating::time` per line (ratings.dat); the time (epoch seconds) orders
    each user's events; rating is not used (every rated item is an event, as in SASRec's ML-1M)."""
    uid, pid, users, pages, times = {}, {}, array("q"), array("q"), array("d")
    for lineno, line in lines(path):
        if not line.strip():
            continue
        f = line.rstrip("\r\n").split("::")
        if len(f) not in (3, 4) or not f[0] or not f[1]:
            raise DataError(f"{path}:{lineno}: malformed line (expected `user::item::rating::time`, "
                            f"got {len(f)} fields)")
        users.append(uid.setdefault(f[0], len(uid)))
        pages.append(pid.setdefault(f[1], len(pid)))
        if len(f) == 4:
            try:
                times.append(parse_time(f[3]))
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: bad timestamp {f[3]!r} (expected epoch seconds)") from None
        elif times:
            raise DataError(f"{path}:{lineno}: no time field where earlier lines have one")
    return events(path, "ratings", uid, pid, users, pages,
                  time=np.frombuffer(times, dtype=np.float64) if len(times) else None)


INTER_FIELDS = ("user_id", "item_id", "timestamp")   # RecBole's default USER_ID / ITEM_ID / TIME fields


def read_inter(path, user_col="user", page_col="page", time_col=None):
    """RecBole atomic file (.inter): tab-separated, a typed header (`user_id:token  item_id:token
    rating:float  timestamp:float`). The user, item and time fields are RecBole's defaults unless
    --user_col / --page_col / --time_col name others; the time field is used when present."""
    it = lines(path, newline="")
    head_no, head = next((x for x in it if x[1].strip()), (0, ""))
    if not head:
        raise DataError(f"{path}: empty file (no events)")
    names = [c.strip().split(":")[0] for c in head.rstrip("\r\n").split("\t")]
    user = INTER_FIELDS[0] if user_col == "user" else user_col
    page = INTER_FIELDS[1] if page_col == "page" else page_col
    if time_col is None:                             # RecBole's timestamp when there is one; '' = none
        time_col = INTER_FIELDS[2] if INTER_FIELDS[2] in names else ""
    time_field = time_col or None
    cols = [c for c in (user, page, time_field) if c]
    rows = csv_rows(path, it, head_no, "\t".join(names), "\t", cols)
    uid, pid, users, pages, times = {}, {}, array("q"), array("q"), array("d")
    for lineno, row in rows:
        if not row[0] or not row[1]:
            raise DataError(f"{path}:{lineno}: malformed line (empty {user if not row[0] else page!r})")
        users.append(uid.setdefault(row[0], len(uid)))
        pages.append(pid.setdefault(row[1], len(pid)))
        if time_field:
            try:
                times.append(parse_time(row[2]))
            except (TypeError, ValueError):
                raise DataError(f"{path}:{lineno}: bad timestamp {row[2]!r} in field {time_field!r}") from None
    return events(path, "inter", uid, pid, users, pages,
                  time=np.frombuffer(times, dtype=np.float64) if time_field else None)


# Column names tried, case-insensitively and in this order, for a column of an event log left at its
# default (--user_col=user, --page_col=page, no --time_col/--session_col) that the header does not
# hold by that name: the usual exports (RecBole/MovieLens user_id item_id timestamp, RetailRocket
# visitorid itemid, shop customer_id product_id; a log of sessions without users, as YooChoose or
# Diginetica: each session is a user). The first found is used, and the summary names it.
SESSION_NAMES = ("session", "session_id", "sessionid", "visit_id", "visitid")
COLUMN_NAMES = {
    "user": ("user", "user_id", "userid", "uid", "visitor_id", "visitorid", "customer_id", "customerid",
             "client_id", "clientid", "member_id", "account_id") + SESSION_NAMES,
    "page": ("page", "item", "item_id", "itemid", "product_id", "productid", "product", "page_id", "url",
             "movie_id", "movieid", "app", "app_id", "action", "event"),
    "time": ("time", "timestamp", "ts", "datetime", "event_time", "time_stamp", "created_at", "date"),
    "session": SESSION_NAMES,
}


EPOCH_UNITS = (("nanoseconds", 1e9, 1e17), ("microseconds", 1e6, 1e14), ("milliseconds", 1e3, 1e11))


def pick_columns(header, user_col="user", page_col="page", time_col=None, session_col=None):
    """(user, page, time, session column, [(role, name) found by COLUMN_NAMES]) for an event log's
    header. A column named on the command line is used as given; time_col / session_col None take
    one found by name (none found: none), '' means none."""
    lower = {}
    for c in header:
        lower.setdefault(str(c).strip().lower(), c)
    found = []

    def pick(role, given):
        if given is not None and (role in ("time", "session") or given != role or given in header):
            return given or None
        taken = (user_col, page_col)
        name = next((lower[n] for n in COLUMN_NAMES[role] if n in lower and lower[n] not in taken), None)
        if name is not None:
            found.append((role, name))
            return name
        return given if role in ("user", "page") else None
    user_col, page_col = pick("user", user_col), pick("page", page_col)
    return user_col, page_col, pick("time", time_col), pick("session", session_col), found


def read_events(path, user_col="user", page_col="page", time_col=None, session_col=None, sep=None):
    """Event log with a header, .csv/.tsv (sep) or .jsonl; the time and session columns are optional
    (columns found by name: pick_columns). Epoch times in milliseconds are read as such."""
    uid, pid, users, pages, times, sid, sessions = {}, {}, array("q"), array("q"), array("d"), {}, array("q")
    name = os.path.basename(path).lower().removesuffix(".gz")
    it = lines(path, newline="")
    head_no, head = next((x for x in it if x[1].strip()), (0, ""))
    if not head:
        raise DataError(f"{path}: empty file (no events)")
    jsonl = sep == "jsonl" or (sep is None and (name.endswith((".jsonl", ".ndjson", ".json")) or head.lstrip().startswith("{")))
    if jsonl:   # the keys of the first 100 objects (an object may leave out an optional key)
        ahead = [(head_no, head)] + list(itertools.islice(it, 99))
        header = {}
        for _, line in ahead:
            try:
                obj = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                break            # json_rows reports the line
            header.update(dict.fromkeys(obj if isinstance(obj, dict) else ()))
        header = list(header)
    else:
        sep = sep or ("\t" if name.endswith(".tsv") or "\t" in head else ",")
        header = [c.strip() for c in next(csv.reader([head], delimiter=sep))]
    user_col, page_col, time_col, session_col, found = pick_columns(header, user_col, page_col, time_col, session_col)
    for role, col in (("user", user_col), ("page", page_col)):
        if not jsonl and col not in header:
            raise DataError(f"{path}:{head_no}: missing column {col!r} (header: {sep.join(header)}); name the {role} "
                            f"column with --{role}_col (names tried: {', '.join(COLUMN_NAMES[role][:6])}, ...)")
    cols = [c for c in (user_col, page_col, time_col, session_col) if c]
    if jsonl:   # columns found by name may be absent from a line: no time (not read), no session id
        optional = {name for role, name in found if role in ("time", "session")}
        rows = json_rows(path, itertools.chain(ahead, it), cols, time_col, optional)
    else:
        rows = csv_rows(path, it, head_no, head, sep, cols)
    guessed_time, bad_time = any(role == "time" for role, _ in found), None
    for lineno, row in rows:
        user, page = row[0], row[1]
        if not user or not page:
            raise DataError(f"{path}:{lineno}: malformed line (empty {user_col if not user else page_col!r})")
        users.append(uid.setdefault(user, len(uid)))
        pages.append(pid.setdefault(page, len(pid)))
        if time_col and bad_time is None:
            try:
                times.append(parse_time(row[2]))
            except (TypeError, ValueError):
                if not guessed_time:
                    raise DataError(f"{path}:{lineno}: bad timestamp {row[2]!r} in column {time_col!r} "
                                    "(expected epoch seconds or ISO-8601)") from None
                bad_time = (lineno, row[2])     # a column found by name that holds no times: not used
        if session_col:
            sessions.append(sid.setdefault(row[-1], len(sid)))
    if bad_time:
        found = [f for f in found if f[0] != "time"] + [
            ("note", f"column {time_col!r} not read as times (line {bad_time[0]}: {bad_time[1]!r}; "
                     "--time_col with epoch seconds or ISO-8601 values)")]
        time_col = None
    t = np.frombuffer(times, dtype=np.float64) if time_col else None
    unit = None                          # epoch seconds are ~1.7e9 today; 1e11 s would be the year 5138
    if t is not None and len(t):
        med = float(np.median(t))
        unit = next(((u, f) for u, f, lo in EPOCH_UNITS if med > lo), None)
    ev = events(path, "events", uid, pid, users, pages, time=t / unit[1] if unit else t,
                session=np.frombuffer(sessions, dtype=np.int64) if session_col else None)
    ev["columns"] = {"user_col": user_col, "page_col": page_col, "time_col": time_col, "session_col": session_col}
    ev["found"] = found + ([("time unit", unit[0])] if unit else [])
    ev["rating_col"] = next((c for c in header if str(c).strip().lower() in ("rating", "ratings")), None)
    return ev


def csv_rows(path, it, head_no, head, sep, cols):
    """Yield (line number, [values of cols]) of a csv/tsv body."""
    header = [c.strip() for c in next(csv.reader([head], delimiter=sep))]
    missing = [c for c in cols if c not in header]
    if missing:
        raise DataError(f"{path}:{head_no}: missing column {missing[0]!r} (header: {sep.join(header)})")
    idx = [header.index(c) for c in cols]
    reader = csv.reader((line for _, line in it), delimiter=sep)
    try:
        for row in reader:
            if len(row) != len(header):
                if not "".join(row).strip():
                    continue  # blank line
                raise DataError(f"{path}:{head_no + reader.line_num}: malformed line "
                                f"(expected {len(header)} fields, got {len(row)})")
            yield head_no + reader.line_num, [row[i] for i in idx]
    except csv.Error as e:
        raise DataError(f"{path}:{head_no + reader.line_num}: malformed line ({e})") from None


def json_rows(path, it, cols, time_col=None, optional=()):
    """Yield (line number, [values of cols]) of a jsonl file, user and page as strings; a column in
    `optional` missing from a line reads as None (time) or '' (others)."""
    for lineno, line in it:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed line (bad JSON: {e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: malformed line (expected a JSON object)")
        missing = [c for c in cols if c not in obj and c not in optional]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column {missing[0]!r}")
        obj = {c: obj.get(c) for c in cols}
        row = [obj[c] if c == time_col else "" if obj[c] is None else str(obj[c]) for c in cols]
        if any("\0" in v for v in row if isinstance(v, str)):  # an escaped \u0000
            raise DataError(f"{path}:{lineno}: NUL character in a value")
        yield lineno, row


def events(path, fmt, uid, pid, users, pages, time=None, session=None):
    """A reader's result: raw ids (int64 arrays) and the strings behind them."""
    if len(pages) == 0:
        raise DataError(f"{path}: empty file (no events)")
    return {"format": fmt, "users": list(uid), "pages": list(pid), "time": time, "session": session,
            "user": np.asarray(np.frombuffer(users, dtype=np.int64) if isinstance(users, array) else users),
            "page": np.frombuffer(pages, dtype=np.int64), "line_start": None}


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


def write_atomic(path, obj):
    """Write an array (.npy or raw .bin), a list of lines, a tokenizer or a dict (JSON), whole or not at all."""
    from files import atomic_output
    if isinstance(obj, PageTokenizer):
        obj.save(path)   # (its own tmp + os.replace)
        return
    with atomic_output(path, "wb") as f:   # complete or absent, even after a kill (files.py)
        if path.endswith(".bin"):
            obj.tofile(f)
        elif path.endswith(".npy"):
            np.save(f, obj)
        elif isinstance(obj, dict):
            f.write(json.dumps(obj, indent=1).encode())
        else:
            f.write(("\n".join(obj) + "\n").encode("utf-8"))


FORMATS = ("events", "seq", "pairs", "inter", "ratings")   # readers above; "auto" picks one (detect_format)

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
    with building(data_dir) as folder:
        return build_dataset(input_path, folder, fmt, user_col, page_col, time_col, session_col, sep, session_gap,
                             min_count, anchor_share, anchor_mass, require_eval, split=split)


def build_dataset(input_path, folder, fmt="auto", user_col="user", page_col="page", time_col=None, session_col=None,
                  sep=None, session_gap=None, min_count=1, anchor_share=0.01, anchor_mass=0.0, require_eval=False,
                  source=None, split="page"):
    """prepare's work, written into `folder` (a fresh folder from building). Returns meta."""
    settings = dict(fmt=fmt, user_col=user_col, page_col=page_col, time_col=time_col, session_col=session_col,
                    sep=sep, session_gap=session_gap, min_count=min_count, anchor_share=anchor_share,
                    anchor_mass=anchor_mass, split=split)
    t0 = time.time()
    fmt = detect_format(input_path, user_col, page_col) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    if (fmt != "events" and session_col) or (fmt not in ("events", "inter") and time_col):
        raise DataError(f"{input_path}: time_col/session_col apply to event logs only (time_col: also .inter), "
                        f"not to {fmt} files")
    if fmt == "events":
        ev = read_events(input_path, user_col, page_col, time_col, session_col, sep)
    elif fmt == "inter":
        ev = read_inter(input_path, user_col, page_col, time_col)
    else:
        ev = {"seq": read_seq, "pairs": read_pairs, "ratings": read_ratings}[fmt](input_path)
    if any("\n" in u or "\r" in u for u in ev["users"]):
        raise DataError(f"{input_path}: a user id contains a line break")
    settings.update(ev.get("columns", {}))           # the columns read (some found by name)
    ev, session_rule = sort_events(ev), "as set"
    if session_gap is None:
        session_gap, session_rule = default_session_gap(ev, fmt, split)
    settings.update(fmt=fmt, session_gap=session_gap)
    start = session_starts(ev, session_gap)
    user, page = ev["user"], ev["page"]
    n, n_users = len(page), len(ev["users"])

    # the split (SPLITS): val_ev / test_ev = index of each user's first held-out event of each kind;
    # everything from val_ev on is held out. Users with < 3 pages (sessions) are training only.
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

    # token layout: each session is <bos> p1 .. pn <eos>, so event i sits at i + 2*session(i) + 1
    sess = np.cumsum(start) - 1                                  # (N,) global session index
    pos = np.arange(n, dtype=np.int64) + 2 * sess + 1            # (N,) absolute token index of each event
    n_sessions = int(sess[-1]) + 1
    tokens = np.empty(n + 2 * n_sessions, dtype=np.uint32)
    tokens[pos] = lookup[page]
    firsts = np.flatnonzero(start)
    tokens[pos[firsts] - 1] = BOS
    tokens[pos[np.append(firsts[1:] - 1, n - 1)] + 1] = EOS
    offsets = np.append(pos[last - n_ev + 1] - 1, len(tokens)).astype(np.int64)  # (U+1,)
    val_pos = np.where(evaluable, pos[np.maximum(val_ev, 0)], -1).astype(np.int64)
    test_pos = np.where(evaluable, pos[test_ev], -1).astype(np.int64)
    per_session = np.bincount(sess)                              # (S,) events per session

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


@contextmanager
def building(data_dir):
    """Yield a fresh folder beside data_dir (NAME.tmpPID, marked as ours: files.MARKER) to build a
    dataset in. On success it replaces data_dir by two renames, after hard-linking in the old
    folder's files that are not DERIVED (an input log, notes); on any failure it is removed and
    data_dir is left as it was. data_dir must be new, empty or a prepared dataset (meta.json): a
    folder of other files (a raw-data folder) is refused, never written into. One prepare per
    folder at a time (a lock beside it). A kill leaves the old folder too (NAME.oldPID, marked); the
    next prepare puts it back or removes it; folders not marked by us are never touched."""
    target = os.path.normpath(data_dir)
    if os.path.exists(target) and not os.path.isdir(target):
        raise DataError(f"{data_dir}: exists and is not a folder; choose another --out_dir")
    here = os.path.realpath(os.getcwd())
    if here == os.path.realpath(target) or here.startswith(os.path.realpath(target).rstrip(os.sep) + os.sep):
        raise DataError(f"{data_dir}: the current folder (or one above it); prepare into a folder of its own")
    if os.path.isdir(target) and not os.path.isfile(os.path.join(target, "meta.json")):
        theirs = sorted(e.name for e in os.scandir(target) if e.name != MARKER_NAME)
        if theirs:   # a raw-data folder, a home folder: its files would be overwritten or mixed in
            raise DataError(f"{data_dir}: holds {len(theirs)} file(s) ({', '.join(theirs[:3])}"
                            f"{', ...' if len(theirs) > 3 else ''}) and is not a prepared dataset; "
                            "prepare into a new or empty folder")
    parent, base = os.path.split(target)
    os.makedirs(parent or ".", exist_ok=True)   # data/ does not exist on a fresh clone
    with writing(data_dir, f"data.py preparing {data_dir}"):
        with swapping(data_dir, target) as tmp:
            yield tmp


@contextmanager
def writing(data_dir, what):
    """Hold a dataset folder's one-writer lock (the file .NAME.nanobehavior.lock beside it: the folder is
    swapped by a prepare) while a block writes there: data.py, cluster.py."""
    from configurator import ConfigError
    from files import hold, release
    target = os.path.normpath(data_dir)
    parent, base = os.path.split(target)
    try:
        hold(target, what, lock=os.path.join(parent or ".", f".{base}.nanobehavior.lock"))
    except ConfigError as e:
        raise DataError(str(e)) from None
    except OSError as e:   # the folder above cannot be written
        raise DataError(f"{data_dir}: cannot write beside it ({e.strerror or one_line(e)}: {e.filename})") from None
    try:
        yield
    finally:
        release(target)


@contextmanager
def swapping(data_dir, target):
    """building's folder swap (the lock held)."""
    clean_leftovers(target)
    from files import mark
    tmp, old = f"{target}.tmp{os.getpid()}", f"{target}.old{os.getpid()}"
    try:
        if marked_as_ours(tmp):
            shutil.rmtree(tmp, ignore_errors=True)   # this process's own, from an earlier failure
        os.makedirs(tmp)
        mark(tmp, f"a dataset being prepared for {target}")
        yield tmp
        if os.path.isdir(target):
            for name in os.listdir(target):
                if name not in DERIVED and not re.search(r"\.tmp\d+(\.[0-9a-f]{8})?$", name) and name != MARKER_NAME \
                        and not os.path.lexists(os.path.join(tmp, name)):   # (a write of a killed process)
                    carry(os.path.join(target, name), os.path.join(tmp, name))
            mark(target, f"the previous dataset of {target}, replaced")   # it becomes NAME.oldPID: ours
            os.rename(target, old)
        os.rename(tmp, target)
        os.remove(os.path.join(target, MARKER_NAME))   # a dataset now, no longer ours to remove
    except BaseException as e:
        if os.path.isdir(old) and not os.path.exists(target):
            os.rename(old, target)  # failed between the two renames: put the old folder back
        if os.path.lexists(os.path.join(target, MARKER_NAME)):
            os.remove(os.path.join(target, MARKER_NAME))
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder, a file size limit
            where = f" {e.filename}" if e.filename else ""
            raise DataError(f"{data_dir}: cannot write the dataset ({e.strerror or one_line(e)}{where}); "
                            "the previous dataset is unchanged") from None
        raise
    if marked_as_ours(old):
        shutil.rmtree(old, ignore_errors=True)


def marked_as_ours(folder):
    """Was `folder` made (or set aside) by a prepare of this project? Only such folders are removed."""
    from files import marked_by
    return os.path.isdir(folder) and marked_by(folder) is not None


def carry(src, dst):
    """Keep a file (or folder) of the old dataset folder in the new one: hard links, else a copy."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def clean_leftovers(target):
    """What a killed prepare left beside target: NAME.tmpPID / NAME.oldPID folders that carry our
    marker and whose process is gone. An old folder whose swap was cut between its two renames is
    put back first; the rest are removed. A folder without the marker (a user's
    NAME.old20241130 backup) is never touched, whatever its name."""
    from files import alive, marked_by
    for path, kind, pid in leftovers(target):
        if marked_by(path) != pid or alive(pid):
            continue
        if kind == ".old" and not os.path.exists(target):
            os.rename(path, target)                       # first back, then no longer ours to remove
            os.remove(os.path.join(target, MARKER_NAME))
            print(f"{target}: put back from {path}, where a killed prepare had left it")
        else:
            shutil.rmtree(path, ignore_errors=True)


def leftovers(target):
    """[(path, '.tmp' or '.old', pid)] of the folders beside target named like a prepare's."""
    parent, base = os.path.split(os.path.normpath(target))
    out = []
    for name in os.listdir(parent or ".") if os.path.isdir(parent or ".") else []:
        kind, pid = name[len(base):len(base) + 4], name[len(base) + 4:]
        if name.startswith(base) and kind in (".tmp", ".old") and pid.isdigit():
            out.append((os.path.join(parent, name), kind, int(pid)))
    return out


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


def one_line(e):
    """An exception's message as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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


def eval_examples(data, split, max_users=None, seed=0):
    """(users, ctx_start, ctx_end, targets) int64, one row per evaluable user; target = tokens[ctx_end].
    max_users > 0 keeps a fixed random subset (same seed -> same users, so periodic evaluations and
    the baselines' choices on validation are comparable)."""
    pos = {"val": data.val_pos, "test": data.test_pos}[split]
    users = np.flatnonzero(np.asarray(pos) >= 0).astype(np.int64)
    if max_users and max_users < len(users):
        users = np.sort(users[np.random.default_rng(seed).choice(len(users), size=max_users, replace=False)])
    ctx_end = np.asarray(pos[users], dtype=np.int64)
    return users, data.offsets[users].astype(np.int64), ctx_end, data.tokens[ctx_end].astype(np.int64)


# -----------------------------------------------------------------------------
# the built-in dataset: a simulated shop, generated deterministically (no download)

CATEGORIES = ["electronics", "books", "fashion", "beauty", "toys", "home-living", "sports", "garden"]
HUBS = ["home", "search", "deals", "new-arrivals", "cart", "wishlist", "checkout", "purchase", "account", "help"]
N_ITEMS, N_REVIEWED = 40, 12  # items per category (Zipf popularity by index); items 0..11 have a reviews page
SEGMENTS = [  # the ground truth of the simulated shop (see simulate_site); weights need not sum to 1
    dict(name="deal hunters", share=.24, likes={"fashion": 5, "beauty": 4}, sessions=4, p_end=.14,
         land=[3, 6, 1, 0, 0],                   # session starts at: home, deals, category, search, new-arrivals
         home=[6, 2, 1, .5, .5],                 # home -> deals, category, search, account/help, new-arrivals
         item=[25, 5, 4, 36, 2, 10, 5, 13],      # item -> item of the same category, its companion, its reviews,
         checkout=.35, purchase=.5),             #         cart, wishlist, category page, search, home
    dict(name="researchers", share=.20, likes={"electronics": 6, "books": 4}, sessions=3, p_end=.07,
         land=[5, 0, 3, 2, 0], home=[.5, 5, 3, 1, .5], item=[20, 25, 35, 8, 2, 5, 7, 0],
         checkout=.5, purchase=.6),
    dict(name="family shoppers", share=.20, likes={"toys": 5, "home-living": 4}, sessions=4, p_end=.12,
         land=[6, 1, 3, 0, 0], home=[1, 7, .5, 1, .5], item=[28, 10, 5, 42, 0, 10, 0, 5],
         checkout=.75, purchase=.85),
    dict(name="outdoor searchers", share=.20, likes={"sports": 5, "garden": 4}, sessions=4, p_end=.10,
         land=[2, 0, 1, 7, 0], home=[.5, 2, 7, .5, 0], item=[18, 15, 10, 12, 0, 0, 45, 0],
         checkout=.5, purchase=.5),
    dict(name="window shoppers", share=.16, likes={}, sessions=5, p_end=.2,
         land=[6, 1, 1, 0, 2], home=[1, 3, 0, 1, 5], item=[15, 5, 5, 2, 25, 20, 3, 25],
         checkout=.2, purchase=.3),
]


def builtin_pages(n_items=N_ITEMS):
    return (HUBS + [f"c/{c}" for c in CATEGORIES] + [f"p/{c}/{k}" for c in CATEGORIES for k in range(n_items)]
            + [f"p/{c}/{k}/reviews" for c in CATEGORIES for k in range(N_REVIEWED)])


def companion(k, n_items=N_ITEMS):
    """Item k's companion (think: camera -> its lens): a tail item (20..39 of 40) of the same category."""
    half = n_items // 2
    return half + (7 * k + 3) % half


def simulate_site(n_users=5000, seed=1337, n_items=N_ITEMS, session_scale=1.0, repeat=0.0, repeat_decay=0.8):
    """Simulated shop log: rows (user, epoch seconds, page) and the ground-truth segment of each user.

    Ground truth (what a model can learn, and why a GPT with context beats first-order Markov):
    - 434 pages (builtin_pages): 10 hubs (home, search, deals, new-arrivals, cart, wishlist,
      checkout, purchase, account, help), 8 category pages c/X, 320 items p/X/k with Zipf(1.1)
      popularity by k, 96 reviews pages p/X/k/reviews (k < 12). Most pages hold < 1% of events.
    - 5 segments (SEGMENTS) with their own liked categories (recoverable by clustering users'
      page counts), landing pages, next page from home and from an item, checkout and purchase
      rates (the outcome page `purchase`) and session lengths: the same page is left differently
      by different segments, so knowing the segment (from the context) helps.
    - Tail pages are predictable: from item p/X/k the user opens its companion p/X/c(k), c(k) =
      20 + (7k+3) mod 20 (a tail item), with a segment-dependent probability; reviews pages are
      reached only from their item; new-arrivals leads to the newest items p/X/30..39.
    - Second-order rules (the page two or more steps back matters): after a companion, 40% go
      back to the item it came from; after reviews, 50% back to the item and 35% to the cart;
      search leads to an item of the category browsed before the search; cart and wishlist lead
      to checkout or back to the category page of the item put there; purchase ends the session
      70% of the time.
    - Sessions are separated by gaps of 1 hour to 4 days; events within one by 5 s to 2 minutes.
    Other shapes (the defaults give the built-in shop): n_items per category scales the catalogue
    (companions are items n/2..n-1, new arrivals the last quarter); session_scale scales each
    segment's mean number of sessions (0.25: mostly one session per user, short histories).
    repeat in [0, 1] makes a repeat-heavy log: with probability `repeat` the next event (a
    session's first one included) revisits one of the user's own earlier page events instead of
    following the rules above, drawn with recency weights repeat_decay**(age - 1) over all the user's
    page events so far (age 1 = the newest: the current page, a reload; at a session's start, the
    previous session's last page), so recent pages come back most; the session then goes on by the
    ordinary rules from the page revisited.
    The share of events that revisit a user's earlier pages rises with `repeat`; repeat=0 draws
    nothing extra (the log is the one without the knob, event for event)."""
    if not 0.0 <= repeat <= 1.0 or not 0.0 < repeat_decay < 1.0:
        raise ValueError("simulate_site needs 0 <= repeat <= 1 and 0 < repeat_decay < 1")
    rng = np.random.default_rng(seed)
    def uniforms():  # scalar draws from a seeded stream, fast
        while True:
            yield from rng.random(1 << 16).tolist()
    U = uniforms()
    cum = lambda w: (np.cumsum(w) / np.sum(w)).tolist()
    draw = lambda c: min(bisect(c, next(U)), len(c) - 1)  # index drawn with cumulative weights c
    log_decay = math.log(repeat_decay)

    def revisit(seen):
        """One of seen (the user's page events so far, oldest first), the one `age` events back (1 = the
        newest) drawn with weight repeat_decay**(age - 1): a truncated geometric age, by inverting its
        CDF (1 - d**a) / (1 - d**n), so no weights are built per draw."""
        n = len(seen)
        age = math.ceil(math.log(1.0 - next(U) * (1.0 - repeat_decay ** n)) / log_decay)
        return seen[n - min(max(age, 1), n)]

    newest = n_items - n_items // 4
    zipf_item, flat_item = cum(1 / np.arange(1, n_items + 1) ** 1.1), cum(1 / np.arange(1, n_items + 1) ** 0.5)
    seg_of = np.minimum(np.searchsorted(np.cumsum([s["share"] for s in SEGMENTS]), rng.random(n_users)),
                        len(SEGMENTS) - 1)
    item = lambda c, k: (f"p/{CATEGORIES[c]}/{k}", c, k)      # a page is (name, category, item)
    category = lambda c: (f"c/{CATEGORIES[c]}", c, None)
    hub = lambda name, c=None, k=None: (name, c, k)
    rows, t_first = [], 1704067200 + rng.integers(0, 30 * 86400, size=n_users)  # from 2024-01-01 UTC
    for u in range(n_users):
        seg = SEGMENTS[seg_of[u]]
        cats = cum([seg["likes"].get(c, .2) if seg["likes"] else 1 for c in CATEGORIES])
        land, home, acts = cum(seg["land"]), cum(seg["home"]), cum(seg["item"])
        t, seen = float(t_first[u]), []  # seen: the user's page events so far (only with repeat > 0)
        for _ in range(1 + rng.poisson(max(0.0, seg["sessions"] * session_scale - 1))):
            if repeat > 0 and seen and next(U) < repeat:  # the session opens on a page visited before
                page = revisit(seen)
            else:
                page = [hub("home"), hub("deals"), category(draw(cats)), hub("search", draw(cats)),
                        hub("new-arrivals")][draw(land)]
            hist = []
            while True:
                hist.append(page)
                rows.append((u, int(t), page[0]))
                if repeat > 0:
                    seen.append(page)
                t += 5 + 115 * next(U) ** 2
                if len(hist) >= 40 or next(U) < (.7 if page[0] == "purchase" else seg["p_end"]):
                    break
                if repeat > 0 and next(U) < repeat:  # back to a page visited before (the current one too)
                    page = revisit(seen)
                    continue
                name, c, k = page
                prev = hist[-2] if len(hist) > 1 else hub(None)
                if name == "home":
                    a = draw(home)
                    page = [hub("deals"), category(draw(cats)), hub("search", draw(cats)),
                            hub("account" if next(U) < .6 else "help"), hub("new-arrivals")][a]
                elif name == "deals":  # sale items 8, 13, 17 of a liked category
                    page = item(draw(cats), (8, 13, 17)[min(int(3 * next(U)), 2)])
                elif name == "new-arrivals":  # the newest items, the last quarter (30..39 of 40): tail pages
                    page = item(draw(cats), newest + min(int((n_items - newest) * next(U)), n_items - newest - 1))
                elif name.startswith("c/"):
                    page = item(c, draw(zipf_item))
                elif name == "search":  # an item of the category browsed before the search
                    page = item(c if c is not None else draw(cats), draw(flat_item))
                elif name.endswith("/reviews"):
                    a = next(U)
                    page = item(c, k) if a < .5 else hub("cart", c, k) if a < .85 else hub("search", c)
                elif name.startswith("p/"):
                    if prev[2] is not None and prev[1] == c and companion(prev[2], n_items) == k and next(U) < .4:
                        page = prev  # back from the companion to the item it came from
                        continue
                    a = draw(acts)
                    if a == 2 and k >= N_REVIEWED:
                        a = 0
                    page = [item(c, draw(zipf_item)), item(c, companion(k, n_items)), hub(f"{name}/reviews", c, k),
                            hub("cart", c, k), hub("wishlist", c, k), category(c), hub("search", c), hub("home")][a]
                elif name in ("cart", "wishlist"):  # checkout, or back to the category of the item put there
                    go = next(U) < (seg["checkout"] if name == "cart" else .1)
                    page = hub("checkout") if go else category(c) if c is not None else hub("home")
                elif name == "checkout":
                    page = hub("purchase") if next(U) < seg["purchase"] else hub("help")
                else:  # purchase, account, help
                    page = hub("home") if next(U) < .7 else hub("account" if name == "help" else "help")
            t += 3600 + 3 * 86400 * next(U)
    return rows, seg_of.astype(np.int64)


def make_builtin(data_dir="data/builtin", seed=1337, n_users=5000, n_items=N_ITEMS, session_scale=1.0, split="page",
                 repeat=0.0):
    """Simulate the shop (repeat: see simulate_site), write data_dir/events.csv.gz (user,time,page), prepare it
    through the ordinary event-log reader with 30-minute time-gap sessions, then write segments.npy (ground-truth
    segment per user index); all in one atomic build (see building). Returns meta."""
    rows, segments = simulate_site(n_users, seed, n_items, session_scale, repeat)  # tests, other shapes
    order = sorted(range(len(rows)), key=lambda i: (rows[i][1], i))  # a real log: global time order
    lines = ["user,time,page"] + [f"u{rows[i][0]:05d},{rows[i][1]},{rows[i][2]}" for i in order]
    with building(data_dir) as folder:
        path = os.path.join(folder, "events.csv.gz")
        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
            gz.write(("\n".join(lines) + "\n").encode())  # mtime=0: the same bytes on every run
        meta = build_dataset(path, folder, time_col="time", session_gap=1800.0,
                             source=os.path.join(data_dir, "events.csv.gz"), split=split)
        with open(os.path.join(folder, "users.txt"), encoding="utf-8") as f:  # users in order of first visit
            users = f.read().split()
        write_atomic(os.path.join(folder, "segments.npy"), segments[[int(u[1:]) for u in users]])
    return meta


def ensure_builtin(data_dir="data/builtin"):
    """The built-in dataset at data_dir, generated on first use. A dataset prepared there from
    another log (no segments.npy) is the user's: used as it is, never replaced."""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        print(f"building the built-in dataset into {data_dir} ...")
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
