"""model.py: causality, right padding, loss only at real targets."""
import contextlib
import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    idx = torch.randint(4, 37, (3, 12))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 7:] = torch.randint(4, 37, (3, 5))
    logits2, _ = model(changed)
    assert torch.allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:], atol=1e-3)


def test_right_padding_leaves_real_positions_unchanged():
    model = tiny()
    idx = torch.randint(4, 37, (1, 6))
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    a, _ = model(idx)
    b, _ = model(padded)
    assert torch.allclose(a, b[:, :6], atol=1e-6)


def test_loss_is_cross_entropy_over_real_targets_only():
    model = tiny()
    idx = torch.randint(4, 37, (2, 8))
    targets = torch.randint(4, 37, (2, 8))
    targets[0, 5:] = -1
    targets[1, 0] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (int((targets != -1).sum()), 37)
    full, _ = model(idx)
    expected = F.cross_entropy(full.view(-1, 37), targets.view(-1), ignore_index=-1)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_weights_are_tied_and_decay_only_on_matrices():
    model = tiny()
    assert model.transformer.wte.weight is model.lm_head.weight
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay['params']) and decay['weight_decay'] == 0.1
    assert all(p.dim() < 2 for p in no_decay['params']) and no_decay['weight_decay'] == 0.0


def test_flops_per_token_follows_nanogpt_formula():
    model = tiny()
    n = model.get_num_params()
    assert model.estimate_flops_per_token(T=10) == 6 * n + 12 * 2 * 32 * 10


def test_loss_is_zero_not_nan_without_weighted_targets():
    model = tiny()
    idx = torch.randint(4, 37, (2, 5))
    _, loss = model(idx, torch.full((2, 5), -1))
    assert loss.item() == 0.0
    w = torch.ones(37)
    w[10:] = 0.0                                   # tail_weight = 0 and a batch of tail targets only
    _, loss = model(idx, torch.full((2, 5), 20), class_weight=w)
    assert loss.item() == 0.0
    _, loss = model(idx, torch.full((2, 5), 5), class_weight=w)
    assert loss.item() > 0


def test_one_parameter_set_is_the_plain_gpt_and_loads_its_checkpoints():
    torch.manual_seed(0)
    a = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32))
    torch.manual_seed(0)
    b = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, n_clusters=1))
    idx = torch.randint(4, 37, (3, 10))
    a.eval(), b.eval()
    assert torch.equal(a(idx)[0], b(idx)[0])
    assert torch.equal(a(idx)[0], b(idx, cluster_ids=torch.zeros(3, dtype=torch.long))[0])
    assert set(a.state_dict()) == {k for k in a.state_dict() if not k.startswith('_orig_mod.')}
    assert 'transformer.wte.weight' in a.state_dict() and a.transformer.wte.weight.dim() == 2


