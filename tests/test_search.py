"""search.py: successive halving picks the clearly best candidate, swaps folders, stores every
candidate, resumes after a kill; the plan fits the budget; the one-standard-error rule."""
import json
import os

import numpy as np
import pytest
import torch

import search
import train
from shop import make_builtin


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
    trials = tmp_path / 'stage1' / 'search'
    assert os.path.isfile(trials / 'c1' / 'stage1' / 'best.pt')           # the rules' run, moved out and kept
    assert not os.path.isfile(trials / 'c2' / 'stage1' / 'ckpt.pt')       # the winner's: moved to the run
    assert not any(os.path.isfile(trials / c / 'stage1' / 'ckpt.pt') for c in ('c1', 'c3'))  # losers' optimizers go
    assert 'dropout 0.25' in search.summary(state) and '<- chosen' in search.summary(state)
    # a new run in the folder (--overwrite=True) starts a new search: the old candidates are not resumed
    Scripted.calls = []
    run, _ = search.run(config(small_data, tmp_path, overwrite=True), Scripted)
    assert min(it for d, it in Scripted.calls if d == 0.5) == 5 and run.cfg['dropout'] == 0.25


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
    assert search.plan(6, 1000, 50, 0.1, 0) == 100                 # 1/8 on a validation: 3 x 100 + 2 x 300 its
    assert search.plan(3, 1000, 50, 0.1, 600) == 500
    assert search.plan(3, 1000, 50, 0.1, 160) == 250               # 60 s of room: 2 losers x 250 x 0.1 = 50 s
    assert search.plan(3, 1000, 50, 0.1, 110) is None              # no room: the rules alone
    assert search.rungs(6, 100, 1000) == [(100, 2, 3), (300, 1, 1)]   # (iteration, best kept, going on at worst)
    assert search.loser_iters(6, 100, 1000) == 3 * 100 + 2 * 300    # the rules' settings may go on as a third
    assert search.loser_iters(3, 100, 1000) == 2 * 100


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


def test_a_search_killed_while_the_winner_moves_in_finishes_the_move(small_data, tmp_path):
    run, _ = search.run(config(small_data, tmp_path, max_iters=20), Scripted)
    weights = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    stage, path = tmp_path / 'stage1', tmp_path / 'stage1' / 'search.json'
    state = json.load(open(path))
    # undo the second half of the move, as a kill after the rules' files left would: winner still in c2
    os.makedirs(stage / 'search' / 'c2' / 'stage1', exist_ok=True)
    for f in ('ckpt.pt', 'best.pt'):
        os.replace(stage / f, stage / 'search' / 'c2' / 'stage1' / f)
    state['phase'] = 'swap'
    json.dump(state, open(path, 'w'))
    Scripted.calls = []
    again, stop = search.run(config(small_data, tmp_path, max_iters=20, init_from='resume'), Scripted)
    assert again.iter_num == 20 and again.cfg['dropout'] == 0.25 and Scripted.calls == []   # nothing retrained
    for k, v in again.raw_model.state_dict().items():
        torch.testing.assert_close(v, weights[k])
    assert json.load(open(path))['phase'] == 'final'


def test_the_budget_bounds_the_losers(small_data, tmp_path, monkeypatch):
    # a budget the rules' candidate alone nearly fills: no other candidate may start
    class NoReplan(Scripted):
        def fit_time_budget(self, sec_per_iter):
            pass                      # the rules' candidate keeps its plan (we test the search's guard)
    monkeypatch.setattr(search, 'plan', lambda *a: 20)
    Scripted.calls = []
    run, _ = search.run(config(small_data, tmp_path, time_budget=1e-4), NoReplan)
    state = json.load(open(tmp_path / 'stage1' / 'search.json'))
    assert all(not t['alive'] and t['why'] == 'no time left in the budget' for t in state['trials'][1:])
    assert state['winner'] == 0 and {d for d, _ in Scripted.calls} == {0.1}


def test_the_rules_settings_go_on_to_the_last_rung(small_data, tmp_path, monkeypatch):
    six = [('rules', {})] + [(f"dropout {d}", {'dropout': d}) for d in (0.15, 0.2, 0.25, 0.3, 0.5)]
    monkeypatch.setattr(search, 'candidates', lambda cfg, stats: six)
    monkeypatch.setattr(search, 'plan', lambda *a: 10)          # rungs at 10 and 30 of 40
    run, _ = search.run(config(small_data, tmp_path), Scripted)
    state = json.load(open(tmp_path / 'stage1' / 'search.json'))
    assert [t['iters'] for t in state['trials']] == [30, 10, 30, 30, 10, 10]   # 0.2 and 0.25 best at rung 0
    assert state['winner'] == 3 and run.cfg['dropout'] == 0.25 and run.iter_num == 40
