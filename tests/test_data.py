"""Tests for data.py: readers, sessions, the leave-last-out split, windows, batches, anchors, built-in data.
Fast, offline; every input is a small file written into tmp_path."""

import math
import gzip
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import logs  # noqa: E402
import shop  # noqa: E402
from data import DataError, anchor_split, eval_examples, get_batch, load_data, prepare, train_windows  # noqa: E402
from tokenizer import BOS, EOS, PAD, UNK  # noqa: E402


def write(tmp_path, name, text, gz=False):
    path = str(tmp_path / name)
    raw = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return path


def streams(d):
    """{user id: decoded full token stream}."""
    return {u: d.tokenizer.decode(d.tokens[d.offsets[i]:d.offsets[i + 1]]) for i, u in enumerate(d.user_ids())}


def run(tmp_path, name, text, gz=False, **kw):
    path = write(tmp_path, name, text, gz)
    out = str(tmp_path / ("ds_" + name.replace(".", "_")))
    prepare(path, out, **kw)
    return load_data(out)


S = lambda *pages: ["<bos>", *pages, "<eos>"]
# three training-only users (< 3 events): every page is in the vocabulary and the streams are exact
EXPECTED = {"u1": S("a", "b"), "u2": S("b", "c"), "u3": S("a")}


@pytest.mark.parametrize("name, text, kw", [
    ("log.csv", "user,page\nu1,a\nu2,b\nu1,b\nu2,c\nu3,a\n", {}),
    ("log.tsv", "user\tpage\nu1\ta\nu2\tb\nu1\tb\nu2\tc\nu3\ta\n", {}),
    ("log.jsonl", '{"user": "u1", "page": "a"}\n{"user": "u2", "page": "b"}\n\n{"user": "u1", "page": "b"}\n'
                  '{"user": "u2", "page": "c", "extra": 1}\n{"user": "u3", "page": "a"}\n', {}),
    ("renamed.csv", "ts,visitor,url\n1,u1,a\n2,u2,b\n3,u1,b\n4,u2,c\n5,u3,a\n", dict(user_col="visitor", page_col="url")),
    ("log.seq", "u1: a b\nu2: b c\nu3: a\n", {}),
    ("log.txt", "u1 a\nu2 b\nu1 b\nu2 c\nu3 a\n", {}),           # auto: pairs by content
    ("events", "user,page\r\nu1,a\r\nu2,b\r\nu1,b\r\nu2,c\r\nu3,a\r\n", {}),  # auto: header by content, CRLF
    # RecBole atomic file: typed header, sorted by timestamp (u1's b was rated after a)
    ("ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tb\t4\t20\nu2\tb\t3\t5\n"
                 "u1\ta\t5\t10\nu2\tc\t1\t6\nu3\ta\t2\t1\n", {}),
    ("atomic", "user_id:token\titem_id:token\nu1\ta\nu2\tb\nu1\tb\nu2\tc\nu3\ta\n", {}),   # auto: by content, no time
    ("inter.tsv.inter", "uid:token\tiid:token\tts:float\nu1\ta\t1\nu2\tb\t1\nu1\tb\t2\nu2\tc\t2\nu3\ta\t1\n",
     dict(user_col="uid", page_col="iid", time_col="ts")),
    # MovieLens ratings.dat: by content (::), sorted by time, one session per user however far apart
    ("ratings.dat", "u1::b::4::978300760\nu2::b::3::978300000\nu1::a::5::900000000\nu2::c::1::978309999\nu3::a::2::1\n", {}),
])
def test_formats_give_expected_streams(tmp_path, name, text, kw):
    d = run(tmp_path, name, text, **kw)
    assert streams(d) == EXPECTED
    assert d.meta["n_eval_users"] == 0 and (np.asarray(d.val_pos) == -1).all()


