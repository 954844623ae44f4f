"""
Machinery a reader learning the methods can skip: how many CPU threads a run uses.

Why it matters: PyTorch on a CPU runs each operation on a team of OpenMP threads, one per core
by default, and the team meets at a barrier after every operation. When another job keeps the
cores busy, one thread of the team waits for a core while the others spin at the barrier, and a
training step costs many times its share of the machine (measured: 10x slower beside a test run
on 2 cores, where sharing should cost 2x; docs/performance.md). A run therefore uses as many
threads as there are cores left to it: every core while the machine is free, fewer while other
processes keep cores busy, looked at again every `every` seconds (the other job may start or end
during the run). Under DDP the processes of the run share the cores (train.setup_distributed) and
this is off.
"""

import os
import time

import torch


def usable_cores():
    """Cores this process may run on (its CPU affinity, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_seconds():
    """CPU seconds every process of the machine has spent busy (not idle or waiting on I/O), from
    /proc/stat; None where there is no /proc/stat."""
    try:
        with open('/proc/stat') as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != 'cpu':
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf('SC_CLK_TCK')


class CpuShare:
    """The thread count of a run: `threads` if set (> 0), else the cores left by other processes.
    adjust() (called from the training loop) looks at the machine at most every `every` seconds
    and changes torch's thread count when the share changed; why says what it decided."""

    def __init__(self, threads=0, every=10.0):
        self.cores, self.every, self.fixed = usable_cores(), every, threads > 0
        self.last = None
        if self.fixed:
            torch.set_num_threads(threads)
            self.why = 'as set'
        else:
            self.set(self.cores, 'one per core')
            self.look(wait=0.25)            # a first look, before the run starts timing anything

    def set(self, n, why):
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.why = why

    def sample(self):
        return time.monotonic(), busy_seconds(), time.process_time()

    def look(self, wait=0.0):
        """Measure the other processes' load since the last look (or over `wait` seconds now) and
        set the threads: cores minus the cores the others kept busy, at least 1."""
        if self.last is None or wait:
            self.last = self.sample()
            time.sleep(wait)
        now = self.sample()
        (t0, b0, c0), (t1, b1, c1) = self.last, now
        self.last = now
        if b0 is None or b1 is None or t1 - t0 <= 0:
            return
        others = max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0)   # cores kept busy by other processes
        n = max(1, self.cores - int(others + 0.5))
        if n == self.cores:
            self.set(n, 'one per core')
        else:
            self.set(n, f'other processes kept {others:.1f} of {self.cores} cores busy')

    def adjust(self):
        """From the loop: look again if `every` seconds have passed; returns the thread count."""
        if not self.fixed and self.last is not None and time.monotonic() - self.last[0] >= self.every:
            self.look()
        return torch.get_num_threads()


SHORT_RUN = 200        # iterations: a run this short is not worth timing dtypes for
TIMING_LOGITS = 1 << 27   # target tokens x pages per timed step at most: whole batches on catalogues of up to
                         # ~10,000 pages, a slice of each on larger ones (200,000 pages: ~670 tokens)
TIMING_SECONDS = 6.0   # timed pairs stop after this (at least 3 pairs)


def faster_dtype(model, cfg, batches, weight, logit_bias):
    """dtype=auto on a CPU with native bf16 matmuls (AMX or AVX512-BF16): bf16 or fp32, whichever
    trains faster here. Copies of the model take training steps on slices of the run's first
    batches (whole, or a slice of at most TIMING_LOGITS / pages targets), fp32 and bf16 in alternation, each slice first
    once untimed (new shapes build kernels, oneDNN); the median of the per-slice time ratios decides,
    so a load that comes and goes during the timing hits both dtypes alike. It stops after
    TIMING_SECONDS (3 pairs at least). A run of under SHORT_RUN iterations is not timed: bf16, as
    the CPU's features say. Measured: on a Xeon with AMX bf16 took as long as fp32 at n_embd 64 and
    1.5x less at 128; an AMD EPYC with avx512_bf16 trained 2-2.6x faster at every size.
    Returns (dtype, why); the RNG state is restored afterwards."""
    import copy
    from contextlib import nullcontext
    import numpy as np
    if cfg['max_iters'] < SHORT_RUN:
        return 'bfloat16', f"auto: the CPU has native bf16 (a run of {cfg['max_iters']} iterations is not timed)"
    rng = torch.get_rng_state()
    runs = {}
    for name in ('float32', 'bfloat16'):
        m = copy.deepcopy(model).train()
        opt = m.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']), 'cpu')
        runs[name] = (m, opt, nullcontext() if name == 'float32' else torch.autocast('cpu', dtype=torch.bfloat16))

    def step(name, x, y, cid):
        m, opt, ctx = runs[name]
        t = time.perf_counter()
        with ctx:
            _, loss = m(x, y, cluster_ids=cid, class_weight=weight, logit_bias=logit_bias, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    ratios, secs, t0 = [], {'float32': [], 'bfloat16': []}, time.perf_counter()
    for i, (x, y, cid) in enumerate(batches):
        rows = max(1, TIMING_LOGITS // (model.config.vocab_size * max(1, x.size(1))))   # bounded work
        x, y, cid = x[:rows], y[:rows], None if cid is None else cid[:rows]
        order = ('float32', 'bfloat16') if i % 2 == 0 else ('bfloat16', 'float32')
        for name in order:
            step(name, x, y, cid)                              # untimed: kernels for this shape
        took = {name: step(name, x, y, cid) for name in order}
        for name in took:
            secs[name].append(took[name])
        ratios.append(took['bfloat16'] / took['float32'])
        if len(ratios) >= 3 and time.perf_counter() - t0 > TIMING_SECONDS:
            break
    torch.set_rng_state(rng)
    r = float(np.median(ratios))
    pick = 'bfloat16' if r < 0.9 else 'float32'
    return pick, (f"auto: a timed step took {np.median(secs['bfloat16']) * 1e3:.0f} ms in bf16, "
                  f"{np.median(secs['float32']) * 1e3:.0f} ms in fp32 (median ratio {r:.2f} over {len(ratios)} "
                  f"slices, {time.perf_counter() - t0:.1f} s)")
