"""
How fast is this machine for nanoBehavior? One table: the hardware, the matmul peak, training
throughput of three model sizes in fp32 and bf16, (given nanoGPT's model.py) nanoGPT's GPT beside
ours at the shapes the recipe picks, and (given data folders) the data, clustering, evaluation and
prediction steps on real logs. Measurement only: nothing here changes training.

    python bench.py --quick                                  # ~30 s, synthetic workloads only
    python bench.py                                          # longer timings, synthetic only
    python bench.py --msnbc_input=msnbc990928.seq.gz --msnbc_dir=data/msnbc --bms_dir=data/bms
    python bench.py --threads=1 --out=bench_1thread.json     # one core
    python bench.py --nanogpt=../nanoGPT                     # + nanoGPT's GPT at the recipe's shapes (its repository)

The table is also written as JSON to --out. Training FLOPs use nanoGPT's estimate (PaLM appendix B):
6N + 12*L*C*T per token (model.estimate_flops_per_token), so "% peak" compares the model with a
2048x2048 matmul of the same dtype on the same machine: an upper bound a real model rarely nears
on small shapes. Workloads are seeded; timings are wall clock, so other jobs on the machine show.
"""

import gc
import os
import sys
import ctypes
import json
import time
import platform
import resource
import tempfile
from contextlib import nullcontext

import numpy as np
import torch

from configurator import ConfigError, run_main

# -----------------------------------------------------------------------------
out = 'bench.json'       # the table as JSON
quick = False            # ~30 s: fewer steps and users (bare `--quick` works too)
msnbc_input = ''         # raw UCI MSNBC .seq.gz: data preparation speed ('' = skip)
msnbc_dir = ''           # prepared MSNBC folder: k-means, evaluation, next-page latency ('' = skip)
bms_dir = ''             # prepared BMS-WebView-1 folder: one epoch at train.py's defaults ('' = skip)
device = 'auto'          # 'auto' (cuda > mps > cpu), 'cpu', 'cuda'
threads = 0              # torch threads (0 = torch's default)
steps = 10               # timed training steps per preset and dtype (--quick: 2)
warmup = 2               # untimed steps first (--quick: 1)
matmul_n = 2048          # matmul peak: n x n @ n x n
matmul_reps = 10         # timed matmuls per dtype (--quick: 3)
eval_users = 0           # validation users for the evaluation speed (0 = all; --quick: 5000)
latency_users = 200      # users for the next-page latency (--quick: 50)
big_vocab = 200000       # pages for the large-vocabulary row (tiny preset shape; 0 = skip)
dtype_check = False      # train the built-in data at the small and medium shapes in fp32 and bf16 for
                         #   check_iters steps each; compare time and validation NLL (a few minutes)
check_iters = 100        # steps per dtype for dtype_check (medium: a third)
big_vocab_full = True    # also the full-logits loss there (a training step where memory allows, else forward only)
nanogpt = ''             # nanoGPT's model.py (a file, or its repository folder; not included here): time
                         #   its GPT beside ours at the shapes the recipe picks on the development logs ('' = skip)
nanogpt_steps = 3        # timed steps per model, shape and repeat there (best of 3 repeats; --quick: 1)
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

# (n_layer, n_head, n_embd, block_size, vocab_size, batch rows): tiny = train.py's default model
PRESETS = {'tiny': (2, 2, 64, 50, 3300, 128), 'small': (4, 4, 128, 200, 3300, 32), 'medium': (6, 6, 384, 256, 3300, 16)}
COLUMNS = ('name', 'dtype', 'value', 'unit', 'gflops', 'peak_share', 'mem_mb', 'note')
# (log, n_embd, block_size, vocabulary, transitions, sampled softmax) train.py derives with no flags on
# each development log (recipe.py; the README's results table): 2 blocks, heads of 32, batches of
# max(4096, 16 x block) tokens, the repeat term on, the transition term where pages have few training
# events, a sampled softmax from 10,000 pages
RECIPE_SHAPES = (('built-in', 64, 64, 438, 0, 0), ('BMS', 64, 32, 488, 0, 0), ('MSNBC', 64, 32, 21, 0, 0),
                 ('Online Retail', 128, 128, 3665, 0, 0), ('sparse shop', 64, 32, 19580, 32, 1024),
                 ('MovieLens-100K', 128, 128, 1682, 0, 0), ('Wikipedia', 128, 64, 1004, 0, 0),
                 ('repeat shop', 64, 128, 1002, 0, 0))


