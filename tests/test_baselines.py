"""baselines.py: SR, SKNN / V-SKNN, recency and the validation choices, on tiny hand-made logs whose
scores are computed by hand here."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines as bl  # noqa: E402
import data as data_mod  # noqa: E402
import evaluate as ev  # noqa: E402
from test_evaluate import fake_data  # noqa: E402  (the same tiny prepared dataset)

B_, E_, UNK = 2, 3, 1  # <bos>, <eos>, <unk>


def ctx(data, u, split="val"):
    """(users, ctx_start, ctx_end) of user u's validation or test example."""
    end = {"val": data.val_pos, "test": data.test_pos}[split][u]
    return np.array([u]), np.array([data.offsets[u]]), np.array([end])


def evidence(scores, logback):
    """Pages whose score is above the popularity back-off -> {page: exp(score)} (their evidence)."""
    s = scores[0].double().numpy()
    return {p: math.exp(s[p]) for p in range(4, len(s)) if s[p] > logback[p] + 1}


def random_users(rng, n_users, V, repeats=True):
    users = []
    for _ in range(n_users):
        sessions = []
        for _ in range(rng.integers(1, 4)):
            n = rng.integers(1, 7)
            s = rng.integers(4, V, size=n) if repeats else rng.permutation(np.arange(4, V))[:n]
            sessions.append([int(p) for p in s])
        users.append(sessions)
    return users


# ----------------------------------------------------------------------------- SR

SR_LOG = [[[4, 5, 6], [7, 4, 8, 9]],   # train B 4 5 6 E B 7 4 | val 8, test 9
          [[4, 6, 5, 4]],              # train B 4 6 | val 5, test 4
          [[5, 4]]]                    # training only


def test_sr_gap_weights_and_session_boundaries():
    data = fake_data(SR_LOG, vocab_size=10)
    indptr, cols, vals = bl.sr_rules(data)
    row = lambda a: zip(cols[indptr[a]:indptr[a + 1]].tolist(), vals[indptr[a]:indptr[a + 1]].tolist())
    rules = {(a, c): v for a in range(10) for c, v in row(a)}
    # 4 -> 5 (gap 1), 4 -> 6 (gap 2: 1/2) in user 0's first session, 4 -> 6 (gap 1) in user 1's; 5 -> 6;
    # 7 -> 4; 5 -> 4. Not 6 -> 7 (across <eos> <bos>), not 4 -> 8 (8 is the validation target).
    assert rules == pytest.approx({(4, 5): 1.0, (4, 6): 1.5, (5, 6): 1.0, (7, 4): 1.0, (5, 4): 1.0})
    indptr, cols, vals = bl.sr_rules(data, steps=1)                # gap 1 only: 4 -> 6 from user 1 alone
    assert dict(zip(cols[indptr[4]:indptr[5]].tolist(), vals[indptr[4]:indptr[5]].tolist())) == {5: 1.0, 6: 1.0}

    score, logback = bl.sr_scorer(data), bl.log_backoff(data)
    assert evidence(score(*ctx(data, 0)), logback) == pytest.approx({5: 1.0, 6: 1.5})   # last page 4
    s = score(*ctx(data, 0, "test"))[0]                            # last page 8: no rule -> popularity
    assert torch.allclose(s[4:], torch.from_numpy(logback[4:]).float())
    # a context that ends with <bos>: the previous session's last page (6), which has no rule (6 -> 7 crosses)
    s = score(np.array([0]), np.array([0]), np.array([6]))        # tokens[:6] = B 4 5 6 E B
    assert torch.allclose(s[0, 4:], torch.from_numpy(logback[4:]).float())
    s = score(np.array([2]), data.offsets[2:3], data.offsets[2:3] + 2)   # user 2: B 5 -> rules of 5: 6 and 4 tie at 1
    assert s[0, 4] > s[0, 6] > s[0, 5]                             # tie broken by popularity (4 above 6)
    assert s.dtype == torch.float32 and s.shape == (1, 10)


# ----------------------------------------------------------------------------- SKNN / V-SKNN

