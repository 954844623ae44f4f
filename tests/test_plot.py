"""plot.py: every PNG after a short stage 1 + stage 2 run (headless, when matplotlib is installed),
metrics.jsonl's records, and a one-line message when matplotlib is missing."""
import json
import os
import sys

import pytest

import plot
import train
from configurator import ConfigError
from shop import make_builtin


def small_run(tmp_path, stage, **kw):
    cfg = dict(train.DEFAULTS, data_dir=str(tmp_path / 'shop'), out_dir=str(tmp_path / 'out'), stage=stage,
               max_iters=20, eval_interval=10, log_interval=5, batch_tokens=512, block_size=32, n_layer=1, n_embd=16,
               warmup_iters=2, eval_users=100, time_budget=0.0, dtype='float32', final_eval=False)
    cfg.update(kw)
    train.train(cfg)


def test_metrics_log_and_every_plot(tmp_path):
    pytest.importorskip('matplotlib')
    make_builtin(str(tmp_path / 'shop'), n_users=150)
    small_run(tmp_path, 1)
    small_run(tmp_path, 2, stage2_iters=10)
    log = plot.read_log(str(tmp_path / 'out' / 'stage1' / 'metrics.jsonl'))
    assert [r['iter'] for r in log['val']] == [10, 20] and [r['iter'] for r in log['train']] == [5, 10, 15, 20]
    assert all(0 < r['train_nll'] < 10 and r['lr'] > 0 for r in log['train']) and 'ndcg@10' in log['val'][0]
    paths = plot.run(dict(plot.DEFAULTS), str(tmp_path / 'out' / 'stage2'))
    assert sorted(os.path.basename(p) for p in paths) == ['curves.png', 'frequency.png', 'per_user.png', 'stages.png']
    for p in paths:
        with open(p, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n' and os.path.getsize(p) > 5000
    # a fresh run in the same folder starts a new log (told to replace the old run)
    small_run(tmp_path, 1, overwrite=True, max_iters=10)
    assert [r['iter'] for r in plot.read_log(str(tmp_path / 'out' / 'stage1' / 'metrics.jsonl'))['val']] == [10]


def test_resumed_iterations_keep_their_last_record(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text("\n".join(json.dumps(r) for r in [
        {'kind': 'val', 'iter': 10, 'nll': 3.0, 'ndcg@10': 0.1}, {'kind': 'val', 'iter': 20, 'nll': 2.0, 'ndcg@10': 0.2},
        {'kind': 'val', 'iter': 20, 'nll': 1.5, 'ndcg@10': 0.3}]) + "\n")
    assert [r['nll'] for r in plot.read_log(str(path))['val']] == [3.0, 1.5]
    path.write_text('{"kind": "val", "iter": 1, "nll": 2.0, "ndcg@10": 0.1}\nnot json\n')
    with pytest.raises(ConfigError, match=r'metrics.jsonl:2: not a metrics record'):
        plot.read_log(str(path))


def test_missing_matplotlib_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)   # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as e:
        plot.main(['out/stage1'])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: plot.py needs matplotlib, an optional extra: pip install matplotlib"