def hardware(dev):
    """What the machine is, read, never assumed: CPU model and flags from /proc/cpuinfo, or the GPU."""
    info = {'python': platform.python_version(), 'torch': torch.__version__, 'device': dev,
            'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'cpu_model': platform.processor() or platform.machine()}
    if hasattr(os, 'sched_getaffinity'):
        info['cores_usable'] = len(os.sched_getaffinity(0))
    from runtime import cpu_flags
    flags = cpu_flags()                                         # what dtype=auto decides from
    try:
        with open('/proc/cpuinfo') as f:
            info['cpu_model'] = next((line.partition(':')[2].strip() for line in f
                                      if line.startswith('model name')), info['cpu_model'])
    except OSError:
        info['cpuinfo'] = 'unreadable'
    for flag in ('avx512f', 'avx512_bf16', 'amx_bf16'):
        info[flag] = flag in flags if flags else None          # None: unknown (no /proc/cpuinfo)
    info['onednn_bf16'] = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dev.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(dev)
        info['gpu_bf16'] = torch.cuda.is_bf16_supported()
    return info


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn, n, dev):
    """Seconds for n calls of fn (after sync)."""
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(dev)
    return time.perf_counter() - t0


def train_step(model, optimizer, x, y, clip=0.0, autocast=None, **kw):
    """One optimizer step as train.py takes it (chunked loss, no (N, V) logits); returns the loss."""
    with autocast or nullcontext():
        _, loss = model(x, y, **{'return_logits': False, **kw})
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def matmul_peak(dev, dtype, n, reps):
    """GFLOP/s of an n x n matmul (2n^3 FLOPs), from the fastest of reps: a peak, so the best
    rep, not the mean, which another job on the machine would drag down."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))
    timed(lambda: a @ b, 2, dev)
    return 2 * n ** 3 / min(timed(lambda: a @ b, 1, dev) for _ in range(reps)) / 1e9


class PeakMemory:
    """Peak memory of a block, MB: CUDA allocator peak, or on Linux the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) above the RSS at entry; elsewhere ru_maxrss growth."""

    def __init__(self, dev):
        self.dev, self.mb = dev, None

    def __enter__(self):
        if self.dev.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
            return self
        gc.collect()
        try:  # hand freed heap back to the OS first, or an earlier run's memory hides this one's
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.start, self.hwm = self._status('VmRSS'), True
        except OSError:
            self.start, self.hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False
        return self

    @staticmethod
    def _status(key):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ':')) / 1024

    def __exit__(self, *exc):
        if self.dev.startswith('cuda'):
            self.mb = torch.cuda.max_memory_allocated() / 2 ** 20
        elif self.hwm:
            self.mb = self._status('VmHWM') - self.start
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.start


def train_preset(name, dtype, cfg, dev, peak):
    """Training steps (forward + backward + clip + AdamW) on full rows of random pages."""
    from model import GPT, GPTConfig
    n_layer, n_head, n_embd, T, V, B = PRESETS[name]
    device_type = dev.split(':')[0]
    with PeakMemory(dev) as mem:
        torch.manual_seed(cfg['seed'])
        model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                              dropout=0.0)).to(dev)
        rows = torch.randint(4, V, (B, T + 1), generator=torch.Generator().manual_seed(cfg['seed']))
        x, y = rows[:, :-1].to(dev), rows[:, 1:].to(dev)          # (B, T) inputs, next-page targets
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device_type)
        autocast = nullcontext() if dtype == 'fp32' else torch.autocast(device_type, dtype=torch.bfloat16)

        def step():
            train_step(model, optimizer, x, y, clip=1.0, autocast=autocast)   # as train.py trains

        timed(step, cfg['warmup'], dev)
        dt = timed(step, cfg['steps'], dev)
    tok_s = B * T * cfg['steps'] / dt
    flops = model.estimate_flops_per_token(T=T)
    return dict(name=f'train {name}', dtype=dtype, value=tok_s, unit='tokens/s', gflops=tok_s * flops / 1e9,
                peak_share=tok_s * flops / 1e9 / peak, mem_mb=mem.mb,
                note=f'L{n_layer} H{n_head} C{n_embd} T{T} V{V} B{B}, {model.get_num_params() / 1e6:.2f}M params, '
                     f'{flops / 1e6:.2f} MFLOP/token, {1e3 * dt / cfg["steps"]:.1f} ms/step')


def default_config(data):
    """train.py's config for this dataset as a run with no flags derives it (recipe.py)."""
    import train
    from recipe import data_stats, derive
    return derive(dict(train.DEFAULTS), data_stats(data))[0]