KNN_LOG = [[[4, 5, 6, 7]],              # user 0 (queries): train B 4 5 | val 6, test 7; own session {4, 5}
           [[4, 5, 8, 11, 11]],         # user 1: training session {4, 5, 8} (the 11s are held out)
           [[5, 9, 11, 11]],            # user 2: {5, 9}
           [[4, 10, 9, 8, 11, 11]],     # user 3: {4, 8, 9, 10}
           [[6, 7]]]                    # user 4 (training only): {6, 7} shares no page with the query


def knn(data, k, weighted, users=(0,), **kw):
    users = np.array(users)
    kx = bl.knn_index(data)
    return bl.knn_scores(kx, data.tokens, users, data.offsets[users], data.val_pos[users], (k,), weighted, **kw)[0]


def test_transition_table_counts_training_successors():
    # the model's transition term: training (prev, next) pairs with <eos> as a target, not across the
    # validation target, each row's most frequent successors first (ties: lower id), cut at width
    data = fake_data(SR_LOG, vocab_size=10)
    nxt, count, p = bl.transition_table(data, 2)
    # B -> 4 twice, B -> 5, B -> 7; 4 -> 5, 4 -> 6, 4 -> E; 5 -> 6, 5 -> 4; 6 -> E; 7 -> 4 (not 4 -> 8)
    want = {B_: [(4, 2), (5, 1)], 4: [(E_, 1), (5, 1)], 5: [(4, 1), (6, 1)], 6: [(E_, 1)], 7: [(4, 1)]}
    for a in range(10):
        got = [(int(b), float(c)) for b, c in zip(nxt[a], count[a]) if c > 0]
        assert got == want.get(a, []), a
    assert nxt.dtype == np.int32 and count.shape == (10, 2)
    # popularity of the targets, add-one over <eos> and the pages: E 2, 4 4, 5 2, 6 2, 7 1, 8 0, 9 0
    assert p.tolist() == pytest.approx([0, 0, 0, 3 / 18, 5 / 18, 3 / 18, 3 / 18, 2 / 18, 1 / 18, 1 / 18])


def test_sknn_cosine_own_sessions_excluded_and_top_k():
    data = fake_data(KNN_LOG, vocab_size=12)
    s1, s2, s3 = 2 / math.sqrt(2 * 3), 1 / math.sqrt(2 * 2), 1 / math.sqrt(2 * 4)   # query {4, 5}
    e = knn(data, 3, False)[0]
    assert e[4:11] == pytest.approx([s1 + s3, s1 + s2, 0, 0, s1 + s3, s2 + s3, s3])
    e = knn(data, 2, False)[0]                                     # top-2: users 1 and 2
    assert e[4:11] == pytest.approx([s1, s1 + s2, 0, 0, s1, s2, 0])
    e = knn(data, 1, False)[0]                                     # user 0's own {4, 5} (cosine 1) is not a neighbour
    assert e[4:11] == pytest.approx([s1, s1, 0, 0, s1, 0, 0])
    # sampling: the 2 most recent sessions sharing a page (users 3 and 2), whatever k
    e = knn(data, 10, False, sample_size=2)[0]
    assert e[4:11] == pytest.approx([s3, s2, 0, 0, s3, s2 + s3, s3])
    # the scorer: log of the evidence, pages without any far below in popularity order
    s = bl.sknn_scorer(data, k=3)(*ctx(data, 0))
    want = {4: s1 + s3, 5: s1 + s2, 8: s1 + s3, 9: s2 + s3, 10: s3}
    assert evidence(s, bl.log_backoff(data)) == pytest.approx(want, rel=1e-6)
    assert s[0, 4] != s[0, 8]                                      # equal evidence, broken by popularity


