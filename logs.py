"""
Behavior logs as users write them -> raw events: the readers of data.py, and format detection.

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

Every reader returns events(): raw integer ids of users and pages (and times, sessions) with the
strings behind them; data.py turns them into sessions, the split and tokens.
"""

import csv
import gzip
import io
import itertools
import json
import math
import os
import zlib
from array import array
from datetime import datetime, timezone

import numpy as np

from configurator import DataError, Progress


# every reader maps user and page strings to raw integer ids as it goes (one dict each)

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


def read_header(path, it, sep):
    """An event log's header from its first line (csv/tsv) or the keys of its first 100 objects
    (jsonl: an object may leave out an optional key). it: lines(path, newline=""), read on by the caller.
    Returns (jsonl, sep, header, line number and text of the first line, the objects read ahead)."""
    name = os.path.basename(path).lower().removesuffix(".gz")
    head_no, head = next((x for x in it if x[1].strip()), (0, ""))
    if not head:
        raise DataError(f"{path}: empty file (no events)")
    jsonl = sep == "jsonl" or (sep is None and (name.endswith((".jsonl", ".ndjson", ".json")) or head.lstrip().startswith("{")))
    ahead = None
    if jsonl:
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
    return jsonl, sep, header, head_no, head, ahead


def read_events(path, user_col="user", page_col="page", time_col=None, session_col=None, sep=None):
    """Event log with a header, .csv/.tsv (sep) or .jsonl; the time and session columns are optional
    (columns found by name: pick_columns). Epoch times in milliseconds are read as such."""
    uid, pid, users, pages, times, sid, sessions = {}, {}, array("q"), array("q"), array("d"), {}, array("q")
    it = lines(path, newline="")
    jsonl, sep, header, head_no, head, ahead = read_header(path, it, sep)
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



FORMATS = ("events", "seq", "pairs", "inter", "ratings")   # the readers above; "auto" picks one (detect_format)


def read_log(input_path, fmt="auto", user_col="user", page_col="page", time_col=None, session_col=None, sep=None):
    """A log in any of FORMATS (fmt "auto": detect_format) -> (fmt, events dict of the readers)."""
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
    return fmt, ev
