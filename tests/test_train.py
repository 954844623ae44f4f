"""train.py end to end: a short run beats most-popular, checkpoints load with weights_only,
resume continues the same run, the batch schedule, and a 2-process torchrun (gloo) smoke run."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import runtime
import train
from shop import make_builtin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'shop')
    make_builtin(path, n_users=600)
    return path


def config(data_dir, out_dir, **kw):
    cfg = dict(train.DEFAULTS, data_dir=data_dir, out_dir=str(out_dir), max_iters=20, eval_interval=10,
               log_interval=10, batch_tokens=512, block_size=32, n_layer=1, n_embd=32, warmup_iters=5, eval_users=200,
               dtype='float32')   # dtype=auto times steps: runs compared bit for bit must not depend on that
    cfg.update(kw)
    return cfg


def test_short_run_beats_most_popular(small_data, tmp_path):
    results = train.train(config(small_data, tmp_path, max_iters=150, eval_interval=50))
    test = results['test']
    assert test['gpt (best.pt)']['ndcg@10'] > test['most-popular']['ndcg@10'] + 0.1
    assert os.path.isfile(tmp_path / 'stage1' / 'results.json')


def test_sampled_softmax_trains_and_resumes_like_the_straight_run(small_data, tmp_path, capsys):
    # a few hundred pages, 64 draws per step: training learns (beats most-popular on full ranking),
    # the log says the NLL is the sampled one, and a resume draws the same pages as the straight run
    straight, parts = tmp_path / 'straight', tmp_path / 'parts'
    run = dict(sampled_softmax=64, lr_decay_iters=60, eval_interval=20)
    results = train.train(config(small_data, straight, max_iters=60, **run))
    assert '(sampled softmax)' in capsys.readouterr().out
    test = results['test']
    assert test['gpt (best.pt)']['ndcg@10'] > test['most-popular']['ndcg@10']
    train.train(config(small_data, parts, max_iters=40, **run))
    train.train(config(small_data, parts, max_iters=60, init_from='resume', **run))
    a = torch.load(straight / 'stage1' / 'ckpt.pt', weights_only=True)
    b = torch.load(parts / 'stage1' / 'ckpt.pt', weights_only=True)
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6)


def test_checkpoint_loads_weights_only_and_resume_continues_the_run(small_data, tmp_path):
    straight, parts = tmp_path / 'straight', tmp_path / 'parts'
    run = dict(lr_decay_iters=30)  # the same schedule, whether the run stops at 20 or not
    train.train(config(small_data, straight, max_iters=30, **run))
    train.train(config(small_data, parts, max_iters=20, **run))
    ckpt = torch.load(parts / 'stage1' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 20
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert {'optimizer', 'tokenizer', 'anchor_ids', 'config', 'rng_state'} <= set(ckpt)
    train.train(config(small_data, parts, max_iters=30, init_from='resume', **run))
    a = torch.load(straight / 'stage1' / 'ckpt.pt', weights_only=True)
    b = torch.load(parts / 'stage1' / 'ckpt.pt', weights_only=True)
    assert b['iter_num'] == 30
    for k in a['model']:  # same data order, same dropout stream, same optimizer state
        torch.testing.assert_close(a['model'][k], b['model'][k], rtol=1e-5, atol=1e-6)


def test_batch_schedule_is_a_function_of_the_step():
    lengths = np.random.default_rng(0).integers(2, 30, size=1000)
    s1 = data.BatchSchedule(lengths, 256, 0, 1, seed=7)
    s2 = data.BatchSchedule(lengths, 256, 0, 1, seed=7)
    n1 = len(data.epoch_batches(lengths, 256, 0, seed=7))
    first = [s1(i) for i in range(n1)]
    assert np.array_equal(s2(n1 + 3), s1(n1 + 3))  # jump into epoch 2 directly
    assert np.array_equal(s2(5), first[5])
    seen = np.concatenate(first)
    assert len(np.unique(seen)) == len(seen) == len(lengths)  # an epoch visits each window once
    assert all(len(b) * (lengths[b].max() - 1) <= 256 for b in first)  # the token budget holds
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in first])
    assert spread < 5  # rows of a batch have similar lengths (bucketing); random rows would spread ~25
    assert len(first[0]) != len(first[-1]) or len(set(map(len, first))) > 1  # short rows -> more rows
    ranks = [data.BatchSchedule(lengths, 256, r, 2, seed=7) for r in range(2)]
    assert np.array_equal(ranks[0](3), first[6]) and np.array_equal(ranks[1](3), first[7])


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = dict(train.DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    lrs = [train.get_lr(i, cfg) for i in range(120)]
    assert lrs[0] < lrs[9] < 1.0 and max(lrs) <= 1.0
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[100] == lrs[119] == 0.1


def test_bad_setting_is_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, 'train.py', '--max_itres=5'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and 'max_itres' in out.stderr and 'Traceback' not in out.stderr
    out = subprocess.run([sys.executable, 'train.py', f'--data_dir={tmp_path}/nothing'], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and 'nothing' in out.stderr and 'Traceback' not in out.stderr


def test_torchrun_two_processes(small_data, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
           f'--data_dir={small_data}', f'--out_dir={tmp_path}', '--max_iters=10', '--eval_interval=5',
           '--batch_tokens=256', '--block_size=32', '--n_layer=1', '--n_embd=32', '--eval_users=100', '--device=cpu']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 10 and len(ckpt['rng_state']) == 2


def test_clusterwise_training_uses_one_set_per_batch_and_stores_the_assignment(small_data, tmp_path, capsys):
    data = __import__('data').load_data(small_data)
    assignment = np.arange(data.n_users) % 3
    path = tmp_path / 'clusters.npy'
    np.save(path, assignment)
    with pytest.raises(train.ConfigError, match='cluster'):
        train.train(config(small_data, tmp_path, n_clusters=2, clusters=str(path)))  # ids up to 2 need K >= 3
    res = train.train(config(small_data, tmp_path, n_clusters=3, clusters=str(path), cluster_scope='blocks'))
    ckpt = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['n_clusters'] == 3 and ckpt['model_args']['cluster_scope'] == 'blocks'
    assert torch.equal(ckpt['clusters'], torch.from_numpy(assignment))
    assert res['test']['gpt (best.pt)']['n'] > 0
    # evaluate.py's command line reads the assignment from the checkpoint, as train.py's report does
    from evaluate import main as evaluate_main
    capsys.readouterr()
    evaluate_main([f"--ckpt={tmp_path / 'stage1' / 'best.pt'}", '--split=test'])
    out = capsys.readouterr().out   # and prints the per-user spread, overall and for each of the 3 sets
    assert 'per user' in out and 'all users' in out and all(f'cluster {c} (' in out for c in range(3))
    # cluster.py --refine rewrites the assignment and the clusters.json that describes it (on a copy)
    import json
    import shutil
    import cluster
    copy = str(tmp_path / 'data_copy')
    shutil.copytree(small_data, copy)
    cluster.main([f'--data_dir={copy}', f"--refine={tmp_path / 'stage1' / 'best.pt'}", '--device=cpu'])
    labels = np.load(os.path.join(copy, 'clusters.npy'))
    with open(os.path.join(copy, 'clusters.json')) as f:
        info = json.load(f)
    assert info['sizes'] == np.bincount(labels, minlength=3).tolist() and info['refined_from'].endswith('best.pt')
    assert info['moved'] == int((labels != assignment).sum())
    w = train.train_windows(data, 32)
    groups = cluster.window_clusters(data, w, assignment)
    from data import epoch_batches
    for b in epoch_batches(w[:, 1] - w[:, 0], 512, 0, 0, groups=groups):
        assert len(np.unique(groups[b])) == 1


def test_early_stop_when_validation_stops_improving(small_data, tmp_path, capsys):
    # a learning rate too small to change any ranking: the first validation stays the best
    run = config(small_data, tmp_path, max_iters=200, eval_interval=10, patience=2, learning_rate=1e-9,
                 min_lr=1e-10, final_eval=False)
    train.train(dict(run, cooldown=0.0))
    ckpt = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 30 and ckpt['best_iter'] == 10
    assert 'early stop at iteration 30' in capsys.readouterr().out
    # with a cooldown: best.pt (iteration 10, at the peak rate) trains on, its rate decaying to min_lr
    train.train(dict(run, cooldown=2.0, overwrite=True))
    ckpt = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    out = capsys.readouterr().out
    assert 'cooldown at iteration 30' in out and 'early stop at iteration 30' not in out
    assert ckpt['iter_num'] == 30 + 20 and ckpt['cooldown'][0] == 30     # 2.0 x the 10 iterations of best.pt
    assert train.get_lr(50, ckpt['config'], ckpt['cooldown']) == pytest.approx(1e-10)
    assert train.get_lr(40, ckpt['config'], ckpt['cooldown']) == pytest.approx((1e-9 + 1e-10) / 2, rel=0.05)


def test_replan_fits_the_budget_and_keeps_a_plan_that_fits():
    cfg = dict(train.DEFAULTS, max_iters=1000, eval_interval=50)
    assert runtime.replan(cfg, 100, 0.01, 1.0, 60.0) is None           # 9 s of steps + 18 s of validation: fits
    new = runtime.replan(cfg, 100, 0.1, 1.0, 60.0)                     # 90 s + 18 s does not
    assert 100 < new < 1000 and (new - 100) * (0.1 + 1.0 / 50) <= 60.0 + 1e-9
    assert (new + 1 - 100) * (0.1 + 1.0 / 50) > 60.0                 # and no shorter than it must be


def test_time_budget_ends_the_schedule_inside_it(small_data, tmp_path, capsys):
    import time
    t = time.time()
    train.train(config(small_data, tmp_path, max_iters=100_000, eval_interval=100, time_budget=0.1,
                       final_eval=False))
    assert time.time() - t < 30
    ckpt = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    c = ckpt['config']
    assert 10 <= ckpt['iter_num'] <= c['max_iters'] < 100_000    # re-planned after 10 steps, not just cut off
    assert 'time budget 0.1 min' in capsys.readouterr().out
    if ckpt['iter_num'] == c['max_iters']:    # the usual case: the decay ran to its end
        assert train.get_lr(ckpt['iter_num'], c) == c['min_lr']


def test_zero_flag_settings_are_stored_and_kept_on_resume(small_data, tmp_path, capsys):
    base = dict(train.DEFAULTS, data_dir=small_data, out_dir=str(tmp_path), eval_users=100, final_eval=False,
                epochs=1, time_budget=0.0)
    train.train(dict(base, max_iters=12))
    out = capsys.readouterr().out
    assert 'settings from the data' in out and 'block_size' in out
    first = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    assert {k for k, _, _ in first['derived']} >= {'block_size', 'n_embd', 'dropout', 'learning_rate'}
    assert all(first['config'][k] != train.AUTO[k] for k in train.AUTO)
    train.train(dict(base, max_iters=16, init_from='resume'))
    again = torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)
    out = capsys.readouterr().out
    assert again['iter_num'] == 16 and 'settings from the data' not in out
    assert f"dtype {first['config']['dtype']} (as the run it resumes)" in out   # dtype=auto is not re-timed
    for k in ('block_size', 'n_embd', 'dropout', 'learning_rate', 'batch_tokens', 'warmup_iters', 'dtype'):
        assert again['config'][k] == first['config'][k]


def test_a_new_run_never_replaces_another_runs_checkpoints(small_data, tmp_path):
    cfg = config(small_data, tmp_path, max_iters=10, final_eval=False)
    train.train(cfg)
    best = (tmp_path / 'stage1' / 'best.pt').read_bytes()
    with pytest.raises(train.ConfigError, match='init_from=resume.*overwrite=True'):
        train.train(dict(cfg, learning_rate=1e-5))
    assert (tmp_path / 'stage1' / 'best.pt').read_bytes() == best
    train.train(dict(cfg, max_iters=12, init_from='resume'))          # continuing is not replacing
    train.train(dict(cfg, overwrite=True, max_iters=5))                # told to
    assert torch.load(tmp_path / 'stage1' / 'ckpt.pt', weights_only=True)['iter_num'] == 5


def test_a_full_disk_leaves_the_checkpoints_as_they_were(small_data, tmp_path):
    train.train(config(small_data, tmp_path, max_iters=10, final_eval=False))
    before = {f: (tmp_path / 'stage1' / f).read_bytes() for f in ('ckpt.pt', 'best.pt')}
    cmd = (f"ulimit -f 40; exec {sys.executable} train.py --data_dir={small_data} --out_dir={tmp_path} "
           "--init_from=resume --max_iters=20 --eval_interval=10 --batch_tokens=512 --block_size=32 --n_layer=1 "
           "--n_embd=32 --eval_users=100 --final_eval=False")     # files over 20 KB cannot be written
    out = subprocess.run(['bash', '-c', cmd], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert 'cannot write the checkpoint' in out.stderr and 'unchanged' in out.stderr
    assert {f: (tmp_path / 'stage1' / f).read_bytes() for f in before} == before
    assert not [p for p in os.listdir(tmp_path / 'stage1') if '.tmp' in p]   # no torn temporary file left


@pytest.mark.parametrize('case', ['init_from random bytes', 'init_from empty', 'n_head not dividing n_embd',
                                  'negative eval_users', 'out_dir is a file', 'device without CUDA'])
def test_bad_settings_and_checkpoints_given_to_train_end_in_one_line(small_data, tmp_path, capsys, case):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(os.urandom(3000) if case == 'init_from random bytes' else b'')
    (tmp_path / 'a_file').write_text('x')
    if case == 'device without CUDA' and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    extra, fragment = {
        'init_from random bytes': ([f'--init_from={bad}'], 'bad.pt'),
        'init_from empty': ([f'--init_from={bad}'], 'bad.pt: empty file'),
        'n_head not dividing n_embd': (['--n_head=3', '--n_embd=64'], 'n_head'),
        'negative eval_users': (['--eval_users=-1'], '--eval_users=-1'),
        'out_dir is a file': ([f"--out_dir={tmp_path / 'a_file'}"], 'not a folder'),
        'device without CUDA': (['--device=cuda'], 'CUDA is not available'),
    }[case]
    argv = [f'--data_dir={small_data}', f"--out_dir={tmp_path / 'out'}", '--max_iters=2', *extra]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'out' / 'stage1' / 'ckpt.pt').exists()