def test_vsknn_position_weights():
    data = fake_data(KNN_LOG, vocab_size=12)
    # query B 4 5: 5 is the last event (weight 1), 4 the one before (0.9); similarity = shared weight / 2
    s1, s2, s3 = (1 + 0.9) / 2, 1 / 2, 0.9 / 2
    e = knn(data, 3, True)[0]
    assert e[4:11] == pytest.approx([s1 + s3, s1 + s2, 0, 0, s1 + s3, s2 + s3, s3])
    e = knn(data, 2, True)[0]
    assert e[4:11] == pytest.approx([s1, s1 + s2, 0, 0, s1, s2, 0])
    # a longer query: B 4 5 8 9 10 11 12 13 14 15 4 (11 events) keeps the last 10, 4 at its latest visit
    u = [[[4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 4, 6, 7]], [[5, 4, 16, 16]], [[4, 17, 16, 16]]]
    data = fake_data(u, vocab_size=18)
    qrow, qpage, qage = bl.session_queries(data.tokens, np.flatnonzero(data.tokens == B_), data.offsets[:1],
                                           data.val_pos[:1], 18)
    assert dict(zip(qpage.tolist(), qage.tolist())) == {4: 0, 15: 1, 14: 2, 13: 3, 12: 4, 11: 5, 10: 6, 9: 7, 8: 8,
                                                        5: 9}
    e = knn(data, 5, True)[0]                      # user 1 {4, 5}: (1 + 0.1) / 10; user 2 {4, 17}: 1 / 10
    assert e[[4, 5, 17]] == pytest.approx([0.11 + 0.1, 0.11, 0.1])


def test_knn_query_of_a_new_session_and_remind():
    # user 0: B 4 5 E B 6 7: the validation target 6 opens a session, its context ends with <bos>
    data = fake_data([[[4, 5], [6, 7]], [[4, 8, 11, 11]], [[5, 9, 11, 11]]], vocab_size=12)
    e = knn(data, 10, False)[0]                                    # context ends with <bos>: query = {4, 5}
    c = 1 / math.sqrt(2 * 2)
    assert e[[4, 5, 8, 9]] == pytest.approx([c, c, c, c])
    kx = bl.knn_index(data)
    keep, drop = bl.knn_scores(kx, data.tokens, np.array([0]), data.offsets[:1], data.val_pos[:1], (10,), False,
                               reminds=(True, False))
    assert np.array_equal(keep, e[None]) and drop[0, [4, 5]].tolist() == [0, 0] and drop[0, 8] == e[8]
    drop2, keep2 = bl.knn_scores(kx, data.tokens, np.array([0]), data.offsets[:1], data.val_pos[:1], (10,), False,
                                 reminds=(False, True))
    assert np.array_equal(drop2, drop) and np.array_equal(keep2, keep)


def reference_knn(data, u, cs, ce, k, weighted, sample_size, qlen=10):
    """SKNN / V-SKNN of one context, straight from the definitions (slow loops)."""
    tok = data.tokens.astype(np.int64)
    le = ce - 1
    while le >= cs and not (tok[le] == UNK or tok[le] >= 4):
        le -= 1
    out = np.zeros(data.vocab_size)
    if le < cs:
        return out
    first = le
    while tok[first - 1] != B_:
        first -= 1
    q = {}
    for age, pos in enumerate(range(le, max(first, le - qlen + 1) - 1, -1)):
        if tok[pos] >= 4 and int(tok[pos]) not in q:
            q[int(tok[pos])] = 1 - age / qlen if weighted else 1.0
    bos = np.flatnonzero(tok == B_)
    owner = np.searchsorted(data.offsets, bos, side="right") - 1
    cands = []
    for s in range(len(bos) - 1, -1, -1):                          # most recent first
        end = min(bos[s + 1] if s + 1 < len(bos) else len(tok), data.train_end[owner[s]])
        pages = {int(t) for t in tok[bos[s] + 1:end] if t >= 4}
        if owner[s] != u and pages & set(q):
            cands.append((s, pages))
    sims = []
    for s, pages in cands[:sample_size]:
        shared = sum(w for p, w in q.items() if p in pages)
        sims.append((shared / len(q) if weighted else shared / math.sqrt(len(q) * len(pages)), s, pages))
    sims.sort(key=lambda x: (-x[0], -x[1]))
    for sim, _, pages in sims[:k]:
        for p in pages:
            out[p] += sim
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_knn_matches_reference_with_duplicates_and_chunks(weighted, monkeypatch):
    rng = np.random.default_rng(1)
    V = 10
    data = fake_data(random_users(rng, 60, V) + [[[UNK, 4, 5, 6]]], vocab_size=V)
    monkeypatch.setattr(bl, "CHUNK", 50)                           # many chunks
    for split in ("val", "test"):
        users, cs, ce, _ = data_mod.eval_examples(data, split)
        rows = np.r_[np.arange(len(users)), np.arange(len(users))]   # every query twice: the shared path too
        kx = bl.knn_index(data)
        for sample_size in (3, 500):
            got = bl.knn_scores(kx, data.tokens, users[rows], cs[rows], ce[rows], (2, 5), weighted, sample_size)
            for i, r in enumerate(rows):
                for k, g in zip((2, 5), got):
                    want = reference_knn(data, users[r], cs[r], ce[r], k, weighted, sample_size)
                    assert g[i] == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------- recency

