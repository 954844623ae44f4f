"""bench.py: every benchmark runs on a tiny synthetic setting and fills the table's keys."""
import json

import pytest
import torch

import bench
from shop import make_builtin


def test_hardware_reads_flags():
    hw = bench.hardware('cpu')
    for key in ('cpu_model', 'cores', 'torch_threads', 'avx512f', 'avx512_bf16', 'amx_bf16'):
        assert key in hw
    assert hw['amx_bf16'] in (True, False, None)


def test_run_writes_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, 'PRESETS', {'tiny': (1, 1, 16, 8, 40, 4)})
    data_dir = str(tmp_path / 'shop')
    make_builtin(data_dir, n_users=100)
    cfg = dict(bench.DEFAULTS, out=str(tmp_path / 'bench.json'), quick=True, matmul_n=64, threads=1,
               msnbc_dir=data_dir, bms_dir=data_dir, latency_users=5, big_vocab=5000)
    threads = torch.get_num_threads()
    try:
        result = bench.run(cfg)
    finally:
        torch.set_num_threads(threads)
    names = [r['name'] for r in result['rows']]
    assert names.count('matmul 64x64') == 2 and names.count('train tiny') == 2
    assert {'k-means k=10', 'evaluate val (full rank)', 'next-page latency', 'epoch bms (train.py defaults)'} <= set(names)
    assert result['skipped'] == ['msnbc_input']
    assert names.count('tiny, 5,000 pages') == 2 and 'clusterwise K=5 vs single' in names
    big = [r for r in result['rows'] if r['name'] == 'tiny, 5,000 pages']
    assert big[0]['note'].startswith('chunked') and float(big[1]['note'].rsplit(' ', 1)[1]) < 1e-5
    for r in result['rows']:
        assert r['value'] > 0 and set(r) <= set(bench.COLUMNS)
    train = [r for r in result['rows'] if r['name'] == 'train tiny']
    assert all(r['gflops'] > 0 and r['peak_share'] > 0 and r['mem_mb'] is not None for r in train)
    assert json.load(open(cfg['out']))['rows'][0]['unit'] == 'GFLOP/s'
    assert 'train tiny' in capsys.readouterr().out


def test_bare_quick_flag_and_bad_values(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(['--quick', '--steps=0', f'--out={tmp_path}/b.json'])


def test_dtype_check_trains_both_dtypes_on_real_data(tmp_path, monkeypatch):
    import train
    data_dir = str(tmp_path / 'shop')
    make_builtin(data_dir, n_users=100)
    monkeypatch.setattr(bench, 'PRESETS', {'small': (1, 1, 16, 16, 0, 0), 'medium': (1, 1, 16, 16, 0, 0)})
    monkeypatch.setitem(train.DEFAULTS, 'data_dir', data_dir)
    rows = bench.bench_dtype_check(dict(bench.DEFAULTS, check_iters=3), 'cpu')
    assert [r['name'] for r in rows] == ['bf16 check small', 'bf16 check medium']
    assert all(r['value'] > 0 and 'validation NLL' in r['note'] for r in rows)


NANO_STANDIN = '''
# a stand-in with nanoGPT's interface (GPTConfig fields, forward(idx, targets) -> (logits, loss),
# configure_optimizers(weight_decay, learning_rate, betas, device_type)), written for this test
from dataclasses import dataclass
import torch
from torch.nn import functional as F

@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 40
    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = False

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.emb = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.out = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        print("number of parameters: that many")

    def forward(self, idx, targets=None):
        logits = self.out(self.emb(idx))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print("using fused AdamW: False")
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
'''


def test_against_nanogpt_at_the_recipe_shapes(tmp_path, monkeypatch, capsys):
    # one row per recipe shape: our model (its default terms on) and nanoGPT's on the same batches
    (tmp_path / 'model.py').write_text(NANO_STANDIN)
    monkeypatch.setattr(bench, 'RECIPE_SHAPES', (('tiny log', 32, 32, 300, 8, 0), ('big log', 32, 32, 300, 0, 64)))
    cfg = dict(bench.DEFAULTS, nanogpt=str(tmp_path), nanogpt_steps=1, warmup=1, seed=0)
    rows = bench.bench_vs_nanogpt(cfg, 'cpu', 'float32')
    assert len(rows) == 2 and rows[0]['name'] == 'vs nanoGPT: tiny log' and all(r['value'] > 0 for r in rows)
    assert rows[0]['note'].startswith('C32 T32 V300 B128 S8: ') and rows[1]['note'].startswith('C32 T32 V300 B128 M64: ')
    assert 'number of parameters' not in capsys.readouterr().out
    with pytest.raises(bench.ConfigError, match='nanogpt=.*not found'):
        bench.load_nanogpt(str(tmp_path / 'nowhere'))
    (tmp_path / 'model.txt').write_text('x = 1\n')
    with pytest.raises(bench.ConfigError, match='not a Python file'):
        bench.load_nanogpt(str(tmp_path / 'model.txt'))
    (tmp_path / 'other.py').write_text('x = 1\n')
    with pytest.raises(bench.ConfigError, match="not nanoGPT's model.py"):
        bench.load_nanogpt(str(tmp_path / 'other.py'))
