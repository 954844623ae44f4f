"""search.py: successive halving picks the clearly best candidate, swaps folders, stores every
candidate, resumes after a kill; the plan fits the budget; the one-standard-error rule."""
import json
import os

import numpy as np
import pytest
import torch

import search
import train
from data import make_builtin


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'shop')
    make_builtin(path, n_users=300)
    return path


def config(data_dir, out_dir, **kw):
    cfg = dict(train.DEFAULTS, data_dir=data_dir, out_dir=str(out_dir), max_iters=40, eval_interval=5,
               log_interval=5, batch_tokens=256, n_layer=1, n_embd=16, n_head=1, eval_users=100,
               dtype='float32', time_budget=0.0, final_eval=False, patience=0)
    cfg.update(kw)
    return cfg


class Scripted(train.Run):
    """A real run (data, model, steps, checkpoints) whose validation score is scripted: dropout 0.25
    is clearly best, whatever the iteration; every user gains alike (per-user scores)."""
    calls = []

    def validate(self):
        Scripted.calls.append((self.cfg['dropout'], self.iter_num))
        value = 0.5 - abs(self.cfg['dropout'] - 0.25) + 1e-4 * self.iter_num
        improved = self.best_val is None or value > self.best_val
        if improved:
            self.best_val, self.best_iter = value, self.iter_num
            self.best_users = (value + np.linspace(-0.1, 0.1, 50)).tolist()
        self.progress.update(nll=0.0, iter=self.iter_num)
        return improved


def test_search_keeps_the_clearly_best_candidate_and_trains_it_on(small_data, tmp_path):
    Scripted.calls = []
    run, stop = search.run(config(small_data, tmp_path), Scripted)
    assert stop is None and run.iter_num == 40 and run.cfg['dropout'] == 0.25
    state = json.load(open(tmp_path / 'stage1' / 'search.json'))
    assert [t['name'].split(',')[0] for t in state['trials']] == ['dropout 0.1', 'dropout 0.25', 'dropout 0.5']
    assert state['winner'] == 1 and state['phase'] == 'final' and state['b'] == 20   # 1/2 of 40 fits (no budget)
    assert all(t['iters'] == 20 for i, t in enumerate(state['trials']) if i != 1)    # losers stop at rung 0
    ckpt = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['dropout'] == 0.25 and ckpt['iter_num'] == 40
    assert [t['best'] for t in ckpt['search']['trials']] == [t['best'] for t in state['trials']]
    assert os.path.isfile(tmp_path / 'stage1' / 'search' / 'c0' / 'stage1' / 'best.pt')   # the rules' run, kept
    assert not os.path.isfile(tmp_path / 'stage1' / 'search' / 'c1' / 'stage1' / 'ckpt.pt')  # moved to the run
    assert 'dropout 0.25' in search.summary(state) and '<- chosen' in search.summary(state)


def test_a_killed_search_resumes_where_it_stopped(small_data, tmp_path):
    class Killed(Scripted):
        def fit(self, pause_at=None):
            if self.cfg['dropout'] == 0.5:
                raise KeyboardInterrupt   # killed while the last candidate trains
            return super().fit(pause_at)
    with pytest.raises(KeyboardInterrupt):
        search.run(config(small_data, tmp_path), Killed)
    Scripted.calls = []
    run, stop = search.run(config(small_data, tmp_path, init_from='resume'), Scripted)
    assert run.cfg['dropout'] == 0.25 and run.iter_num == 40
    trained = {d for d, it in Scripted.calls}
    assert 0.5 in trained and all(it > 20 for d, it in Scripted.calls if d == 0.25)   # 0.25 was not trained again
    again = dict(config(small_data, tmp_path / 'b'))
    Scripted.calls = []
    run2, _ = search.run(again, Scripted)
    for k, v in run.raw_model.state_dict().items():   # a seed reproduces it, kill or not
        torch.testing.assert_close(v, run2.raw_model.state_dict()[k])


def test_explicit_settings_are_not_searched(small_data):
    stats = {'users': 300, 'eval_users': 290, 'pages': 400, 'train_tokens': 9000, 'train_events': 8000,
             'len_p50': 30.0, 'len_p90': 300.0, 'session_len': 7.0, 'repeat_rate': 0.4}
    cfg = dict(train.DEFAULTS)
    assert len(search.candidates(cfg, stats)) == 6                 # 3 dropouts x 2 contexts
    assert search.candidates(cfg, stats)[0][1] == {}               # the rules' settings first
    assert len(search.candidates(dict(cfg, dropout=0.1), stats)) == 2
    assert search.candidates(dict(cfg, dropout=0.1, block_size=64), stats) == [('dropout 0.1, block_size 64', {})]
    assert not search.applies(dict(cfg, dropout=0.1, block_size=64))
    assert not search.applies(dict(cfg, search=False)) and not search.applies(dict(cfg, stage=2))


def test_the_plan_fits_the_budget():
    # 3 candidates, 1,000 iterations of 0.1 s (100 s alone): the losers may take 200 s at most
    assert search.plan(3, 1000, 50, 0.1, 0) == 500                 # no budget: at most twice the run's cost
    assert search.plan(6, 1000, 50, 0.1, 0) == 250                 # 4 x 250 + 750 = 1,750 iterations: 175 s
    assert search.plan(3, 1000, 50, 0.1, 600) == 500
    assert search.plan(3, 1000, 50, 0.1, 160) == 250               # 60 s of room: 2 losers x 250 x 0.1 = 50 s
    assert search.plan(3, 1000, 50, 0.1, 110) is None              # no room: the rules alone
    assert search.rungs(6, 100, 1000) == [(100, 2), (300, 1)]
    assert search.loser_iters(6, 100, 1000) == 4 * 100 + 300


def test_one_standard_error_rule():
    users = {0: [0.5] * 100, 1: list(0.5 + np.tile([0.3, -0.28], 50))}   # +0.01 on average, noisy
    assert search.one_se_winner({0: 0.50, 1: 0.51}, users, False)[0] == 0
    users[1] = [0.6] * 100                                                # +0.1 for every user
    assert search.one_se_winner({0: 0.50, 1: 0.60}, users, False)[0] == 1
    assert search.one_se_winner({0: 2.0, 1: 1.9}, {}, True)[0] == 1      # lower is better, no per-user values


def test_train_with_the_search_end_to_end(small_data, tmp_path):
    cfg = dict(train.DEFAULTS, data_dir=small_data, out_dir=str(tmp_path), max_iters=20, eval_interval=5,
               log_interval=5, batch_tokens=256, n_layer=1, n_embd=16, n_head=1, eval_users=100,
               dtype='float32', time_budget=0.0)
    assert cfg['search'] and search.applies(cfg)
    results = train.train(cfg)
    assert len(results['search']['trials']) == 3 and results['search']['winner'] in (0, 1, 2)
    assert 'test' in results and 'val' in results
