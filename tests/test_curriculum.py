"""The BehaviorLM curriculum (curriculum.py, run by train.py): stage-1 class weights, the balanced stage-2 subset, stage 2
starting from stage 1, and the last-target-only batches of stage 2."""

import numpy as np
import pytest
import torch

import curriculum
import train
from shop import make_builtin
from data import get_batch, load_data, train_windows
from evaluate import classification_metrics


def test_balanced_subset_counts_and_difficulty_band():
    rng = np.random.default_rng(0)
    target = np.repeat([4, 5, 6, 7], [1000, 300, 40, 3])          # an anchor, then rarer and rarer
    difficulty = rng.random(len(target))
    keep = curriculum.balanced_subset(target, difficulty, per_behavior=50, band_low=0.5, band_high=1.0)
    counts = np.bincount(target[keep], minlength=8)
    assert counts[4] == 50 and counts[5] == 50                     # capped
    assert counts[6] == 40 and counts[7] == 3                      # rare behaviors keep all they have
    for page in (4, 5):                                             # drawn from the hard half only
        median = np.median(difficulty[target == page])
        assert difficulty[keep][target[keep] == page].min() >= median - 1e-3
    # the band is spread, not just the hardest 50
    hardest = np.sort(difficulty[target == 4])[-50:]
    assert difficulty[keep][target[keep] == 4].min() < hardest.min()
    upper = curriculum.balanced_subset(target, difficulty, 50, band_low=0.0, band_high=0.5)
    assert difficulty[upper][target[upper] == 4].max() <= np.median(difficulty[target == 4]) + 1e-3
    assert len(np.unique(keep)) == len(keep)


def test_class_weights_for_anchor_and_tail():
    data = type('D', (), {})()
    data.vocab_size = 8
    data.anchor_ids = np.array([4, 5])
    cfg = dict(train.DEFAULTS, tail_weight=0.25)
    w = curriculum.class_weights(cfg, data)
    assert w[4] == w[5] == w[3] == 1.0 and w[6] == w[7] == 0.25     # <eos> weighs as an anchor
    assert curriculum.class_weights(dict(cfg, tail_weight=1.0), data) is None  # plain cross-entropy


def test_last_only_batches_keep_one_target_per_row(tmp_path):
    path = str(tmp_path / 'shop')
    make_builtin(path, n_users=60)
    data = load_data(path)
    w = train_windows(data, 16)
    x, y = get_batch(data, w, np.arange(10), last_only=True)
    full_x, full_y = get_batch(data, w, np.arange(10))
    assert torch.equal(x, full_x)
    n_in = w[:10, 1] - w[:10, 0] - 1
    for r in range(10):
        kept = (y[r] != -1).nonzero().flatten().tolist()
        assert kept in ([], [int(n_in[r]) - 1])                     # at most the last real position
        if kept:
            assert y[r, kept[0]] == full_y[r, kept[0]]


def test_classification_metrics_by_hand():
    target = np.array([4, 4, 5, 6, 1])                              # 1 = <unk>: a miss, not a class
    pred = np.array([4, 5, 5, 5, 4])
    m = classification_metrics(pred, target, 8)
    # recall: page4 1/2, page5 1/1, page6 0/1 ; precision: page4 1/2, page5 1/3, page6 0
    assert m['macro_recall'] == pytest.approx((0.5 + 1 + 0) / 3)
    f1 = [2 * .5 * .5 / 1, 2 * (1 / 3) * 1 / (1 / 3 + 1), 0]
    assert m['macro_f1'] == pytest.approx(sum(f1) / 3)
    assert m['w_prec'] == pytest.approx((0.5 * 2 + (1 / 3) * 1 + 0) / 4)


def test_stage2_starts_from_stage1_and_lifts_the_tail(tmp_path, capsys):
    path = str(tmp_path / 'shop')
    make_builtin(path, n_users=500)
    common = dict(train.DEFAULTS, data_dir=path, out_dir=str(tmp_path / 'out'), eval_interval=100, log_interval=100,
                  block_size=32, n_layer=1, n_embd=32, eval_users=0)
    s1 = train.train(dict(common, max_iters=200))
    ckpt1 = torch.load(tmp_path / 'out' / 'stage1' / 'best.pt', weights_only=True)
    s2 = train.train(dict(common, stage=2, stage2_iters=100, band_low=0.0, prior_keep=0.0))
    ckpt2 = torch.load(tmp_path / 'out' / 'stage2' / 'best.pt', weights_only=True)
    assert ckpt2['model_args'] == ckpt1['model_args']
    assert ckpt2['config']['stage'] == 2 and ckpt2['config']['max_iters'] == 100
    v1, v2 = s1['val']['gpt (best.pt)'], s2['val']['gpt (best.pt)']
    assert v2['acc_tail'] > v1['acc_tail']                          # the point of stage 2
    # a stage 2 that cannot beat stage 1 says so, and keeps stage 1's weights as its best.pt
    train.train(dict(common, stage=2, stage2_iters=20, stage2_learning_rate=1e-9, out_dir=str(tmp_path / 'out'),
                     overwrite=True, final_eval=False))
    kept = torch.load(tmp_path / 'out' / 'stage2' / 'best.pt', weights_only=True)
    assert kept['iter_num'] == 0 and 'stage 2 keeps the stage-1 model' in capsys.readouterr().out
    for k in ckpt1['model']:
        assert torch.equal(kept['model'][k], ckpt1['model'][k])
