"""evaluate.py: ranking math, baselines, batched model scoring, tables. Tiny hand-made data only."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines as bl
import evaluate as ev

B_, E_ = 2, 3  # <bos>, <eos>


class Data:
    """A prepared dataset's arrays, as data.BehaviorData holds them; hashable and weak-referenceable
    like it, so baselines.py's per-dataset cache works on it too."""
    def __init__(self, **kw):
        self.__dict__.update(kw)


def fake_data(users, vocab_size, anchor_ids=(4,)):
    """users: list of users, each a list of sessions (lists of page ids >= 4, or 1 for <unk>). Builds the arrays of
    a prepared dataset as data.py lays them out: <bos> p.. <eos> per session, leave-last-out."""
    tokens, offsets, val_pos, test_pos, train_end = [], [0], [], [], []
    for sessions in users:
        start, page_pos = len(tokens), []
        for s in sessions:
            tokens.append(B_)
            for p in s:
                page_pos.append(len(tokens))
                tokens.append(p)
            tokens.append(E_)
        offsets.append(len(tokens))
        if len(page_pos) >= 3:
            val_pos.append(page_pos[-2]); test_pos.append(page_pos[-1]); train_end.append(page_pos[-2])
        else:
            val_pos.append(-1); test_pos.append(-1); train_end.append(len(tokens))
    a = lambda x: np.array(x, dtype=np.int64)
    return Data(tokens=np.array(tokens, dtype=np.uint32), offsets=a(offsets), val_pos=a(val_pos),
                test_pos=a(test_pos), train_end=a(train_end), vocab_size=vocab_size,
                n_users=len(users), anchor_ids=a(anchor_ids))


def random_data(n_users, vocab_size, seed):
    rng = np.random.default_rng(seed)
    users = [[list(rng.integers(4, vocab_size, size=rng.integers(1, 9))) for _ in range(rng.integers(1, 4))]
             for _ in range(n_users)]
    return fake_data(users, vocab_size)


# ----------------------------------------------------------------------------- ranking math

def test_rank_metrics_matches_brute_force_with_ties_and_unk():
    g = torch.Generator().manual_seed(0)
    B, V = 64, 13
    scores = torch.randint(0, 5, (B, V), generator=g).float()      # few values: many ties
    targets = torch.randint(4, V, (B,), generator=g)
    targets[::7] = 1                                                # <unk>
    targets[3], targets[5] = 0, 2                                   # other specials: misses too
    scores[:, :4] = 10.0                                            # specials outscore all: must not count
    r = ev.rank_metrics(scores, targets)
    for b in range(B):
        s, t = scores[b].tolist(), int(targets[b])
        if t < 4:
            assert math.isinf(r["rank"][b]) and math.isnan(r["logp"][b])
        else:
            assert r["rank"][b] == sum(1 for j in range(4, V) if s[j] > s[t])
            logz = math.log(sum(math.exp(s[j]) for j in range(4, V)))
            assert r["logp"][b].item() == pytest.approx(s[t] - logz, abs=1e-5)
        best = max(s[4:])
        assert int(r["pred"][b]) == 4 + s[4:].index(best)          # first page among the maxima
    # a (1, V) row shared by every example takes the sort-once path: same answers as the (B, V) path
    shared, full = ev.rank_metrics(scores[:1], targets), ev.rank_metrics(scores[:1].expand(B, -1), targets)
    assert torch.equal(shared["rank"], full["rank"]) and torch.equal(shared["pred"], full["pred"])
    assert torch.allclose(shared["logp"], full["logp"], equal_nan=True)


