"""hetlm.py end to end on a small simulated shop: the shared model, the K sweep, refinement rounds,
both controls and the per-user report; warm start of the sets; a rerun reuses finished runs."""
import json
import os

import numpy as np
import pytest
import hetlm
from configurator import parse_config
from shop import make_builtin
from runtime import load_checkpoint


def test_pipeline_writes_every_row_and_starts_sets_from_the_shared_model(tmp_path, capsys):
    data_dir = str(tmp_path / 'shop')
    make_builtin(data_dir, n_users=300)
    argv = [f'--data_dir={data_dir}', f'--out_dir={tmp_path / "h"}', '--ks=2,3', '--max_iters=12',
            '--cluster_iters=6', '--eval_interval=6', '--log_interval=6', '--batch_tokens=512', '--block_size=32',
            '--n_embd=16', '--n_layer=1', '--warmup_iters=2', '--eval_users=100', '--max_rounds=2']
    report = hetlm.run(parse_config(hetlm.DEFAULTS, argv))
    out = capsys.readouterr().out
    assert report['best_k'] in (2, 3) and set(report['val_nll_by_k']) == {1, 2, 3}
    assert 'refinement round 1:' in out and 'K sweep (validation NLL)' in out
    names = list(report['models'])
    assert names[0].startswith('shared') and names[1].startswith('k-means')
    assert any(n.startswith('random split') for n in names) and names[-1] == 'single, equal parameters'
    k = report['best_k']
    single = report['models']['single, equal parameters']
    assert abs(single['params'] / report['models'][names[1]]['params'] - 1) < 0.05   # width steps of n_head at n_embd 16
    for r in report['models'].values():
        s = r['stats']['all']
        assert s['users'] > 0 and np.isfinite(s['nll_mean']) and s['nll_std'] >= 0
    assert sum(v['users'] for c, v in report['models'][names[1]]['stats'].items() if c != 'all') \
        == report['models'][names[1]]['stats']['all']['users']
    with open(tmp_path / 'h' / 'hetlm.json') as f:
        assert json.load(f)['best_k'] == k
    # the K sets began as copies of the shared model (train.py's warm start)
    assert f"weights from {tmp_path / 'h' / 'shared' / 'stage1' / 'best.pt'} (iteration 12, 1 set(s)) -> {k} set(s)" in out
    model, ck = load_checkpoint(str(tmp_path / 'h' / f'k{k}' / 'stage1' / 'ckpt.pt'))
    assert ck['clusters'].shape == (300,) and model.config.n_clusters == k and ck['iter_num'] == 6
    # a second run with the same settings reuses every finished run
    hetlm.run(parse_config(hetlm.DEFAULTS, argv))
    assert 'training (' not in capsys.readouterr().out


def test_bad_k_list_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        hetlm.main([f'--out_dir={tmp_path}', '--ks=1,x'])
    err = capsys.readouterr().err
    assert err.startswith('error:') and err.count('\n') == 1


def test_oracle_clusters_compares_true_segments_kmeans_and_random(tmp_path, capsys):
    import oracle_clusters
    import train
    from data import load_data
    data_dir = str(tmp_path / 'shop')
    make_builtin(data_dir, n_users=200)
    seg = load_data(data_dir).segments
    runs = {}
    for name, labels in (('true', seg), ('kmeans', (seg + (np.arange(200) % 7 == 0)) % 5),
                         ('random', np.random.default_rng(0).integers(0, 5, 200))):
        np.save(tmp_path / f'{name}.npy', labels.astype(np.int64))
        cfg = dict(train.DEFAULTS, data_dir=data_dir, out_dir=str(tmp_path / name), max_iters=4, eval_interval=4,
                   log_interval=4, batch_tokens=512, block_size=32, n_layer=1, n_embd=16, warmup_iters=1,
                   eval_users=50, final_eval=False, n_clusters=5, cluster_scope='norms', clusters=str(tmp_path / f'{name}.npy'))
        train.train(cfg)
        runs[name] = str(tmp_path / name / 'stage1' / 'ckpt.pt')
    capsys.readouterr()
    oracle_clusters.main([f'--{k}={v}' for k, v in runs.items()] + ['--device=cpu'])
    out = capsys.readouterr().out
    misplaced = int((np.arange(200) % 7 == 0).sum())   # every 7th user moved to the next segment's cluster
    assert "k-means puts " in out and 'true vs random split' in out and 'kmeans vs random split' in out
    assert 'adjusted Rand index' in out and 'users on lowest NLL' in out and 'random split:' in out
    n_eval = int(out.split('k-means puts ')[1].split(' of')[0].replace(',', ''))
    assert 0 < n_eval <= misplaced


def test_pipeline_on_the_session_task(tmp_path, capsys):
    data_dir = str(tmp_path / 'shop')
    make_builtin(data_dir, n_users=300, split='session')
    argv = [f'--data_dir={data_dir}', f'--out_dir={tmp_path / "h"}', '--ks=2', '--max_iters=12',
            '--cluster_iters=6', '--eval_interval=6', '--log_interval=6', '--batch_tokens=512', '--block_size=32',
            '--n_embd=16', '--n_layer=1', '--warmup_iters=2', '--eval_users=100', '--max_rounds=1']
    report = hetlm.run(parse_config(hetlm.DEFAULTS, argv))
    out = capsys.readouterr().out
    assert "test sessions (HeTLM's task" in out
    for name, r in report['models'].items():
        s = r['sessions']['all']
        assert s['users'] > 0 and np.isfinite(s['nll_page']['mean']) and 0 <= s['greedy_f1']['mean'] <= 1
    km = next(r for n, r in report['models'].items() if n.startswith('k-means'))
    assert sum(v['users'] for c, v in km['sessions'].items() if c != 'all') == km['sessions']['all']['users']
    _, ck = load_checkpoint(str(tmp_path / 'h' / 'shared' / 'stage1' / 'best.pt'))
    assert ck['config']['best_metric'] == 'session_nll'