def default_model(data, dev, dropout=0.0):
    """A random-init model at the shape train.py picks for this dataset with no flags."""
    from model import GPT, GPTConfig
    from baselines import transition_table
    tc = default_config(data)
    torch.manual_seed(tc['seed'])
    model = GPT(GPTConfig(block_size=tc['block_size'], vocab_size=data.vocab_size, n_layer=tc['n_layer'],
                          n_head=tc['n_head'], n_embd=tc['n_embd'], dropout=dropout,
                          repeat_bias=tc['repeat_bias'], repeat_decay=tc['repeat_decay'],
                          transitions=tc['transitions'])).to(dev).eval()
    if tc['transitions']:   # the table train.py would fill from this data
        model.set_transitions(*transition_table(data, tc['transitions']))
    return model


def bench_prepare(path):
    import data as D
    with tempfile.TemporaryDirectory(prefix='bench_prepare_') as tmp, PeakMemory('cpu') as mem:
        t0 = time.perf_counter()
        meta = D.prepare(path, tmp)
        dt = time.perf_counter() - t0
    return [dict(name='prepare msnbc', value=meta['n_events'] / dt, unit='events/s', mem_mb=mem.mb,
                 note=f"{meta['n_events']:,} events, {meta['n_users']:,} users in {dt:.1f} s")]


def bench_msnbc(data_dir, cfg, dev):
    from data import load_data
    from cluster import tfidf_vectors, kmeans
    from evaluate import evaluate_model
    from sample import next_page_probs
    data, rows = load_data(data_dir), []
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        x = tfidf_vectors(data, seed=cfg['seed'])
        t1 = time.perf_counter()
        kmeans(x, 10, seed=cfg['seed'])
        t2 = time.perf_counter()
    rows.append(dict(name='tf-idf vectors', value=t1 - t0, unit='s', note=f'{data.n_users:,} users x {x.shape[1]} dims'))
    rows.append(dict(name='k-means k=10', value=t2 - t1, unit='s', mem_mb=mem.mb,
                     note=f'{data.n_users:,} users, n_init=4 (memory: with the vectors)'))
    model = default_model(data, dev)
    n = cfg['eval_users'] or data.meta['n_eval_users']
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        evaluate_model(model, data, 'val', model.config.block_size, dev, max_users=cfg['eval_users'] or None,
                       seed=cfg['seed'])
        dt = time.perf_counter() - t0
    rows.append(dict(name='evaluate val (full rank)', value=n / dt, unit='users/s', mem_mb=mem.mb,
                     note=f'{n:,} users in {dt:.1f} s, batch 512, random-init default model'))
    rng = np.random.default_rng(cfg['seed'])
    users = rng.choice(data.n_users, size=min(cfg['latency_users'], data.n_users), replace=False)
    histories = [np.asarray(data.tokens[data.offsets[u]:data.train_end[u]], dtype=np.int64).tolist() for u in users]
    next_page_probs(model, histories[0], dev)
    ms = []
    for ids in histories:
        t0 = time.perf_counter()
        next_page_probs(model, ids, dev)
        sync(dev)
        ms.append(1e3 * (time.perf_counter() - t0))
    rows.append(dict(name='next-page latency', value=float(np.median(ms)), unit='ms/user',
                     note=f'median of {len(ms)} users (p90 {np.percentile(ms, 90):.2f} ms), one history per forward'))
    return rows


