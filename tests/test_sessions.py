"""HeTLM's session task: the session split, the generation scores against hand-computed values,
outcome AUC against a brute-force pair count, Markov generation on a chain, the evaluate.py command."""
import itertools
import math

import numpy as np
import pytest
import torch

import sessions
from data import DataError, load_data, prepare
from tokenizer import BOS, EOS, UNK


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_session_split_on_a_hand_made_log(tmp_path):
    # seq lines with a `user:` prefix: one session each. u1 has 4 sessions, u2 has 3, u3 has 2 (training only)
    log = write(tmp_path / "log.seq", "u1: a b\nu2: a\nu1: b c d\nu3: a b\nu1: x\nu2: b b\nu1: c e\nu3: c\nu2: d a\n")
    meta = prepare(log, str(tmp_path / "d"), split="session")
    d = load_data(str(tmp_path / "d"))
    assert meta["split"] == "session" and d.split == "session" and meta["n_eval_users"] == 2
    dec = lambda a, b: d.tokenizer.decode([int(t) for t in d.tokens[a:b]])
    u1, u2, u3 = (d.user_index(u) for u in ("u1", "u2", "u3"))
    assert d.val_pos[u3] == -1 and d.test_pos[u3] == -1                   # 2 sessions: training only
    users, start, end = sessions.held_out(d, "val")
    got = {int(u): dec(a, b) for u, a, b in zip(users, start, end)}
    assert got[u1] == ["<unk>", "<eos>"] and got[u2] == ["b", "b", "<eos>"]  # the session before the last (x: unseen)
    users, start, end = sessions.held_out(d, "test")
    got = {int(u): dec(a, b) for u, a, b in zip(users, start, end)}
    assert got[u1] == ["c", "<unk>", "<eos>"] and got[u2] == ["d", "a", "<eos>"]  # e: never in training
    # u1's context and training data: its first two sessions, then the <bos> of the held-out one
    assert dec(d.offsets[u1], d.train_end[u1]) == ["<bos>", "a", "b", "<eos>", "<bos>", "b", "c", "d", "<eos>", "<bos>"]
    assert sorted(d.tokenizer.pages[4:]) == ["a", "b", "c", "d"]          # the vocabulary: training sessions only
    assert sorted(sessions.train_session_lengths(d).tolist()) == [1, 1, 2, 2, 3]


def test_session_split_needs_three_sessions(tmp_path):
    log = write(tmp_path / "log.seq", "u1: a b\nu1: c\nu2: a b c d\n")
    with pytest.raises(DataError, match="no user has 3 or more sessions"):
        prepare(log, str(tmp_path / "d"), split="session", require_eval=True)
    with pytest.raises(DataError, match="--split=rows"):
        prepare(log, str(tmp_path / "d"), split="rows")
    page = prepare(log, str(tmp_path / "p"))                              # the page split stays the default
    assert page["split"] == "page" and page["n_eval_users"] == 2


def test_held_out_refuses_a_page_split(tmp_path):
    prepare(write(tmp_path / "l.seq", "a b c d\n"), str(tmp_path / "d"))
    with pytest.raises(DataError, match="--split=session"):
        sessions.held_out(load_data(str(tmp_path / "d")), "test")


def test_generation_scores_by_hand():
    s = sessions.session_scores(["a", "b", "c", "a"], ["b", "a", "d"])
    # sets {a,b,c} vs {a,b,d}: 2 hits -> P 2/3, R 2/3; LCS of a b c a / b a d = 2 (b a) -> P 2/4, R 2/3
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["rouge_l"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s["len_err"] == 1
    empty = sessions.session_scores([], ["a"])
    assert empty == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "rouge_l": 0.0, "len_err": -1}
    assert sessions.lcs_length("ABCBDAB", "BDCABA") == 4                  # the textbook example
    assert sessions.lcs_length([1, 2, 3], [1, 2, 3]) == 3 and sessions.lcs_length([1], [2]) == 0
    sp = sessions.spread([1.0, 2.0, 3.0, 4.0, math.nan])
    assert sp["mean"] == 2.5 and sp["std"] == pytest.approx(np.std([1, 2, 3, 4])) and sp["p10"] == pytest.approx(1.3)


def test_auc_matches_a_brute_force_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        p = rng.integers(0, 5, n) / 4.0                                   # many ties
        y = rng.random(n) < 0.4
        if y.all() or not y.any():
            assert math.isnan(sessions.auc(p, y))
            continue
        pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(p[y], p[~y])]
        assert sessions.auc(p, y) == pytest.approx(np.mean(pairs))