def test_recency_decay_and_ages():
    # user 0: B 4 5 <unk> 4 6 | val 7, test 8: ages 6:0 4:1 <unk>:2 5:3 4:4
    data = fake_data([[[4, 5, UNK, 4, 6, 7, 8]], [[9, 9, 9]]], vocab_size=10)
    s = bl.recency_scorer(data, decay=0.5)(*ctx(data, 0))[0].double()
    r = {6: 1.0, 4: 0.5 + 0.5 ** 4, 5: 0.5 ** 3}
    for p, v in r.items():
        assert s[p].item() == pytest.approx(math.log(v), abs=1e-6)
    p_pop = bl.popularity(data)
    floor = math.log(min(r.values())) - 1.0
    for p in (7, 8, 9):                                            # never visited: below, by popularity
        assert s[p].item() == pytest.approx(floor + math.log(p_pop[p] / p_pop[4:].max()), abs=1e-5)
    # ages run across sessions, counting page events only
    data = fake_data([[[4, 5], [6, 7, 8, 9]]], vocab_size=10)
    s = bl.recency_scorer(data, decay=0.9)(*ctx(data, 0))[0].double()   # B 4 5 E B 6 7: ages 7:0 6:1 5:2 4:3
    assert s[[7, 6, 5, 4]].tolist() == pytest.approx([0.0, math.log(0.9), math.log(0.81), math.log(0.729)], abs=1e-6)
    # an old page visited often overtakes a recent one only with a slow decay
    data = fake_data([[[4, 4, 4, 4, 5, 6, 7]]], vocab_size=8)
    for decay, first in ((0.3, 5), (0.95, 4)):
        s = bl.recency_scorer(data, decay)(*ctx(data, 0))[0]
        assert int(s[4:].argmax()) + 4 == first


# ----------------------------------------------------------------------------- float32 ties

def test_ordered32_keeps_float64_order_and_popularity_ties():
    rng = np.random.default_rng(0)
    row = np.sort(rng.integers(0, 6, 400))
    val = rng.choice([1.0, 1.0 + 1e-12, 1.0 + 1e-9, 2.5, -3.0, -3.0 - 1e-13, 0.0, 1e-30, 300.0], 400)
    tie = rng.integers(0, 3, 400).astype(np.float64)
    out = bl.ordered32(row, val, tie)
    assert out.dtype == np.float32 and np.abs(out - val).max() < 1e-4
    same = row[:, None] == row[None, :]                            # order holds within a row
    less = (val[:, None] < val[None, :]) | ((val[:, None] == val[None, :]) & (tie[:, None] < tie[None, :]))
    equal = (val[:, None] == val[None, :]) & (tie[:, None] == tie[None, :])
    assert np.array_equal((out[:, None] < out[None, :]) & same, less & same)
    assert np.array_equal((out[:, None] == out[None, :]) & same, equal & same)