def test_gzip_detected_by_magic_bytes(tmp_path):
    d = run(tmp_path, "log.csv", "user,page\nu1,a\nu2,b\nu1,b\nu2,c\nu3,a\n", gz=True)  # no .gz in the name
    assert streams(d) == EXPECTED
    d = run(tmp_path, "BMS.dat.gz", "u1 a\nu2 b\nu1 b\nu2 c\nu3 a\n", gz=True)
    assert streams(d) == EXPECTED and d.meta["format"] == "pairs"


def test_seq_line_is_a_session_and_user_is_line_number(tmp_path):
    d = run(tmp_path, "s.seq", "x y\n\nz\nk: x\nk: y\n")
    assert streams(d) == {"1": S("x", "y"), "3": S("z"), "k": S("x") + S("y")}


def test_msnbc_layout_with_header_and_names(tmp_path):
    text = ("% Different categories found in input file:\r\n\r\nfrontpage news tech\r\n\r\n\r\n% Sequences:\r\n\r\n"
            "1 1 \r\n2 \r\n3 2 2 \r\n")
    d = run(tmp_path, "msnbc.seq", text)
    assert d.meta["format"] == "seq"
    assert streams(d) == {"8": S("frontpage", "frontpage"), "9": S("news"), "10": S("tech", "news", "news")}
    assert d.val_pos[2] == d.offsets[2] + 2 and d.test_pos[2] == d.offsets[2] + 3
    assert logs.detect_format(write(tmp_path, "m.gz", text, gz=True)) == "seq"  # '%' first line


def test_time_sorting_and_gap_sessions(tmp_path):
    text = ("user,time,page\n"
            "u1,100,a\nu1,50,b\nu2,0,x\nu1,100,c\nu1,2000,d\nu1,2010,e\n"
            "u2,1970-01-01T00:10:00Z,y\nu2,1970-01-01T01:00:00,z\n"   # 600 s (same session), 3600 s (naive = UTC)
            "u3,5,d\nu3,6,e\nu4,7,y\nu4,8,z\n")
    d = run(tmp_path, "t.csv", text, time_col="time")
    s = streams(d)
    assert s["u1"] == S("b", "a", "c") + S("d", "e")   # stable sort on the tie at 100; 1900 s gap > 1800
    assert s["u2"] == S("x", "y") + S("z")             # 3000 s gap
    d = run(tmp_path, "t2.csv", text, time_col="time", session_gap=5000)
    assert streams(d)["u1"] == S("b", "a", "c", "d", "e")


def test_jsonl_numeric_and_iso_times(tmp_path):
    text = ('{"user": 1, "time": 5000, "page": "b"}\n{"user": 1, "time": "1970-01-01T00:00:10+00:00", "page": "a"}\n'
            '{"user": 2, "time": 1.5, "page": "a"}\n')
    d = run(tmp_path, "t.jsonl", text, time_col="time", session_gap=1800)
    assert streams(d) == {"1": S("a") + S("b"), "2": S("a")}


def test_session_column(tmp_path):
    d = run(tmp_path, "s.csv", "user,sid,page\nu1,s1,a\nu1,s1,b\nu1,s2,a\nu2,s9,b\n", session_col="sid")
    assert streams(d)["u1"] == S("a", "b") + S("a")