def test_markov_generates_a_two_page_chain(tmp_path):
    # every session is `a b`: Markov learns <bos> -> a -> b -> <eos>; greedy generation repeats it
    prepare(write(tmp_path / "l.seq", "".join(f"u{u}: a b\n" for u in range(5) for _ in range(4))), str(tmp_path / "d"),
            split="session")
    d = load_data(str(tmp_path / "d"))
    a, b = d.tokenizer.page_id("a"), d.tokenizer.page_id("b")
    lp = sessions.markov_logp(d)
    probs = lp([[BOS], [a], [b]])[:, -1].exp()
    assert probs[0].argmax() == a and probs[1].argmax() == b and probs[2].argmax() == EOS
    assert torch.allclose(probs.sum(1), torch.ones(3))
    users = np.arange(3)
    gen = sessions.generate(lp, [[BOS]] * 3, users, 10, torch.Generator().manual_seed(0), temperature=0.0)
    assert gen == [[a, b]] * 3
    res = sessions.evaluate_sessions(d, "test", {"markov": lp}, progress=lambda *_: None)
    r = res["markov"]
    assert (r["greedy_f1"] == 1.0).all() and (r["greedy_rouge_l"] == 1.0).all() and (r["greedy_len_err"] == 0).all()
    # teacher-forced NLL of `a b <eos>` by hand: 2 training sessions per user, 10 in all, so each of
    # <bos>->a, a->b, b-><eos> is counted 10 times, and the add-one unigram over a, b, <eos> is 11/33 each
    expect = -3 * math.log((10 + 1 / 3) / (10 + 1))
    assert r["nll_session"] == pytest.approx(np.full(5, expect), rel=1e-5)


def test_evaluate_prints_the_session_task(tmp_path, capsys):
    import evaluate
    from shop import make_builtin
    make_builtin(str(tmp_path / "d"), n_users=150, split="session")
    evaluate.main(["--data_dir", str(tmp_path / "d"), "--baselines_only", "--split=test", "--outcome=purchase",
                   "--outcome_samples=3"])
    out = capsys.readouterr().out
    assert "session task (test sessions" in out and "markov p10" in out and "outcome 'purchase'" in out
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data_dir", str(tmp_path / "d"), "--baselines_only", "--outcome=nope"])
    assert e.value.code == 2 and "no such page" in capsys.readouterr().err


def test_model_session_nll_in_windows_matches_one_context_per_target(tmp_path):
    # a random GPT whose block holds every user's whole stream: each target's context is its full
    # history, so the windowed scoring must equal a forward pass per target; then a short block
    # (several windows per session) keeps every target and its count
    from model import GPT, GPTConfig
    from shop import make_builtin
    make_builtin(str(tmp_path / "d"), n_users=40, split="session")
    d = load_data(str(tmp_path / "d"))
    users, start, end = sessions.held_out(d, "test")
    users, start, end = users[:8], start[:8], end[:8]
    longest = int((np.asarray(d.offsets[1:]) - np.asarray(d.offsets[:-1])).max())
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=longest, vocab_size=d.vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    total, known, unk = sessions.session_nll(sessions.model_logp(model, "cpu"), d, users, start, end)
    masked = sessions.forbidden_mask(d.vocab_size)
    for i, u in enumerate(users):
        nll, n_unk = 0.0, 0
        for t in range(start[i], end[i]):
            if d.tokens[t] == UNK:                                        # pages unseen in training: skipped
                n_unk += 1
                continue
            x = torch.from_numpy(np.asarray(d.tokens[d.offsets[u]:t], dtype=np.int64))[None]
            with torch.no_grad():
                z = model(x)[0][0, -1].masked_fill(masked, -math.inf)
            nll -= float(torch.log_softmax(z, -1)[int(d.tokens[t])])
        assert total[i] == pytest.approx(nll, rel=1e-4) and known[i] == end[i] - start[i] - n_unk and unk[i] == n_unk
    model.config.block_size = 4                                           # windows of 2 targets
    total4, known4, _ = sessions.session_nll(sessions.model_logp(model, "cpu"), d, users, start, end)
    assert (known4 == known).all() and np.isfinite(total4).all() and not np.allclose(total4, total)