def test_evidence_ndcg_matches_ranking_of_the_scores():
    rng = np.random.default_rng(3)
    V = 30
    e = np.where(rng.random((50, V)) < 0.3, rng.integers(1, 4, (50, V)) / 7.0, 0.0)
    e[:, :4] = 0
    tie = rng.random(V)
    tie[:4] = 0
    targets = rng.integers(0, V, 50)
    s = bl.evidence_scores(e, np.log(1e-6 * np.maximum(tie, 1e-300)), tie)
    assert np.allclose(bl.evidence_ndcg(e, targets, tie), bl.ndcg10(s, targets))
    ex = ev.rank_metrics(s, torch.from_numpy(targets))             # and evaluate's own ranking maths
    assert np.allclose(bl.ndcg10(s, targets), ev.ndcg_at(ex["rank"].numpy()) if hasattr(ev, "ndcg_at") else
                       np.where(ex["rank"].numpy() < 10, 1 / np.log2(np.minimum(ex["rank"].numpy(), 10) + 2), 0))


# ----------------------------------------------------------------------------- validation choices

def test_choose_k_picks_the_best_on_validation():
    # user 0's context is B 4 (val target 5). The most recent pool session {4, 5} holds the target;
    # ten older {4, 6} outweigh it as soon as k > 1: k = 1 ranks 5 second (behind 4), k = 11 third.
    users = [[[4, 5, 7]]] + [[[4, 6]]] * 10 + [[[4, 5]]]
    data = fake_data(users, vocab_size=8)
    k, table = bl.choose_k(data, grid=(1, 11))
    assert k == 1 and table[1] == pytest.approx(1 / math.log2(3)) and table[11] == pytest.approx(1 / math.log2(4))
    (k, remind), table = bl.choose_knn(data, True, grid=(1, 11))  # remind=False: 4 out, 5 first with k = 1
    assert (k, remind) == (1, False) and table[(1, False)] == pytest.approx(1.0)


def test_choose_decay_picks_the_best_on_validation():
    # every context is B a a a a b: the target is a (the old, frequent page) -> a slow decay wins;
    # in the mirrored log the target is b (the last one) -> a fast decay wins
    old = [[[4, 4, 4, 4, 5, 4, 6]], [[6, 6, 6, 6, 7, 6, 4]]]
    new = [[[4, 4, 4, 4, 5, 5, 6]], [[6, 6, 6, 6, 7, 7, 4]]]
    best, table = bl.choose_decay(fake_data(old, vocab_size=8), grid=(0.3, 0.95))
    assert best == 0.95 and table[0.95] == pytest.approx(1.0) and table[0.3] == pytest.approx(1 / math.log2(3))
    best, table = bl.choose_decay(fake_data(new, vocab_size=8), grid=(0.3, 0.95))
    assert best == 0.3 and table[0.3] == pytest.approx(1.0)


def test_strong_baselines_on_a_prepared_log_choose_once_on_validation(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    lines = ["user,page"] + [f"u{u},p{p}" for u in range(40) for p in rng.integers(0, 9, size=rng.integers(2, 9))]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    data_mod.prepare(str(tmp_path / "log.csv"), str(tmp_path / "d"))
    data = data_mod.load_data(str(tmp_path / "d"))
    calls = []
    real = bl.grid_ndcg
    monkeypatch.setattr(bl, "grid_ndcg", lambda d, *a, **kw: calls.append(a[0]) or real(d, *a, **kw))
    scorers = bl.strong_baselines(data)
    assert list(scorers) == ["most-popular", "markov", "sr", "sknn", "v-sknn", "recency"]
    assert len(calls) == 3                                         # sknn, v-sknn, recency
    for split in ("val", "test"):
        res = ev.evaluate(data, split, bl.strong_baselines(data), batch_size=7)
        assert all(0.0 <= m["ndcg@10"] <= 1.0 for m in res.values())
    assert len(calls) == 3                                         # cached: chosen once, on validation
    c = bl.validation_choices(data)
    assert c["sknn"][0][0] in bl.K_GRID and c["recency"][0] in bl.DECAY_GRID
    users, cs, ce, _ = data_mod.eval_examples(data, "test")
    for name, f in scorers.items():
        s = f(users, cs, ce)
        assert s.dtype == torch.float32 and s.shape[-1] == data.vocab_size and torch.isfinite(s[:, 4:]).all(), name