def test_ndcg_mrr_hr_formulas_on_hand_ranks():
    rank = np.array([0, 1, 4, 9, np.inf])
    ex = dict(rank=rank, logp=np.array([-1.0, -2.0, -3.0, -4.0, np.nan]), target=np.array([4, 5, 6, 7, 1]),
              pred=np.array([4, 9, 9, 7, 4]), user=np.arange(5))
    m = ev.summarize(ex, anchor_ids=[4, 5])
    assert m["hr@1"] == pytest.approx(1 / 5) and m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@10"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 0) / 5)
    assert m["nll"] == pytest.approx(2.5)                          # <unk> excluded
    assert m["unk"] == pytest.approx(0.2) and m["n"] == 5
    assert m["acc_anchor"] == pytest.approx(0.5)                   # targets 4 (hit), 5 (miss)
    assert m["acc_tail"] == pytest.approx(1 / 3)                   # 6 miss, 7 hit, <unk> miss


def test_per_user_stats():
    ex = dict(rank=np.array([0.0, 20.0, 3.0, np.inf]), logp=np.array([-1.0, -3.0, -2.0, np.nan]),
              user=np.array([7, 2, 5, 9]))
    s = ev.per_user_stats(ex)
    assert s["users"] == 4
    assert s["nll_mean"] == pytest.approx(2.0) and s["nll_std"] == pytest.approx(np.std([1, 2, 3]))
    assert s["nll_p10"] == pytest.approx(1.2) and s["nll_p90"] == pytest.approx(2.8)
    assert s["hr@10_mean"] == pytest.approx(0.5) and s["hr@10_p10"] == pytest.approx(0.0)
    # two targets for one user are averaged into one per-user figure
    ex2 = dict(rank=np.array([0.0, 20.0]), logp=np.array([-1.0, -3.0]), user=np.array([1, 1]))
    s2 = ev.per_user_stats(ex2)
    assert s2["users"] == 1 and s2["nll_mean"] == pytest.approx(2.0) and s2["hr@10_mean"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- baselines

HAND = [[[4, 5, 6], [4, 5]],        # B 4 5 6 E B 4 5 E : val 4, test 5; train B->4 4->5 5->6
        [[5, 6, 7, 4]],             # B 5 6 7 4 E      : val 7, test 4; train B->5 5->6
        [[4, 6]]]                   # training only    : B->4 4->6


def test_popularity_and_markov_counts_and_backoff():
    data = fake_data(HAND, vocab_size=8)
    prev, nxt = bl.train_transitions(data)
    assert sorted(zip(prev.tolist(), nxt.tolist())) == sorted([(2, 4), (4, 5), (5, 6), (2, 5), (5, 6), (2, 4), (4, 6)])
    pop = bl.popularity(data)                                       # counts 4:2 5:2 6:3 7:0, add-one
    assert np.allclose(pop, [0, 0, 0, 0, 3 / 11, 3 / 11, 4 / 11, 1 / 11])
    score = bl.markov_scorer(data, beta=1.0)
    # prev = <bos>: c(B,4)=2, c(B,5)=1, c(B)=3
    p = score(np.array([0]), np.array([0]), np.array([1])).exp()[0]       # context = [<bos>]
    assert p[4].item() == pytest.approx((2 + 3 / 11) / 4) and p[7].item() == pytest.approx((1 / 11) / 4)
    # prev = 4: c(4,5)=1, c(4,6)=1; prev = 7: never seen -> back-off to popularity exactly
    p = score(np.array([0, 1]), np.array([0, 9]), np.array([2, 13])).exp()   # tokens[1]=4, tokens[12]=7
    assert p[0, 5].item() == pytest.approx((1 + 3 / 11) / 3) and p[0, 6].item() == pytest.approx((1 + 4 / 11) / 3)
    assert torch.allclose(p[1], torch.tensor(pop, dtype=torch.float32))
    assert torch.allclose(p.sum(1), torch.ones(2)) and (p[:, :4] == 0).all()   # specials never scored
    res = ev.evaluate_baselines(data, "test")
    mk = res["markov"]["examples"]
    # user 0 test: prev 4, target 5 -> 6 scores higher -> rank 1; user 1 test: prev 7 (unseen) -> pop: 4 behind 6
    assert mk["user"].tolist() == [0, 1] and mk["rank"].tolist() == [1.0, 1.0]
    assert res["most-popular"]["examples"]["pred"].tolist() == [6, 6]


def test_markov_sparse_with_vocab_over_65535():
    V = 70_000
    data = fake_data([[[69_999, 4, 69_999, 5]], [[69_999, 4, 6]]], vocab_size=V)
    score = bl.markov_scorer(data)
    s = score(np.array([0]), np.array([0]), np.array([2]))          # prev = 69_999: train has 69_999 -> 4 once
    assert s.shape == (1, V) and int(s[0, 4:].argmax()) + 4 == 4
    # user 0 val: prev 4 unseen -> popularity (69_999 twice) -> hit; user 1 val: 69_999 -> 4 -> hit
    r = ev.evaluate_baselines(data, "val")["markov"]
    assert r["n"] == 2 and r["hr@1"] == 1.0 and r["examples"]["pred"].tolist() == [69_999, 4]


def test_eval_set_subset_is_fixed_and_evaluate_restores_user_order():
    data = random_data(40, 12, seed=1)
    users = ev.eval_set(data, "val")[0]
    a = ev.eval_set(data, "val", max_users=10, seed=3)[0]
    assert len(a) == 10 and np.array_equal(a, ev.eval_set(data, "val", max_users=10, seed=3)[0])
    assert set(a) <= set(users)
    scorers = {"markov": bl.markov_scorer(data)}
    ex = ev.evaluate(data, "test", scorers, batch_size=3)["markov"]["examples"]   # many batches, sorted
    assert np.array_equal(ex["user"], ev.eval_set(data, "test")[0])
    assert np.array_equal(ex["target"], data.tokens[data.test_pos[ex["user"]]].astype(np.int64))
    one = ev.evaluate(data, "test", scorers, batch_size=1000)["markov"]["examples"]
    assert np.array_equal(one["rank"], ex["rank"]) and np.allclose(one["logp"], ex["logp"])
    assert np.array_equal(one["pred"], ex["pred"])
    # a big vocabulary shrinks the batch so the (B, V) scores stay bounded; results are unchanged
    sizes = []
    scorer = scorers["markov"]
    tracked = {"markov": lambda u, cs, ce: (sizes.append(len(u)), scorer(u, cs, ce))[1]}
    old, ev.EVAL_LOGITS = ev.EVAL_LOGITS, 2 * data.vocab_size
    try:
        small = ev.evaluate(data, "test", tracked, batch_size=1000)["markov"]["examples"]
    finally:
        ev.EVAL_LOGITS = old
    assert max(sizes) == 2 and np.array_equal(small["rank"], ex["rank"])


# ----------------------------------------------------------------------------- model scoring

class StandIn(torch.nn.Module):
    """hidden state at t = mean embedding of tokens <= t (causal, like a GPT); head adds a per-cluster bias."""
    def __init__(self, V, C=6):
        super().__init__()
        self.emb = torch.nn.Embedding(V, C)
        self.out = torch.nn.Linear(C, V)

    def hidden_states(self, idx, cluster_ids=None, last=False):
        x = self.emb(idx).cumsum(1)                                  # (B, T, C)
        x = x / torch.arange(1, idx.size(1) + 1).view(1, -1, 1)
        return x[:, -1:] if last else x

    def head(self, h, cluster_ids=None):
        logits = self.out(h)
        if cluster_ids is not None:
            bump = torch.nn.functional.one_hot(cluster_ids + 4, logits.size(-1))       # (B, V) per row
            logits = logits + 3.0 * bump.view(len(cluster_ids), *[1] * (logits.dim() - 2), -1)
        return logits

    def sparse_terms(self, idx, at=None, targets=None):
        return None                                                  # no repeat or transition term

    def next_logits(self, idx, at, cluster_ids=None, rows=None):
        from model import GPT
        return GPT.next_logits(self, idx, at, cluster_ids, rows)     # the GPT's own reader


def one_at_a_time(model, data, split, block_size, clusters=None):
    users, cs, ce, _ = ev.eval_set(data, split)
    rows = []
    for i in range(len(users)):
        c = None if clusters is None else clusters[users[i:i + 1]]
        rows.append(ev.model_scores(model, data, cs[i:i + 1], ce[i:i + 1], block_size, "cpu", c))
    return torch.cat(rows)


@pytest.mark.parametrize("which", ["standin", "gpt"])
def test_model_scores_batched_sorted_equals_one_at_a_time(which):
    torch.manual_seed(0)
    data = random_data(30, 16, seed=2)
    block_size = 8                                                  # some contexts are longer: truncation
    clusters = None
    if which == "gpt":
        model_mod = pytest.importorskip("model")
        model = model_mod.GPT(model_mod.GPTConfig(block_size=block_size, vocab_size=16, n_layer=2, n_head=2, n_embd=16,
                                                  repeat_bias=True))
        with torch.no_grad():
            model.repeat_w.copy_(torch.randn(model.repeat_w.shape))   # a repeat term that changes the ranking
    else:
        model = StandIn(16)
        clusters = np.random.default_rng(0).integers(0, 3, size=data.n_users)
    model.train()
    ref = one_at_a_time(model, data, "test", block_size, clusters)   # (N, V)
    m = ev.evaluate_model(model, data, "test", block_size, "cpu", batch_size=7, clusters=clusters)
    assert model.training                                           # evaluation restores the mode
    _, _, _, targets = ev.eval_set(data, "test")
    r = ev.rank_metrics(ref, torch.from_numpy(targets))
    assert np.array_equal(m["examples"]["rank"], r["rank"].numpy())
    assert np.allclose(m["examples"]["logp"], r["logp"].numpy(), atol=1e-5)
    assert np.array_equal(m["examples"]["pred"], r["pred"].numpy())
    # truncation keeps the LAST block_size tokens: same logits as feeding them alone
    users, cs, ce, _ = ev.eval_set(data, "test")
    i = int(np.argmax(ce - cs))
    assert ce[i] - cs[i] > block_size
    c = None if clusters is None else clusters[users[i:i + 1]]
    x = torch.from_numpy(data.tokens[ce[i] - block_size:ce[i]].astype(np.int64))[None]
    with torch.no_grad():
        direct = model.head(model.eval().hidden_states(x, None if c is None else torch.from_numpy(c))[:, -1],
                            None if c is None else torch.from_numpy(c))
        rep = model.sparse_terms(x, torch.tensor([[block_size - 1]]))   # the pages already in the context
        if rep is not None:
            direct = direct.scatter_add(1, rep[0][:, 0], rep[1][:, 0])
    assert torch.allclose(ref[i:i + 1], direct, atol=1e-5)
    # logit adjustment: ranks by logits - tau * log prior; several taus from one pass give the same
    # metrics as one call per tau
    prior = ev.log_prior(data)
    r1 = ev.rank_metrics(ref - 1.0 * prior, torch.from_numpy(targets))
    many = ev.evaluate_model(model, data, "test", block_size, "cpu", batch_size=7, clusters=clusters,
                             logit_adjust=[0.0, 1.0, 2.0])
    assert np.array_equal(many[1.0]["examples"]["rank"], r1["rank"].numpy())
    for tau in (0.0, 2.0):
        one = ev.evaluate_model(model, data, "test", block_size, "cpu", batch_size=7, clusters=clusters,
                                logit_adjust=tau)
        assert np.array_equal(one["examples"]["rank"], many[tau]["examples"]["rank"])
        assert one["hmean"] == many[tau]["hmean"] or (math.isnan(one["hmean"]) and math.isnan(many[tau]["hmean"]))


def test_format_table_has_every_row_and_n():
    data = fake_data(HAND, vocab_size=8)
    res = ev.evaluate_baselines(data, "val")
    res["model"] = res["markov"]
    table = ev.format_table(res)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "hr@1", "hr@5", "hr@10"] and "acc_tail" in lines[0]
    for name in ("most-popular", "markov", "model"):
        assert any(line.startswith(name) for line in lines)
    assert "n=2 examples" in lines[-1]
    assert len({len(line) for line in lines[:-1]}) == 1             # aligned