def test_train_on_a_session_split_picks_best_by_session_nll(tmp_path):
    import train
    from shop import make_builtin
    make_builtin(str(tmp_path / "d"), n_users=300, split="session")
    cfg = dict(train.DEFAULTS, data_dir=str(tmp_path / "d"), out_dir=str(tmp_path / "o"), max_iters=20, eval_interval=10,
               log_interval=10, batch_tokens=512, block_size=32, n_layer=1, n_embd=32, warmup_iters=5, eval_users=100,
               time_budget=0.0, dtype="float32")
    results = train.train(cfg)
    assert results["test_sessions"]["gpt (best.pt)"]["users"] > 0
    ckpt = torch.load(tmp_path / "o" / "stage1" / "best.pt", weights_only=True)
    assert ckpt["config"]["best_metric"] == "session_nll" and "session_nll" in ckpt["best_metrics"]


def test_a_history_with_no_page_to_score_goes_to_set_0():
    import math
    from cluster import pick_set
    nll = np.array([[math.nan, 2.0, 1.0], [math.nan, 0.5, 3.0]])   # (K, N): the first history has no page
    assert pick_set(nll).tolist() == [0, 1, 0]


def tiny_gpt(K=1, scope="all", V=30, block=12):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block, vocab_size=V, n_layer=2, n_head=2, n_embd=16, n_clusters=K,
                          cluster_scope=scope, repeat_bias=True, repeat_decay=True))
    with torch.no_grad():   # a repeat term that matters, and per-set weights that differ
        model.repeat_w.copy_(torch.randn(model.repeat_w.shape))
        model.repeat_d[1] = 0.7
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model.train()


@pytest.mark.parametrize("K,scope", [(1, "all"), (3, "all"), (2, "blocks"), (3, "norms")])
def test_cached_generation_scores_equal_the_uncached_ones(K, scope):
    # sessions.KVCache through sessions.model_logp's decoder: contexts of several lengths (some fill the
    # window within a few steps, so the uncached path takes over), rows dropping out, mixed sets
    model, rng = tiny_gpt(K, scope), np.random.default_rng(1)
    contexts = [[BOS] + rng.integers(4, 30, size=n).tolist() for n in (0, 3, 7, 9, 11, 5)]
    rows = np.arange(len(contexts))
    logp = sessions.model_logp(model, "cpu", rng.integers(0, K, size=len(contexts)))
    cached = logp.decoder(contexts, rows)
    seqs, active = [list(c) for c in contexts], list(rows)
    for step in range(8):
        want = logp([seqs[i] for i in active], rows[active])[:, -1]          # the whole window again
        got = cached()
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        assert torch.allclose(got[fin], want[fin], atol=1e-5), (step, (got[fin] - want[fin]).abs().max())
        keep = [j for j in range(len(active)) if not (step in (2, 5) and j == 1)]   # a row ends its session
        new = rng.integers(4, 30, size=len(keep)).tolist()
        for j, t in zip(keep, new):
            seqs[active[j]].append(t)
        active = [active[j] for j in keep]
        cached.advance(keep, new)
        for _, cache in cached.parts:   # the repeat term's statistics, kept a token at a time, are the window's
            nxt, visits, R = model.repeat_stats(cache.ids[:, :cache.block])
            for r in (cache.len <= cache.block).nonzero().flatten().tolist():
                n = int(cache.len[r])
                assert torch.equal(cache.stats[0][r, :n], nxt[r, :n]) and torch.equal(cache.stats[1][r, :n], visits[r, :n])
                assert torch.allclose(cache.stats[2][r, :n], R[r, :n], atol=1e-6)
    assert model.training                                                      # the mode is restored


def test_cached_greedy_generation_equals_the_uncached_loop():
    model = tiny_gpt(2, "all")
    clusters = np.array([0, 1, 1, 0])
    logp = sessions.model_logp(model, "cpu", clusters)
    plain = lambda contexts, rows=None, n_last=1: logp(contexts, rows, n_last)   # no decoder: no cache
    plain.rows_per_pass, plain.block = logp.rows_per_pass, logp.block
    contexts = [[BOS, 5, 6], [BOS, 7], [BOS] + list(range(4, 14)), [BOS, 9, 9, 9]]
    g = torch.Generator().manual_seed(0)
    a = sessions.generate(logp, contexts, np.arange(4), 15, g, temperature=0.0)
    b = sessions.generate(plain, contexts, np.arange(4), 15, g, temperature=0.0)
    assert a == b and max(len(x) for x in a) > 0