def bench_epoch(data_dir, cfg, dev):
    """One stage-1 epoch on a dataset at the config train.py derives for it (dropout, tail weights, lr schedule)."""
    import curriculum
    import train
    from data import BatchSchedule, load_data, train_windows, get_batch
    data = load_data(data_dir)
    tc = default_config(data)
    model = default_model(data, dev, tc['dropout']).train()
    windows = train_windows(data, tc['block_size'])
    schedule = BatchSchedule(windows[:, 1] - windows[:, 0], tc['batch_tokens'], 0, 1, tc['seed'])
    schedule(0)
    n_batches = schedule.starts[1]
    weight = curriculum.class_weights(tc, data)
    optimizer = model.configure_optimizers(tc['weight_decay'], tc['learning_rate'], (tc['beta1'], tc['beta2']),
                                           dev.split(':')[0])
    sync(dev)
    t0, targets = time.perf_counter(), 0
    for it in range(n_batches):
        for group in optimizer.param_groups:
            group['lr'] = train.get_lr(it, tc) * group.get('lr_scale', 1.0)
        x, y = get_batch(data, windows, schedule(it))
        targets += int((y != -1).sum())
        train_step(model, optimizer, x.to(dev), y.to(dev), clip=tc['grad_clip'],
                   class_weight=None if weight is None else weight.to(dev))
    sync(dev)
    dt = time.perf_counter() - t0
    return [dict(name='epoch bms (train.py defaults)', dtype='fp32', value=dt, unit='s',
                 note=f'{n_batches} micro-batches of <= {tc["batch_tokens"]} tokens, {targets / dt:,.0f} target tokens/s')]


def mem_available_mb():
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:')) / 1024
    except (OSError, StopIteration):
        return None


def bench_big_vocab(cfg, dev):
    """One training step (the first: AdamW state included) at the tiny preset's shape over a
    big_vocab-page vocabulary: the chunked loss train.py uses vs the full (N, V) logits with
    F.cross_entropy (forward only where a full step would not fit in memory); peak memory, loss."""
    from model import GPT, GPTConfig
    n_layer, n_head, n_embd, T, _, B = PRESETS['tiny']
    V, rows, losses = cfg['big_vocab'], [], {}
    need_full = 4 * B * T * V * 4 / 2 ** 20          # logits, log-softmax, and their gradients, fp32
    avail = mem_available_mb()
    for mode in ('chunked', 'full logits'):
        trains = mode == 'chunked' or avail is None or need_full < 0.7 * avail
        if mode == 'full logits' and not cfg['big_vocab_full']:
            continue
        with PeakMemory(dev) as mem:
            torch.manual_seed(cfg['seed'])
            model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                  dropout=0.0)).to(dev)
            data = torch.randint(4, V, (B, T + 1), generator=torch.Generator().manual_seed(cfg['seed']))
            x, y = data[:, :-1].to(dev), data[:, 1:].to(dev)
            optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), dev.split(':')[0])

            def step():
                if not trains:             # too big to train here: the loss alone, for the check
                    with torch.no_grad():
                        return model(x, y, return_logits=True)[1]
                return train_step(model, optimizer, x, y, return_logits=mode == 'full logits')

            t0 = time.perf_counter()
            losses[mode] = float(step())
            dt = time.perf_counter() - t0
        what = 'training step' if trains else (f'forward only: a training step needs ~{need_full / 1024:.0f} GB, '
                                                  f'{avail / 1024:.0f} GB available')
        rows.append(dict(name=f'tiny, {V:,} pages', dtype='fp32', value=B * T / dt if trains else None,
                         unit='tokens/s', mem_mb=mem.mb,
                         note=f'{mode} ({what}): loss {losses[mode]:.6f}, {dt:.1f} s'))
        del model, optimizer
    if len(losses) == 2:
        rows[-1]['note'] += f"; |chunked - full| {abs(losses['chunked'] - losses['full logits']):.1e}"
    return rows