def test_cli_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main([f"--ckpt={tmp_path}/nope.pt"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "checkpoint not found" in err and err.count("\n") == 1


def test_counts_agree_with_prepared_tokenizer(tmp_path):
    data_mod = pytest.importorskip("data")
    lines = ["u1 a", "u1 b", "u1 a", "u1 c", "u2 b", "u2 a", "u3 a", "u3 b", "u3 c", "u3 a"]
    src = tmp_path / "pairs.txt"
    src.write_text("\n".join(lines) + "\n")
    data_mod.prepare(str(src), str(tmp_path / "d"), fmt="pairs")
    data = data_mod.load_data(str(tmp_path / "d"))
    counts = np.asarray(data.tokenizer.counts, dtype=np.float64)
    _, nxt = bl.train_transitions(data)
    assert np.array_equal(np.bincount(nxt, minlength=data.vocab_size)[4:], counts[4:])
    users, cs, ce, tg = ev.eval_set(data, "test")
    assert all(np.array_equal(x, y) for x, y in zip((users, cs, ce, tg), data_mod.eval_examples(data, "test")))


def test_paired_bootstrap_against_brute_force():
    """The interval of the paired bootstrap against every one of the n^n equally likely resamples."""
    import itertools
    a, b = np.array([0.9, 0.2, 0.5, 1.0, 0.0]), np.array([0.3, 0.4, 0.5, 0.0, 0.1])
    d = a - b
    exact = np.array([d[list(idx)].mean() for idx in itertools.product(range(5), repeat=5)])  # 3,125 resamples
    diff, lo, hi = ev.paired_bootstrap(a, b, n_boot=100_000, seed=3)
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(np.percentile(exact, 2.5), abs=0.02)
    assert hi == pytest.approx(np.percentile(exact, 97.5), abs=0.02)
    # the same resample for both methods: a constant shift has no spread at all
    assert ev.paired_bootstrap(a + 0.1, a, n_boot=200)[1:] == pytest.approx((0.1, 0.1))
    # chunked draws give the same interval as one big draw (same generator stream, rows in order)
    assert ev.paired_bootstrap(a, b, 500, seed=1, chunk=7) == ev.paired_bootstrap(a, b, 500, seed=1)


def test_compare_reports_ratio_and_interval():
    rank_model, rank_base = np.array([0.0, 1.0, 20.0, 0.0]), np.array([3.0, 1.0, 0.0, np.inf])
    g = ev.compare({"examples": {"rank": rank_model}}, {"examples": {"rank": rank_base}}, n_boot=200)
    a, b = ev.ndcg_at(rank_model), ev.ndcg_at(rank_base)
    assert g["model"] == pytest.approx(a.mean()) and g["ratio"] == pytest.approx(a.mean() / b.mean())
    assert g["low"] <= g["diff"] <= g["high"] and g["users"] == 4
    assert "no clear difference" in ev.gain_line("gpt", "markov", g)


def test_drop_first_scores_the_context_without_its_second_token():
    model_mod = pytest.importorskip("model")
    torch.manual_seed(0)
    data = random_data(20, 16, seed=3)
    block = 64                                                       # no context is cut: every one qualifies
    model = model_mod.GPT(model_mod.GPTConfig(block_size=block, vocab_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    users, cs, ce, _ = ev.eval_set(data, "test")
    got = ev.model_scores(model, data, cs, ce, block, "cpu", drop_first=1)
    for i in range(len(users)):
        ctx = np.asarray(data.tokens[cs[i]:ce[i]], dtype=np.int64)
        if len(ctx) > 2:
            ctx = np.concatenate([ctx[:1], ctx[2:]])
        with torch.no_grad():
            want = model.head(model.hidden_states(torch.from_numpy(ctx)[None])[:, -1])
        torch.testing.assert_close(got[i], want[0].float(), rtol=1e-4, atol=1e-5)
