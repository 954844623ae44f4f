"""sample.py: history parsing, greedy = argmax, continuations stop at <eos>, clear errors."""
import os

import pytest
import torch

import sample
from configurator import ConfigError
from model import GPT, GPTConfig
from tokenizer import BOS, EOS, UNK, PageTokenizer


@pytest.fixture
def ckpt_dir(tmp_path):
    torch.manual_seed(0)
    tok = PageTokenizer.from_counts({'home': 5, 'search': 3, 'item': 2})
    args = dict(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16, dropout=0.0)
    model = GPT(GPTConfig(**args))
    torch.save({'model': model.state_dict(), 'model_args': args, 'iter_num': 3,
                'config': {'data_dir': str(tmp_path / 'no-data')},
                'tokenizer': {'pages': tok.pages, 'counts': tok.counts.tolist()}}, tmp_path / 'best.pt')
    return tmp_path


def test_parse_and_encode_history_keeps_last_session_open():
    tok = PageTokenizer.from_counts({'home': 5, 'search': 3})
    sessions = sample.parse_history('home, search;\nhome nowhere')
    assert sessions == [['home', 'search'], ['home', 'nowhere']]
    ids, unknown = sample.encode_history(sessions, tok)
    assert ids == [BOS, 4, 5, EOS, BOS, 4, UNK] and unknown == ['nowhere']


def test_greedy_generation_is_argmax_and_stops_at_eos(ckpt_dir):
    from runtime import load_checkpoint
    model, _ = load_checkpoint(os.path.join(ckpt_dir, 'best.pt'))
    g = torch.Generator().manual_seed(0)
    ids = [BOS, 4]
    out = sample.generate(model, ids, 6, 0.0, 0, g, 'cpu')
    expected, ctx = [], list(ids)  # replay: each step is the argmax over non-special tokens or <eos>
    for _ in range(6):
        p = sample.next_page_probs(model, ctx, 'cpu')
        p[[0, 1, 2]] = -1
        nxt = int(p.argmax())
        if nxt == EOS:
            break
        expected.append(nxt)
        ctx.append(nxt)
    assert out == expected
    head = model.head  # make <eos> by far the most likely token: the session ends at once
    model.head = lambda h, cluster_ids=None: head(h) + 100 * torch.nn.functional.one_hot(
        torch.tensor(EOS), model.config.vocab_size)
    assert sample.generate(model, ids, 6, 0.0, 0, g, 'cpu') == []
    assert sample.generate(model, ids, 6, 1.0, 0, g, 'cpu') == []


def test_run_on_a_history_and_clear_errors(ckpt_dir, capsys):
    cfg = dict(sample.DEFAULTS, out_dir=str(ckpt_dir), history='home search', num_samples=2, top_k=3)
    sample.run(cfg)
    out = capsys.readouterr().out
    assert 'next page' in out and out.count('continuation') == 2
    with pytest.raises(ConfigError, match='no checkpoint'):
        sample.run(dict(cfg, out_dir=str(ckpt_dir / 'missing')))
    with pytest.raises(ConfigError, match='temperature'):
        sample.run(dict(cfg, temperature=-1.0))


def test_new_history_goes_to_the_set_with_the_lowest_nll():
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=8, vocab_size=12, n_layer=1, n_head=1, n_embd=16, n_clusters=3)).eval()
    ids = [BOS, 4, 7, 5, EOS, BOS, 9, 4]
    k, nll = sample.assign_cluster(model, ids, 'cpu')
    x = torch.tensor([ids])
    expected = []
    for c in range(3):  # page targets only (<eos>/<bos> are not behaviors); softmax over what may follow
        logits, _ = model(x[:, :-1], cluster_ids=torch.tensor([c]))   # a page or <eos>, not <pad>/<unk>/<bos>
        logits[..., [0, 1, 2]] = -float('inf')
        t = x[0, 1:]
        keep = t >= 4
        expected.append(float(torch.nn.functional.cross_entropy(logits[0][keep], t[keep]).detach()))
    assert nll == pytest.approx(expected, abs=1e-5)
    assert k == min(range(3), key=lambda c: expected[c])


def test_session_split_user_shows_the_real_next_session_and_scores(tmp_path, capsys):
    import train
    from shop import make_builtin
    from data import load_data
    make_builtin(str(tmp_path / 'd'), n_users=120, split='session')
    cfg = dict(train.DEFAULTS, data_dir=str(tmp_path / 'd'), out_dir=str(tmp_path / 'o'), max_iters=5, eval_interval=5,
               log_interval=5, batch_tokens=512, block_size=32, n_layer=1, n_embd=16, warmup_iters=1, eval_users=50,
               time_budget=0.0, dtype='float32', final_eval=False)
    train.train(cfg)
    data = load_data(str(tmp_path / 'd'))
    u = int(next(i for i in range(data.n_users) if data.test_pos[i] >= 0))
    real = data.tokenizer.decode([int(t) for t in data.tokens[data.test_pos[u]:data.offsets[u + 1] - 1]])
    capsys.readouterr()
    sample.run(dict(sample.DEFAULTS, out_dir=str(tmp_path / 'o' / 'stage1'), user=data.user_ids()[u], num_samples=2))
    out = capsys.readouterr().out
    assert 'before their held-out test session' in out
    assert f"real next session ({len(real)} pages): {' '.join(real)}" in out
    assert out.count('[F1 ') == 3 and '  greedy: ' in out    # greedy and two samples, each scored