@pytest.mark.parametrize("name, text, kw, pattern", [
    ("bad.txt", "u1 a\nu2 b\nu3 c d\n", dict(fmt="pairs"), r"bad\.txt:3: malformed"),
    ("bad.csv", "user,page\nu1,a\nu2,b,c\n", {}, r"bad\.csv:3: malformed"),
    ("bad.jsonl", '{"user": "u1", "page": "a"}\n{"user": "u1", \n', {}, r"bad\.jsonl:2: malformed"),
    ("bad.seq", "u1: a\nu2:\n", {}, r"bad\.seq:2: malformed"),
    ("empty.csv", "", {}, r"empty\.csv: empty"),
    ("empty.seq", "\n\n", {}, r"empty\.seq: empty"),
    ("nocol.csv", "user,thing\nu1,a\n", {}, r"nocol\.csv:1: missing column 'page'"),
    ("nokey.jsonl", '{"user": "u1", "page": "a"}\n{"user": "u1"}\n', {}, r"nokey\.jsonl:2: missing column 'page'"),
    ("notime.csv", "user,page\nu1,a\n", dict(time_col="time"), r"notime\.csv:1: missing column 'time'"),
    ("badtime.csv", "user,time,page\nu1,5,a\nu1,yesterday,b\n", dict(time_col="time"), r"badtime\.csv:3: bad timestamp 'yesterday'"),
    ("r.dat", "1::2::3::4\n1::2\n", {}, r"r\.dat:2: malformed line \(expected `user::item::rating::time`"),
    ("t.dat", "1::2::3::4\n1::3::3::noon\n", {}, r"t\.dat:2: bad timestamp 'noon'"),
    ("x.inter", "user_id:token\trating:float\n1\t3\n", {}, r"x\.inter:1: missing column 'item_id'"),
    ("y.inter", "user_id:token\titem_id:token\n1\t2\n1\n", {}, r"y\.inter:3: malformed line \(expected 2 fields"),
    ("z.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tsoon\n", {}, r"z\.inter:2: bad timestamp 'soon'"),
])
def test_bad_input_one_line_error(tmp_path, name, text, kw, pattern):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError, match=pattern) as e:
        prepare(path, str(tmp_path / "out"), **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_cli_prints_error_without_traceback_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, "bad.txt", "u1 a\nu2\n")
    with pytest.raises(SystemExit) as e:
        data.main([path, f"--out_dir={tmp_path / 'out'}", "--format=pairs"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.txt:2" in err and "Traceback" not in err


def test_failed_prepare_keeps_previous_dataset_and_missing_dataset_is_clear(tmp_path):
    out = str(tmp_path / "ds")
    prepare(write(tmp_path, "good.txt", "u1 a\nu1 b\n"), out)
    with pytest.raises(DataError):
        prepare(write(tmp_path, "bad.txt", "u1 a\nu1\n", ), out, fmt="pairs")
    assert streams(load_data(out)) == {"u1": S("a", "b")}
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_data(str(tmp_path / "nothing"))


def test_leave_last_out_split_and_train_only_vocabulary(tmp_path):
    # u1: 5 events -> train a b c, val a, test b; u2, u3: < 3 events -> training only; u4: val x, test y unseen
    d = run(tmp_path, "split.txt", "u1 a\nu1 b\nu1 c\nu1 a\nu1 b\nu2 a\nu2 b\nu3 a\nu4 b\nu4 x\nu4 y\n")
    assert d.tokenizer.pages[4:] == ["a", "b", "c"]                 # x, y never seen in training
    assert d.tokenizer.counts[4:].tolist() == [3, 3, 1]             # counts from train regions only
    o = np.asarray(d.offsets)
    assert d.val_pos.tolist() == [o[0] + 4, -1, -1, o[3] + 2] and d.test_pos.tolist() == [o[0] + 5, -1, -1, o[3] + 3]
    assert d.train_end.tolist() == [o[0] + 4, o[2], o[3], o[3] + 2]
    assert streams(d)["u4"] == S("b", "<unk>", "<unk>")
    assert d.meta["n_eval_users"] == 2 and d.meta["val_unk_rate"] == 0.5 and d.meta["test_unk_rate"] == 0.5
    users, cs, ce, tg = eval_examples(d, "test")
    assert users.tolist() == [0, 3] and cs.tolist() == [o[0], o[3]] and ce.tolist() == d.test_pos[[0, 3]].tolist()
    assert tg.tolist() == [d.tokenizer.page_id("b"), UNK]
    users, cs, ce, tg = eval_examples(d, "val")
    assert tg.tolist() == [d.tokenizer.page_id("a"), UNK] and ce[0] == ce[0] and (ce < d.test_pos[users]).all()


def test_min_count_maps_rare_training_pages_to_unk(tmp_path):
    d = run(tmp_path, "mc.txt", "u1 a\nu1 a\nu2 a\nu2 z\n", min_count=2)
    assert d.tokenizer.pages[4:] == ["a"] and streams(d)["u2"] == S("a", "<unk>")


def test_windows_and_batches_stay_inside_one_users_train_region(tmp_path):
    rng = np.random.default_rng(0)
    lines = [f"u{u} p{rng.integers(0, 12)}" for u in range(40) for _ in range(rng.integers(1, 30))]
    d = run(tmp_path, "w.txt", "\n".join(lines) + "\n")
    block = 8
    w = train_windows(d, block)
    assert w.dtype == np.int64 and w.shape[1] == 2
    lens = w[:, 1] - w[:, 0]
    assert lens.min() >= 2 and lens.max() == block + 1
    owner = np.searchsorted(d.offsets, w[:, 0], side="right") - 1
    assert (w[:, 0] >= np.asarray(d.offsets)[owner]).all() and (w[:, 1] <= d.train_end[owner]).all()
    covered = np.concatenate([np.arange(s + 1, e) for s, e in w])  # every train target exactly once
    want = np.concatenate([np.arange(d.offsets[u] + 1, d.train_end[u]) for u in range(d.n_users)])
    assert np.array_equal(np.sort(covered), want)
    rows = rng.permutation(len(w))[:16]
    x, y = get_batch(d, w, rows)
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == y.shape
    assert x.shape[1] == lens[rows].max() - 1
    tokens = np.asarray(d.tokens).astype(np.int64)
    for i, r in enumerate(rows):
        s, e = w[r]
        n = e - s - 1
        assert x[i, :n].tolist() == tokens[s:e - 1].tolist()
        tgt = tokens[s + 1:e].copy()
        tgt[(tgt == BOS) | (tgt == PAD)] = -1
        assert y[i, :n].tolist() == tgt.tolist()
        assert (x[i, n:] == PAD).all() and (y[i, n:] == -1).all()
    assert (y == EOS).any() and not (y == BOS).any()


def test_anchor_split_rules():
    counts = np.array([0, 500, 0, 0, 50, 30, 10, 6, 4])  # <unk>'s count is never an anchor's
    ids, rule, share = anchor_split(counts, anchor_share=0.05)
    assert ids.tolist() == [4, 5, 6, 7] and rule == "share" and share == pytest.approx(0.96)
    ids, rule, share = anchor_split(counts, anchor_share=0.1)
    assert ids.tolist() == [4, 5] and share == pytest.approx(0.8)  # 10% is not > 10%
    ids, rule, share = anchor_split(counts, anchor_mass=0.5)
    assert ids.tolist() == [4] and rule == "mass" and share == pytest.approx(0.5)
    ids, _, share = anchor_split(counts, anchor_mass=0.85)
    assert ids.tolist() == [4, 5, 6] and share == pytest.approx(0.9)
    ids, _, _ = anchor_split(np.array([0, 0, 0, 0, 5, 5, 5, 5]), anchor_mass=0.5)
    assert ids.tolist() == [4, 5]  # ties: lower id (= earlier by name) first


def test_builtin_generator_is_deterministic():
    a, sa = shop.simulate_site(n_users=200, seed=7)
    b, sb = shop.simulate_site(n_users=200, seed=7)
    c, _ = shop.simulate_site(n_users=200, seed=8)
    assert a == b and np.array_equal(sa, sb) and a != c


def test_builtin_dataset(tmp_path):
    meta = shop.make_builtin(str(tmp_path / "builtin"))
    d = data.ensure_builtin(str(tmp_path / "builtin"))  # already there: just loads
    assert 4000 <= meta["n_users"] <= 6000 and 20 <= meta["n_events"] / meta["n_users"] <= 40
    assert meta["settings"]["time_col"] == "time" and meta["n_sessions"] > meta["n_users"]
    assert 300 <= meta["n_pages"] <= 500 and 0 < meta["anchor"]["n_anchors"] < 0.1 * meta["n_pages"]
    assert len(d.segments) == d.n_users and len(np.unique(d.segments)) >= 4
    assert set(d.tokenizer.pages[4:]) <= set(shop.builtin_pages())
    purchase = d.tokenizer.page_id("purchase")
    assert purchase != UNK
    bought = np.array([(d.tokens[d.offsets[u]:d.offsets[u + 1]] == purchase).sum() for u in range(d.n_users)])
    rates = [bought[d.segments == s].mean() for s in np.unique(d.segments)]
    assert max(rates) > 3 * min(rates)  # segment-dependent outcome
    with gzip.open(tmp_path / "builtin" / "events.csv.gz", "rt") as f:
        assert f.readline().strip() == "user,time,page"


def test_anchor_fallback_when_no_page_passes_the_share():
    # 100 pages of 1% each (none passes > 1%): the share rule would leave no anchors
    counts = np.r_[np.zeros(4, dtype=np.int64), np.full(100, 10)]
    ids, rule, share = anchor_split(counts, anchor_share=0.01)
    assert rule == "mass (fallback)" and len(ids) == 50 and abs(share - 0.5) < 1e-9
    # a page that does pass, holding enough: no fallback
    counts = np.r_[np.zeros(4, dtype=np.int64), [500], np.full(100, 5)]
    ids, rule, _ = anchor_split(counts, anchor_share=0.01)
    assert rule == "share" and ids.tolist() == [4]


def test_prepare_into_a_folder_whose_parent_does_not_exist_yet(tmp_path):
    # a fresh clone has no data/ folder: the built-in dataset goes to data/builtin
    meta = shop.make_builtin(str(tmp_path / "data" / "builtin"), n_users=30)
    assert load_data(str(tmp_path / "data" / "builtin")).n_users == meta["n_users"] == 30


def test_rating_logs_are_one_session_per_user_unless_a_gap_is_set(tmp_path):
    text = "u1::a::4::0\nu1::b::4::86400\nu1::c::4::172800\nu1::d::4::259200\n"   # a rating a day
    assert streams(run(tmp_path, "ratings.dat", text))["u1"] == ["<bos>", "a", "b", "<unk>", "<unk>", "<eos>"]
    d = run(tmp_path, "r2.dat", text, session_gap=3600)                                # asked for: daily sessions
    assert d.meta["n_sessions"] == 4 and d.meta["settings"]["session_gap"] == 3600
    assert load_data(str(tmp_path / "ds_ratings_dat")).meta["settings"]["fmt"] == "ratings"


def test_an_event_log_with_a_rating_column_is_one_session_per_user(tmp_path):
    body = "u1,a,4,0\nu1,b,4,86400\nu1,c,4,172800\nu1,d,4,259200\n"                    # a rating a day
    rated = run(tmp_path, "r.csv", "user,page,rating,time\n" + body, time_col="time")
    assert rated.meta["n_sessions"] == 1 and rated.meta["settings"]["session_gap"] == math.inf
    assert "column 'rating'" in rated.meta["session_rule"] and "session_gap inf s" in data.summary(rated.meta)
    plain = run(tmp_path, "e.csv", "user,page,stars,time\n" + body, time_col="time")   # no rating column, but
    assert plain.meta["n_sessions"] == 1 and plain.meta["settings"]["session_gap"] == math.inf  # 30-minute sessions
    assert "100% of 30-minute sessions would hold a single event" in plain.meta["session_rule"]  # of one event each
    cut = run(tmp_path, "e2.csv", "user,page,stars,time\n" + body, time_col="time", session_gap=1800)   # as asked
    assert cut.meta["n_sessions"] == 4 and "note: most sessions hold one event" in data.summary(cut.meta)
    web = run(tmp_path, "w.csv", "user,page,time\nu1,a,0\nu1,b,60\nu1,c,120\nu1,d,90000\nu1,e,90060\n")
    assert web.meta["n_sessions"] == 2 and web.meta["session_rule"] == "30 minutes, as web sessions"
    asked = run(tmp_path, "r3.csv", "user,page,rating,time\n" + body, time_col="time", session_gap=3600)
    assert asked.meta["n_sessions"] == 4 and asked.meta["session_rule"] == "as set"


def test_columns_found_by_their_usual_names_and_a_time_column_read_by_default(tmp_path):
    body = "user_id,item_id,timestamp\nu1,b,2000\nu1,a,1000\nu1,c,3000\nu1,d,9000\n"   # not in time order
    d = run(tmp_path, "ml.csv", body)
    assert streams(d)["u1"][:3] == ["<bos>", "a", "b"]                                # sorted by timestamp
    assert d.meta["columns_found"] == [["user", "user_id"], ["page", "item_id"], ["time", "timestamp"]]
    assert d.meta["settings"]["time_col"] == "timestamp" and d.meta["n_sessions"] == 2   # 6,000 s gap > 1,800
    assert "found by name: user 'user_id', page 'item_id', time 'timestamp'" in data.summary(d.meta)
    flat = run(tmp_path, "ml2.csv", body, time_col="")                                  # --time_col= : no times
    assert streams(flat)["u1"][:3] == ["<bos>", "b", "a"] and flat.meta["settings"]["time_col"] is None
    ms = run(tmp_path, "ms.csv", "visitorid,event,itemid,timestamp\nu1,view,a,1433221332117\n"
                                 "u1,view,b,1433221333117\nu1,view,c,1433222332117\nu1,view,d,1433229332117\n")
    assert ms.meta["columns_found"][:2] == [["user", "visitorid"], ["page", "itemid"]]  # itemid before event
    assert ["time unit", "milliseconds"] in ms.meta["columns_found"] and ms.meta["n_sessions"] == 2
    with pytest.raises(DataError, match="missing column 'who'"):
        run(tmp_path, "x.csv", body, user_col="who")                                   # as given: never replaced


def test_a_header_with_usual_names_is_an_event_log_whatever_the_extension(tmp_path):
    path = write(tmp_path, "log.txt", "customer_id\tproduct_id\nc1\tp1\nc1\tp2\nc1\tp3\n")
    assert logs.detect_format(path) == "events"


def test_a_session_column_is_found_and_a_log_of_sessions_alone_makes_each_session_a_user(tmp_path):
    both = run(tmp_path, "s.csv", "user_id,session_id,item_id\nu1,s1,a\nu1,s1,b\nu1,s2,c\nu1,s2,d\n")
    assert both.meta["n_sessions"] == 2 and ["session", "session_id"] in both.meta["columns_found"]
    alone = run(tmp_path, "yc.csv", "session_id,item_id\ns1,a\ns1,b\ns1,c\ns2,a\n")
    assert alone.meta["n_users"] == 2 and alone.meta["columns_found"][0] == ["user", "session_id"]
    assert alone.meta["settings"]["session_col"] is None


def test_a_time_column_found_by_name_that_holds_no_times_is_left_unread(tmp_path):
    body = "user,page,date\nu1,a,12/01/2010\nu1,b,12/02/2010\nu1,c,12/03/2010\n"     # not ISO-8601
    d = run(tmp_path, "d.csv", body)
    assert d.meta["settings"]["time_col"] is None and streams(d)["u1"][1] == "a" and d.meta["n_sessions"] == 1
    assert "column 'date' not read as times (line 2: '12/01/2010'" in data.summary(d.meta)
    with pytest.raises(DataError, match=r"d2\.csv:2: bad timestamp '12/01/2010' in column 'date'"):
        run(tmp_path, "d2.csv", body, time_col="date")                                # named: an error, as before


def test_found_columns_edge_cases(tmp_path):
    # jsonl: keys from the first objects; a found session/time column may be absent from a line
    lines = ['{"user_id": "u1", "item_id": "a"}', '{"user_id": "u1", "item_id": "b", "timestamp": 5, "session_id": "s"}',
             '{"user_id": "u1", "item_id": "c", "timestamp": 6, "session_id": "s"}']
    d = run(tmp_path, "j.jsonl", "\n".join(lines) + "\n")
    assert ["session", "session_id"] in d.meta["columns_found"] and d.meta["settings"]["time_col"] is None
    assert "column 'timestamp' not read as times (line 1: None" in data.summary(d.meta)
    # microseconds are not milliseconds; a column merely containing "rating" is no rating log
    us = run(tmp_path, "us.csv", "user,page,time,avg_rating\nu1,a,1433221332117000,3\nu1,b,1433221333117000,3\n"
                                 "u1,c,1433222332117000,3\nu1,d,1433229332117000,3\n")
    assert ["time unit", "microseconds"] in us.meta["columns_found"] and us.meta["n_sessions"] == 2
    assert us.meta["settings"]["session_gap"] == 1800
    # the next usual name is tried when the first is already the user column
    s = run(tmp_path, "v.csv", "session_id,url,visit_id\nx,a,v1\nx,b,v1\nx,c,v2\n", user_col="session_id")
    assert s.meta["columns_found"] == [["page", "url"], ["session", "visit_id"]] and s.meta["n_sessions"] == 2
    # .inter: --time_col= (empty) reads no times
    inter = "user_id:token\titem_id:token\ttimestamp:float\nu1\tb\t2\nu1\ta\t1\nu1\tc\t3\n"
    assert streams(run(tmp_path, "t.inter", inter, time_col=""))["u1"][1] == "b"
    assert streams(run(tmp_path, "t2.inter", inter))["u1"][1] == "a"


def test_simulator_repeat_knob(tmp_path):
    """repeat=R: the next event revisits one of the user's earlier pages with probability R (recent ones
    most), so the share of revisits rises with R; repeat=0 draws nothing extra (the log is unchanged)."""
    import hashlib

    def revisit_share(rows):
        seen, hits = set(), 0
        for u, _, page in rows:
            hits += (u, page) in seen
            seen.add((u, page))
        return hits / len(rows)

    # repeat=0 is the log from before the knob existed, event for event (digest of the original generator)
    rows, seg = shop.simulate_site(n_users=60, seed=11, repeat=0.0)
    assert len(rows) == 1739 and hashlib.sha256(repr(rows).encode()).hexdigest()[:16] == "53e314482297040f"
    assert rows == shop.simulate_site(n_users=60, seed=11)[0]
    base = revisit_share(shop.simulate_site(n_users=300, seed=7)[0])
    heavy, _ = shop.simulate_site(n_users=300, seed=7, repeat=0.8)
    assert revisit_share(heavy) > base + 0.25 and heavy == shop.simulate_site(n_users=300, seed=7, repeat=0.8)[0]
    # repeat=1: after a user's first page every event is a page of their own history, recent ones most
    every, _ = shop.simulate_site(n_users=100, seed=3, repeat=1.0)
    by_user = {}
    for u, _, page in every:
        by_user.setdefault(u, []).append(page)
    assert all(p in h[:i] for h in by_user.values() for i, p in enumerate(h) if i > 0)
    back = [next(k for k in range(1, i + 1) if h[i - k] == p) for h in by_user.values() for i, p in enumerate(h) if i > 0]
    assert np.mean(np.array(back) <= 3) > 0.6  # the most recent pages come back most
    with pytest.raises(ValueError):
        shop.simulate_site(n_users=5, repeat=1.5)
    # through make_builtin and the command line, measured as the recipe measures it
    from recipe import data_stats
    data.main(["--builtin", "--n_users=200", "--repeat=0.8", f"--out_dir={tmp_path / 'rep'}"])
    shop.make_builtin(str(tmp_path / "plain"), n_users=200)
    assert data_stats(load_data(str(tmp_path / "rep")))["repeat_rate"] > data_stats(load_data(str(tmp_path / "plain")))["repeat_rate"] + 0.2