def bench_dtype_check(cfg, dev):
    """bf16 vs fp32 on real data: the built-in dataset trained at the small and medium presets'
    model shapes (its own vocabulary, train.py's token-budget batches) for the same number of
    steps from the same seed; wall time and validation NLL of the final weights."""
    import train
    from data import ensure_builtin, load_data
    from evaluate import evaluate_model
    from runtime import load_checkpoint
    ensure_builtin(train.DEFAULTS['data_dir'])
    data, rows = load_data(train.DEFAULTS['data_dir']), []
    for name in ('small', 'medium'):
        n_layer, n_head, n_embd, T, _, _ = PRESETS[name]
        iters = cfg['check_iters'] if name == 'small' else max(1, cfg['check_iters'] // 3)
        res = {}
        for dtype in ('float32', 'bfloat16'):
            with tempfile.TemporaryDirectory(prefix='bench_dtype_') as tmp:
                c = dict(train.DEFAULTS, out_dir=tmp, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T,
                         max_iters=iters, eval_interval=iters, warmup_iters=max(1, iters // 10), dropout=0.0,
                         final_eval=False, eval_users=500, dtype=dtype, device=dev, seed=cfg['seed'])
                t0 = time.perf_counter()
                train.train(c)
                dt = time.perf_counter() - t0
                model, ck = load_checkpoint(os.path.join(tmp, 'stage1', 'ckpt.pt'), dev)
                res[dtype] = (dt, evaluate_model(model, data, 'val', T, dev)['nll'])
        (t32, nll32), (t16, nll16) = res['float32'], res['bfloat16']
        rows.append(dict(name=f'bf16 check {name}', dtype='bf16', value=t32 / t16, unit='x fp32',
                         note=f'{iters} steps on the built-in data: {t16:.0f} s vs {t32:.0f} s (evaluation included); '
                              f'validation NLL {nll16:.4f} vs fp32 {nll32:.4f} ({100 * (nll16 / nll32 - 1):+.2f}%)'))
    return rows


def bench_clusters(cfg, dev, K=5):
    """Time per training iteration of K parameter sets (each batch on one cluster's set, as
    train.py batches) vs one plain GPT sized to the same parameter count (HeTLM's comparison)."""
    import train
    from model import GPT, GPTConfig
    from hetlm import count_params, matched_single_config
    T, V, B = 64, 438, 4096 // 64      # the shape train.py derives for the built-in data, its vocabulary
    base = GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=64, dropout=0.0, n_clusters=K)
    single, _ = matched_single_config(base)
    data = torch.randint(4, V, (B, T + 1), generator=torch.Generator().manual_seed(cfg['seed']))
    x, y = data[:, :-1].to(dev), data[:, 1:].to(dev)
    ms = {}
    for rep in range(2):                            # alternate, keep each one's best
        for name, conf in (('clusterwise', base), ('single', single)):
            torch.manual_seed(cfg['seed'])
            model = GPT(conf).to(dev)
            optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), dev.split(':')[0])
            it = [0]

            def step():
                cid = torch.full((B,), it[0] % K, device=dev) if conf.n_clusters > 1 else None
                train_step(model, optimizer, x, y, cluster_ids=cid)
                it[0] += 1

            timed(step, K, dev)
            n = max(K, cfg['steps'])
            ms[name] = min(ms.get(name, float('inf')), 1e3 * timed(step, n, dev) / n)
    return [dict(name=f'clusterwise K={K} vs single', dtype='fp32', value=ms['clusterwise'] / ms['single'],
                 unit='x time', note=f"{ms['clusterwise']:.1f} vs {ms['single']:.1f} ms/iter; {K} sets of n_embd "
                 f"{base.n_embd} ({count_params(base):,} params) vs one of n_embd {single.n_embd} "
                 f"({count_params(single):,}), {B}x{T} tokens")]