@pytest.mark.parametrize('scope', ['all', 'blocks', 'norms'])
def test_mixed_cluster_batch_equals_each_cluster_alone(scope):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, n_clusters=3,
                          cluster_scope=scope)).eval()
    for mod in model.modules():   # distinct per-set LayerNorm gains ('norms' mixes them row by row)
        if type(mod).__name__ == 'LayerNorm':
            torch.nn.init.normal_(mod.weight)
    idx = torch.randint(4, 37, (6, 9))
    cids = torch.tensor([2, 0, 1, 2, 0, 0])
    mixed, _ = model(idx, cluster_ids=cids)
    for r in range(6):
        alone, _ = model(idx[r:r + 1], cluster_ids=cids[r:r + 1])
        torch.testing.assert_close(mixed[r:r + 1], alone, rtol=1e-5, atol=1e-5)
    # each set really is a separate model: copying set 1 into a plain GPT reproduces its rows
    if model.page_bias is not None:
        torch.nn.init.normal_(model.page_bias)
        mixed, _ = model(idx, cluster_ids=cids)
    plain = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32)).eval()
    sd = model.state_dict()
    state = {k: (sd[k][1] if sd[k].dim() > v.dim() else sd[k]) for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    bias = 0 if model.page_bias is None else model.page_bias[1]
    torch.testing.assert_close(plain(idx[2:3])[0] + bias, mixed[2:3], rtol=1e-5, atol=1e-5)
    # the loss path (logits only at real targets) agrees with the full logits, mixed clusters too
    targets = torch.randint(4, 37, (6, 9))
    targets[:, ::3] = -1
    logits, loss = model(idx, targets, cluster_ids=cids)
    torch.testing.assert_close(logits, mixed[targets != -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='cluster_ids'):
        model(idx)


def test_single_model_is_sized_to_the_clusterwise_parameter_count():
    from hetlm import count_params, matched_single_config
    for K, scope in [(4, 'all'), (3, 'blocks'), (8, 'all')]:
        cfg = GPTConfig(block_size=64, vocab_size=438, n_layer=2, n_head=2, n_embd=64, n_clusters=K, cluster_scope=scope)
        single, ratio = matched_single_config(cfg)
        assert single.n_clusters == 1 and single.n_embd > 64 and single.n_embd % 2 == 0
        assert abs(count_params(single) / count_params(cfg) - 1) < 0.02 and abs(ratio - 1) < 0.02


def random_terms(m):
    """m with random page biases, repeat weights and transition table, where it has them."""
    if m.page_bias is not None:
        torch.nn.init.normal_(m.page_bias)
    if m.repeat_w is not None:
        torch.nn.init.normal_(m.repeat_w)
    if m.trans_w is not None:
        with_table(m)
    return m


@pytest.mark.parametrize("K,scope,repeat,trans", [(1, 'all', False, 0), (3, 'all', False, 0), (3, 'blocks', False, 0),
                                                   (3, 'norms', False, 0), (1, 'all', True, 0), (3, 'all', True, 0),
                                                   (3, 'norms', True, 0), (1, 'all', True, 6), (3, 'blocks', False, 6)])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(K, scope, repeat, trans, monkeypatch):
    import model as M
    monkeypatch.setattr(M, "LOSS_CHUNK", 2000 * 16)     # 16 rows per chunk: several chunks per set
    m = random_terms(tiny(vocab_size=2000, n_clusters=K, cluster_scope=scope, repeat_bias=repeat,
                          transitions=trans).train())
    idx = torch.randint(0, 30, (4, 16)) if repeat else torch.randint(4, 2000, (4, 16))   # revisits, specials
    tgt = torch.randint(4, 2000, (4, 16))
    tgt[1, 9:] = -1
    cid = torch.tensor([0, 1, 2, 1]) % K
    for kw in ({}, dict(class_weight=torch.rand(2000), logit_bias=0.1 * torch.randn(2000))):
        grads = []
        for full in (True, False):
            m.zero_grad()
            logits, loss = m(idx, tgt, cluster_ids=cid, return_logits=full, **kw)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
            assert (logits is None) != full
        assert abs(grads[0][0] - grads[1][0]) < 1e-5
        for a, b in zip(grads[0][1], grads[1][1]):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("K,scope,repeat,trans", [(1, 'all', True, 0), (3, 'all', True, 0), (3, 'norms', True, 0),
                                                   (2, 'blocks', False, 0), (1, 'all', True, 4), (3, 'norms', False, 4)])
def test_sampled_softmax_over_every_page_is_the_full_softmax(K, scope, repeat, trans):
    # with every page in the sample once and no correction (offsets 0), the sampled loss is the full
    # cross-entropy: same loss and gradients, weights, stage 2's logit bias, page biases and the
    # repeat and transition terms included
    m = random_terms(tiny(vocab_size=300, n_clusters=K, cluster_scope=scope, repeat_bias=repeat, repeat_decay=repeat,
                          transitions=trans).train())
    idx = torch.randint(0, 30, (4, 16))
    tgt = torch.randint(4, 30, (4, 16))
    tgt[1, 9:] = -1
    cid = torch.tensor([0, 1, 2, 1]) % K
    every = (torch.cat([torch.arange(300), torch.zeros(5, dtype=torch.long)]),   # + padding columns
             torch.cat([torch.zeros(300), torch.full((5,), -float('inf'))]))
    for kw in ({}, dict(class_weight=torch.rand(300), logit_bias=0.1 * torch.randn(300))):
        runs = []
        for neg in (None, every):
            m.zero_grad()
            _, loss = m(idx, tgt, cluster_ids=cid, return_logits=False, negatives=neg, **kw)
            loss.backward()
            runs.append((loss.detach(), m.last_nll, [p.grad.clone() for p in m.parameters()]))
        assert abs(runs[0][0] - runs[1][0]) < 1e-5 and abs(runs[0][1] - runs[1][1]) < 1e-5
        for a, b in zip(runs[0][2], runs[1][2]):
            assert torch.allclose(a, b, atol=1e-6)


def test_sampled_softmax_in_bf16_is_the_fp32_loss_to_rounding():
    # under bf16 autocast the chunked loss pads rows to whole chunks: the padding must not count
    from model import draw_negatives, sampling_weights
    import numpy as np
    m = random_terms(tiny(vocab_size=300, repeat_bias=True, repeat_decay=True, transitions=4).train())
    idx, tgt = torch.randint(0, 30, (4, 16)), torch.randint(4, 300, (4, 16))
    tgt[1, 9:] = -1
    neg = draw_negatives(sampling_weights(np.ones(300)), 64, torch.Generator().manual_seed(0))
    runs = []
    for ctx in (contextlib.nullcontext(), torch.autocast('cpu', dtype=torch.bfloat16)):
        m.zero_grad()
        with ctx:
            _, loss = m(idx, tgt, return_logits=False, negatives=neg)
        loss.backward()
        runs.append((loss.item(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])))
    assert abs(runs[0][0] - runs[1][0]) < 0.02 * abs(runs[0][0])
    assert torch.nn.functional.cosine_similarity(runs[0][1], runs[1][1], dim=0) > 0.99


def test_draw_negatives_importance_weights():
    # each page once, padded to m columns; sum over columns of exp(offset) * x[page] estimates sum(x)
    from model import draw_negatives
    q = torch.tensor([0.0, 0.5, 0.3, 0.2])
    g = torch.Generator().manual_seed(0)
    pages, offsets = draw_negatives(q, 3, g)
    real = torch.isfinite(offsets)
    assert len(pages) == 3 and torch.equal(pages[real], torch.unique(pages[real])) and 0 not in pages[real].tolist()
    assert (pages[~real] == 0).all()
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    est = [float((offsets.exp() * x[pages]).sum()) for pages, offsets in (draw_negatives(q, 3, g) for _ in range(4000))]
    assert abs(sum(est) / len(est) - 6.0) < 0.1                      # unbiased: 1 + 2 + 3


def brute_repeat(w, idx, b, i, V):
    """The repeat term of row b's position i, from its definition: each page in idx[b, :i + 1] gets
    w[bucket of the age of its latest visit] + w[-1] * log(visits); specials get nothing."""
    import math
    from model import age_bucket
    z = torch.zeros(V)
    for page in set(idx[b, :i + 1].tolist()):
        if page < 4:
            continue
        at = [j for j in range(i + 1) if idx[b, j] == page]
        z[page] = w[int(age_bucket(torch.tensor(i - at[-1] + 1)))] + w[-1] * math.log(len(at))
    return z


def test_repeat_term_by_age_of_latest_visit_and_visits():
    from model import age_bucket
    assert age_bucket(torch.tensor([1, 2, 3, 4, 5, 8, 9, 16, 17, 256, 257, 512, 513, 10 ** 6])).tolist() == \
        [0, 1, 2, 3, 4, 4, 5, 5, 6, 9, 10, 10, 11, 11]
    m = tiny(repeat_bias=True)
    torch.nn.init.normal_(m.repeat_w)
    idx = torch.randint(0, 12, (3, 14))                          # many revisits, some specials and pads
    with torch.no_grad():
        logits, _ = m(idx)
        plain = m.head(m.hidden_states(idx))
        at = torch.tensor([[13, 5], [0, 7], [3, 12]])
        z = m.add_sparse(plain[torch.arange(3)[:, None], at], idx, at)
    for b in range(3):
        for i in range(14):
            assert torch.allclose(logits[b, i] - plain[b, i], brute_repeat(m.repeat_w.detach(), idx, b, i, 37), atol=1e-5)
        for n in range(2):
            assert torch.allclose(z[b, n], logits[b, at[b, n]], atol=1e-5)
    assert not tiny().state_dict().keys() & {'repeat_w'}          # off: the model of older checkpoints


def with_table(m, seed=1):
    """A random transition table for m (set_transitions), some rows shorter than the width, and
    random weights of the term."""
    g = torch.Generator().manual_seed(seed)
    V, S = m.config.vocab_size, m.config.transitions
    nxt = torch.stack([torch.randperm(V - 3, generator=g)[:S] + 3 for _ in range(V)]).int()   # <eos> and pages
    count = torch.randint(0, 4, (V, S), generator=g).float()
    p = torch.rand(V, generator=g)
    p[:3] = 0.0
    m.set_transitions(nxt, count, p / p.sum())
    with torch.no_grad():
        m.trans_w.copy_(torch.randn(m.trans_w.shape, generator=g))
    return m


def brute_transition(m, a, target=None):
    """The transition term after token a, from its definition: each successor b with count c (one
    less if b is the training target) gets w0 log(1 + c / (beta p(b))) + w[2 + bucket(c)]."""
    import math
    from model import age_bucket
    w, z = m.trans_w.detach(), torch.zeros(m.config.vocab_size)
    p = m.trans_logpop.exp()
    for b, c in zip(m.trans_next[a].tolist(), m.trans_count[a].tolist()):
        c -= b == target
        if c > 0:
            z[b] += w[0] * math.log1p(c / (math.exp(w[1]) * p[b])) + w[2 + int(age_bucket(torch.tensor(int(c))))]
    return z


def test_transition_term_against_its_definition_and_leave_one_out():
    m = with_table(tiny(transitions=5, repeat_bias=True))
    idx = torch.randint(0, 37, (3, 14))
    tgt = torch.randint(3, 37, (3, 14))
    tgt[2, 10:] = -1
    with torch.no_grad():
        logits, _ = m(idx)
        h = m.head(m.hidden_states(idx))
        rep = m.repeat_terms(idx)
        plain = h.scatter_add(-1, rep[0], rep[1])                     # the repeat term alone
        at = torch.tensor([[13, 5], [0, 7], [3, 12]])
        z = m.next_logits(idx, at)
        held, _ = m(idx, tgt)                                         # training targets: leave-one-out
    keep = tgt != -1
    for b in range(3):
        for i in range(14):
            assert torch.allclose(logits[b, i] - plain[b, i], brute_transition(m, int(idx[b, i])), atol=1e-5)
        for n in range(2):
            assert torch.allclose(z[b, n], logits[b, at[b, n]], atol=1e-5)
    rows = [(b, i) for b in range(3) for i in range(14) if keep[b, i]]
    for r, (b, i) in enumerate(rows):
        want = plain[b, i] + brute_transition(m, int(idx[b, i]), int(tgt[b, i]))
        assert torch.allclose(held[r], want, atol=1e-5)
    assert not tiny().state_dict().keys() & {'trans_w', 'trans_next'}   # off: the model of older checkpoints


def test_transition_term_learns_the_chain_the_embeddings_cannot():
    # one step of training moves the term's weight up when targets follow the table
    m = with_table(tiny(transitions=3, vocab_size=37), seed=2).train()
    with torch.no_grad():
        m.trans_w.zero_()
    idx = torch.randint(3, 37, (8, 16))
    tgt = m.trans_next[idx, 0].long()                                 # each target its token's first successor
    m.trans_count[:, 0] += 5                                          # seen before: its count stays >= 5
    _, loss = m(idx, tgt, return_logits=False)
    loss.backward()
    assert m.trans_w.grad[0] < 0                                      # the descent raises the weight


def test_repeat_decay_adds_the_log_of_decayed_visits():
    """repeat_decay: + v * log(sum over the page's visits k <= i of gamma^(i - k)), gamma = sigmoid(theta);
    against the definition, and the chunked loss's gradient against the full logits'."""
    import math
    m = tiny(repeat_bias=True, repeat_decay=True)
    torch.nn.init.normal_(m.repeat_w)
    with torch.no_grad():
        m.repeat_d.copy_(torch.tensor([0.7, 0.9]))
    idx = torch.randint(0, 12, (3, 14))
    gamma, v = torch.sigmoid(m.repeat_d[0]).item(), m.repeat_d[1].item()
    with torch.no_grad():
        logits, _ = m(idx)
        plain = m.head(m.hidden_states(idx))
    for b in range(3):
        for i in range(14):
            want = brute_repeat(m.repeat_w.detach(), idx, b, i, 37)
            for page in set(idx[b, :i + 1].tolist()) - {0, 1, 2, 3}:
                want[page] += v * math.log(sum(gamma ** (i - k) for k in range(i + 1) if idx[b, k] == page))
            assert torch.allclose(logits[b, i] - plain[b, i], want, atol=1e-5)
    m.train()
    tgt = torch.randint(4, 37, (3, 14))
    grads = []
    for full in (True, False):
        m.zero_grad()
        m(idx, tgt, return_logits=full)[1].backward()
        grads.append(m.repeat_d.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_repeat_term_in_the_bf16_chunked_loss_with_padding_rows(monkeypatch):
    """Under bf16 autocast the chunked loss pads rows to LOW_PRECISION_ROWS; the repeat term's pages
    and values are padded with them: loss and gradients near fp32's."""
    m = tiny(vocab_size=300, repeat_bias=True, repeat_decay=True).train()
    torch.nn.init.normal_(m.repeat_w)
    idx = torch.randint(0, 40, (3, 16))
    tgt = torch.randint(4, 300, (3, 16))
    tgt[0, 10:] = -1                                     # 38 rows: not a multiple of the padding
    out = []
    for bf16 in (False, True):
        m.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            _, loss = m(idx, tgt, return_logits=False)
        loss.backward()
        out.append((loss.item(), m.repeat_w.grad.clone(), m.repeat_d.grad.clone()))
    assert abs(out[0][0] - out[1][0]) < 0.02
    assert torch.allclose(out[0][1], out[1][1], atol=2e-3) and torch.allclose(out[0][2], out[1][2], atol=2e-3)


def test_repeat_decay_needs_the_repeat_term():
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="repeat_decay=True needs repeat_bias=True"):
        tiny(repeat_decay=True)


def test_repeat_term_learns_never_again_and_again():
    """On a log where the next page is never one already seen, the repeat offsets go negative; where it
    is always the page before last, that age's offset goes up."""
    for rule, sign in (('never', -1), ('again', 1)):
        m = tiny(vocab_size=40, repeat_bias=True).train()
        opt = m.configure_optimizers(0.0, 1e-2, (0.9, 0.95), 'cpu')
        g = torch.Generator().manual_seed(0)
        for _ in range(60):
            if rule == 'never':
                idx = torch.stack([torch.randperm(36, generator=g)[:16] + 4 for _ in range(8)])
            else:   # a b a b ...: the next page is the one two steps back
                ab = torch.randint(4, 40, (8, 2), generator=g)
                idx = ab.repeat(1, 8)
            _, loss = m(idx[:, :-1], idx[:, 1:], return_logits=False)
            opt.zero_grad()
            loss.backward()
            for group in opt.param_groups:
                group['lr'] = 1e-2 * group.get('lr_scale', 1.0)
            opt.step()
        w = m.repeat_w.detach()
        assert sign * w[1] > 0.3, (rule, w)                   # age 2: the page before last


def test_warm_start_copies_one_set_into_every_set():
    from runtime import expand_state
    one = tiny()
    many = tiny(n_clusters=3)
    many.load_state_dict(expand_state(one.state_dict(), many))
    idx = torch.randint(4, 37, (3, 8))
    a, _ = one(idx)
    b, _ = many(idx, cluster_ids=torch.tensor([0, 1, 2]))
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        expand_state(tiny(n_embd=16).state_dict(), many)


def test_dtype_auto_picks_bf16_only_with_amx_or_avx512_bf16(monkeypatch):
    import runtime as M
    assert M.pick_dtype('float32', 'cpu')[0] == 'float32'
    monkeypatch.setattr(M, 'cpu_flags', lambda: {'avx512f', 'avx2'})
    assert M.pick_dtype('auto', 'cpu')[0] == 'float32'
    monkeypatch.setattr(M, 'cpu_flags', lambda: {'avx512f', 'amx_bf16'})
    assert M.pick_dtype('auto', 'cpu') == ('bfloat16', 'the CPU has amx_bf16')
    monkeypatch.setattr(M, 'cpu_flags', lambda: set())
    assert M.pick_dtype('auto', 'cpu')[0] == 'float32'


@pytest.mark.parametrize("K,scope", [(1, 'all'), (3, 'all'), (3, 'norms')])
def test_last_position_only_scores_as_the_whole_window(K, scope):
    # next_logits(last=True) (generation over full windows) runs the last block at the last position
    # only: the same scores as the whole window, to rounding
    m = random_terms(tiny(vocab_size=50, n_clusters=K, cluster_scope=scope, repeat_bias=True, repeat_decay=True))
    idx = torch.randint(4, 50, (5, 16))
    at = torch.full((5, 1), 15)
    cid = torch.tensor([0, 1, 2, 1, 0]) % K if K > 1 else None
    full, last = m.next_logits(idx, at, cid), m.next_logits(idx, at, cid, last=True)
    assert last.shape == full.shape == (5, 1, 50) and torch.allclose(full, last, atol=1e-5)