def load_nanogpt(path):
    """nanoGPT's model module from its model.py (path: the file or the folder that holds it)."""
    import importlib.util
    path = os.path.join(path, 'model.py') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ConfigError(f"--nanogpt={path}: not found (give nanoGPT's model.py or its folder)")
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    if spec is None:
        raise ConfigError(f"--nanogpt={path}: not a Python file (give nanoGPT's model.py or its folder)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        module.GPT, module.GPTConfig
    except Exception as e:   # any file that is not nanoGPT's model.py
        raise ConfigError(f"--nanogpt={path}: not nanoGPT's model.py ({type(e).__name__}: {e})") from None
    return module


def bench_vs_nanogpt(cfg, dev, dtype):
    """Training steps of our GPT as train.py builds it with no flags (the repeat term, and the
    transition term and the sampled softmax where the recipe turns them on, with a random table and
    one draw of pages) and of nanoGPT's GPT (its forward with targets: the
    full (B, T, V) logits and F.cross_entropy; its configure_optimizers) on the same batches of
    random pages, at each shape of RECIPE_SHAPES, in `dtype` (what --dtype=auto picks here), gradient
    clipping at 1.0 for both; and ours without the repeat term (its cost grows with the context).
    One process, the models alternating, best of 3 repeats."""
    import io
    from contextlib import redirect_stdout
    import train
    from model import GPT, GPTConfig, draw_negatives
    nano = load_nanogpt(cfg['nanogpt'])
    device_type = dev.split(':')[0]
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == 'bfloat16' else nullcontext()
    steps, rows = cfg['nanogpt_steps'], []
    for name, C, T, V, S, M in RECIPE_SHAPES:
        B = max(4096, 16 * T) // T
        g = torch.Generator().manual_seed(cfg['seed'])
        batch = torch.randint(4, V, (B, T + 1), generator=g)
        x, y = batch[:, :-1].contiguous().to(dev), batch[:, 1:].contiguous().to(dev)   # nanoGPT views targets
        table = (torch.randint(3, V, (V, S), generator=g).int(), torch.randint(0, 5, (V, S), generator=g).float(),
                 torch.full((V,), 1.0 / V)) if S else None
        neg = {} if not M else {'negatives': tuple(a.to(dev) for a in draw_negatives(torch.full((V,), 1.0 / V), M, g))}

        def build(**terms):   # ours as the recipe builds it; bare: the same without the repeat term
            torch.manual_seed(cfg['seed'])
            m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=C // 32, n_embd=C, dropout=0.0,
                              transitions=S, **terms)).to(dev).train()
            if S:
                m.set_transitions(*table)
            return m, m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device_type)

        ours, opt_ours = build(repeat_bias=train.DEFAULTS['repeat_bias'], repeat_decay=train.DEFAULTS['repeat_decay'])
        bare, opt_bare = build()
        torch.manual_seed(cfg['seed'])
        with redirect_stdout(io.StringIO()):   # nanoGPT prints its parameter counts and AdamW choice
            theirs = nano.GPT(nano.GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=C // 32, n_embd=C,
                                             dropout=0.0, bias=False)).to(dev).train()
            opt_theirs = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device_type)

        def step_theirs():
            with autocast:
                _, loss = theirs(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
            opt_theirs.step()
            opt_theirs.zero_grad(set_to_none=True)

        fns = {'ours': lambda: train_step(ours, opt_ours, x, y, clip=1.0, autocast=autocast, **neg), 'nanoGPT': step_theirs,
               'bare': lambda: train_step(bare, opt_bare, x, y, clip=1.0, autocast=autocast, **neg)}
        best = {}
        for k, fn in fns.items():
            timed(fn, cfg['warmup'], dev)
        for _ in range(3):
            for k, fn in fns.items():
                best[k] = min(best.get(k, float('inf')), timed(fn, steps, dev) / steps)
        tok = {k: B * T / v for k, v in best.items()}
        rows.append(dict(name=f'vs nanoGPT: {name}', dtype='bf16' if dtype == 'bfloat16' else 'fp32',
                         value=tok['ours'] / tok['nanoGPT'], unit='x nanoGPT',
                         note=f"C{C} T{T} V{V} B{B}{f' S{S}' if S else ''}{f' M{M}' if M else ''}: {tok['ours']:,.0f} vs {tok['nanoGPT']:,.0f} tokens/s "
                              f"({1e3 * best['ours']:.0f} vs {1e3 * best['nanoGPT']:.0f} ms/step; ours without the "
                              f"repeat term {1e3 * best['bare']:.0f} ms, {best['nanoGPT'] / best['bare']:.2f}x)"))
        print(format_table(rows[-1:]).split('\n')[1], flush=True)
        del ours, theirs, bare, opt_ours, opt_theirs, opt_bare
    return rows


def format_table(rows):
    def cell(v, fmt):
        return '' if v is None else (fmt.format(v) if isinstance(v, float) else str(v))
    lines = [f"{'benchmark':<28s} {'dtype':<5s} {'value':>12s} {'unit':<9s} {'GFLOP/s':>8s} {'%peak':>6s} {'mem MB':>7s}  note"]
    for r in rows:
        share = None if r.get('peak_share') is None else 100 * r['peak_share']
        lines.append(f"{r['name']:<28s} {cell(r.get('dtype'), '{}'):<5s} {cell(r['value'], '{:,.2f}'):>12s} "
                     f"{r['unit']:<9s} {cell(r.get('gflops'), '{:.1f}'):>8s} {cell(share, '{:.1f}'):>6s} "
                     f"{cell(r.get('mem_mb'), '{:.0f}'):>7s}  {r.get('note', '')}")
    return '\n'.join(lines)


def run(cfg):
    from runtime import pick_dtype, resolve_device
    if cfg['quick']:
        cfg.update(steps=min(cfg['steps'], 2), warmup=min(cfg['warmup'], 1), matmul_reps=min(cfg['matmul_reps'], 3),
                   eval_users=cfg['eval_users'] or 5000, latency_users=min(cfg['latency_users'], 50))
    if cfg['big_vocab'] < 0 or 0 < cfg['big_vocab'] < 8:
        raise ConfigError(f"--big_vocab={cfg['big_vocab']}: 0 (skip) or a vocabulary size")
    if cfg['quick']:
        cfg['nanogpt_steps'] = min(cfg['nanogpt_steps'], 1)
    for k in ('steps', 'matmul_reps', 'matmul_n', 'latency_users', 'nanogpt_steps'):
        if cfg[k] < 1:
            raise ConfigError(f"--{k}={cfg[k]}: must be a positive integer")
    if cfg['eval_users'] < 0:
        raise ConfigError(f"--eval_users={cfg['eval_users']}: must be >= 0 (0: every user)")
    for k in ('msnbc_input', 'msnbc_dir', 'bms_dir'):
        if cfg[k] and not os.path.exists(cfg[k]):
            raise ConfigError(f"--{k}={cfg[k]}: not found")
    if cfg['nanogpt']:
        load_nanogpt(cfg['nanogpt'])   # a bad path fails now, not after minutes of other benchmarks
    if cfg['threads'] > 0:
        torch.set_num_threads(cfg['threads'])
    dev = resolve_device(cfg['device'])
    hw = hardware(dev)
    auto, why = pick_dtype('auto', dev)
    hw['dtype_auto'] = f"{auto} ({why})"
    print('hardware: ' + ', '.join(f'{k}={v}' for k, v in hw.items()), flush=True)
    rows, peak = [], {}
    for dtype, tdtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        peak[dtype] = matmul_peak(dev, tdtype, cfg['matmul_n'], cfg['matmul_reps'])
        rows.append(dict(name=f"matmul {cfg['matmul_n']}x{cfg['matmul_n']}", dtype=dtype, value=peak[dtype],
                         unit='GFLOP/s', gflops=peak[dtype], peak_share=1.0, note='the peak that %peak refers to'))
    for name in PRESETS:
        for dtype in ('fp32', 'bf16'):
            rows.append(train_preset(name, dtype, cfg, dev, peak[dtype]))
            print(format_table(rows[-1:]).split('\n')[1], flush=True)
    if cfg['dtype_check']:
        rows += bench_dtype_check(cfg, dev)
        print(format_table(rows[-2:]).split('\n', 1)[1], flush=True)
    if cfg['nanogpt']:
        rows += bench_vs_nanogpt(cfg, dev, auto)
    rows += bench_clusters(cfg, dev)
    print(format_table(rows[-1:]).split('\n')[1], flush=True)
    if cfg['big_vocab']:
        rows += bench_big_vocab(cfg, dev)
        print(format_table(rows[-2:]).split('\n', 1)[1], flush=True)
    skipped = []
    for key, fn in (('msnbc_input', lambda: bench_prepare(cfg['msnbc_input'])),
                    ('msnbc_dir', lambda: bench_msnbc(cfg['msnbc_dir'], cfg, dev)),
                    ('bms_dir', lambda: bench_epoch(cfg['bms_dir'], cfg, dev))):
        if cfg[key]:
            rows += fn()
        else:
            skipped.append(key)
    print(f"\nbenchmarks on {hw['cpu_model'] if dev == 'cpu' else hw.get('gpu', dev)}, {hw['torch_threads']} torch threads"
          f"{', quick' if cfg['quick'] else ''}:")
    print(format_table(rows))
    if skipped:
        print(f"skipped (no data given): {', '.join('--' + k for k in skipped)}")
    result = {'hardware': hw, 'config': cfg, 'presets': {k: dict(zip(('n_layer', 'n_head', 'n_embd', 'block_size',
              'vocab_size', 'batch_rows'), v)) for k, v in PRESETS.items()}, 'rows': rows, 'skipped': skipped}
    with open(cfg['out'], 'w') as f:
        json.dump(result, f, indent=1)
    print(f"written to {cfg['out']}")
    return result


def main(argv):
    argv = ['--quick=1' if a == '--quick' else a for a in argv]
    from data import DataError
    run_main(run, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
