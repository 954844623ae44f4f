"""
Machinery a reader learning the methods can skip: what train.py needs to run well on a real machine
but that is no part of either method. Run (train.py) inherits Machinery's methods:
- the time budget (the plan re-aimed when it would overrun it), early stopping and its cooldown,
  and what a resume of a run that had ended may still do;
- the dtype (bf16 or fp32, timed in seconds) and the CPU threads (below);
- DDP set-up, run folders (claim_stage_dir: one run per folder, --overwrite), checkpoints written
  atomically, the metrics log, warm starts from another run's weights.

Threads.
Why it matters: PyTorch on a CPU runs each operation on a team of OpenMP threads, one per core
by default, and the team meets at a barrier after every operation. When another job keeps the
cores busy, one thread of the team waits for a core while the others spin at the barrier, and a
training step costs many times its share of the machine (measured: 10x slower beside a test run
on 2 cores, where sharing should cost 2x; docs/performance.md). A run therefore uses as many
threads as there are cores left to it: every core while the machine is free, fewer while other
processes keep cores busy, looked at again every `every` seconds (the other job may start or end
during the run). Under DDP the processes of the run share the cores (setup_distributed, below) and
this is off.
"""

import json
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from configurator import ConfigError
from files import atomic_output
from model import expand_state, pick_dtype, read_checkpoint, resolve_device


def usable_cores():
    """The CPUs this process may run on (its affinity, as a container or taskset sets it), as a set."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def busy_seconds(cpus):
    """CPU seconds all processes have spent busy (not idle or waiting on I/O) on the given CPUs,
    from /proc/stat's cpuN lines; None where there is no /proc/stat."""
    try:
        with open('/proc/stat') as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        fields = line.split()
        if not fields or not fields[0].startswith('cpu') or fields[0] == 'cpu' or int(fields[0][3:]) not in cpus:
            continue
        ticks = [int(x) for x in fields[1:]]
        busy += sum(ticks[:8]) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf('SC_CLK_TCK')


TORCH_THREADS = torch.get_num_threads()   # torch's own choice (OMP_NUM_THREADS, or one per core), at import


class CpuShare:
    """The thread count of a run: `threads` if set (> 0), else the cores left by other processes.
    adjust() (called from the training loop) looks at the machine at most every `every` seconds
    and changes torch's thread count when the share changed; why says what it decided."""

    def __init__(self, threads=0, every=10.0):
        self.cpus = usable_cores()
        self.cores = min(len(self.cpus), TORCH_THREADS)   # never more than torch would use (SMT, OMP_NUM_THREADS)
        self.every, self.last = every, None
        self.fixed = threads > 0 or 'OMP_NUM_THREADS' in os.environ
        if self.fixed:
            torch.set_num_threads(threads if threads > 0 else TORCH_THREADS)
            self.why = 'as set' if threads > 0 else 'as OMP_NUM_THREADS says'
        else:
            self.set(self.cores, 'one per core')
            self.look(wait=0.25)            # a first look, before the run starts timing anything

    def set(self, n, why):
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.why = why

    def sample(self):
        return time.monotonic(), busy_seconds(self.cpus), time.process_time()

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


def save_atomic(obj, path):
    """torch.save to a temporary file of this process, then os.replace: a crash or a full disk never
    leaves a torn checkpoint, and two writers never share a temporary file."""
    try:
        with atomic_output(path, "wb") as f:   # an unnamed file until complete: a kill leaves nothing
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:   # torch reports a failed write as a RuntimeError
        raise ConfigError(f"{path}: cannot write the checkpoint ({str(e).splitlines()[0] if str(e) else e!r}); "
                          "the previous one is unchanged") from None


def plain(x):
    """numpy scalars/arrays -> Python values, so checkpoints load with weights_only=True."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE: nanoGPT's recipe, gloo on CPU. -> (ddp, rank, world, device)"""
    dev = resolve_device(cfg['device'])
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, dev
    from torch.distributed import init_process_group
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if dev.startswith('cuda'):
        dev = f'cuda:{local_rank}'
        torch.cuda.set_device(dev)
    init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
    if dev == 'cpu':  # share the cores between the processes of this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', world))))
    return True, rank, world, dev


def replan(cfg, iter_num, sec_per_iter, sec_per_eval, sec_left):
    """A shorter run when the plan would overrun the time budget: the largest max_iters whose
    iterations and validations fit in sec_left, with the cosine decay re-aimed at it (so the
    learning rate still ends at min_lr, not mid-peak). Returns the new max_iters, or None."""
    per_iter = sec_per_iter + sec_per_eval / cfg['eval_interval']      # a step and its share of validation
    if (cfg['max_iters'] - iter_num) * per_iter <= 1.02 * sec_left:
        return None
    return iter_num + max(1, int(sec_left / per_iter))


def wants_cooldown(cfg, lr_at_best):
    """After an early stop: was best.pt taken at a learning rate well above min_lr (stage 1)? Then it
    is worth annealing: a model stopped mid-peak is rarely as good as the same model decayed."""
    return cfg['stage'] == 1 and cfg['cooldown'] > 0 and lr_at_best > 2 * cfg['min_lr']


RAN = 'ran its iterations'   # Run.finished of a run that ended where it was planned to


def claim_stage_dir(stage_dir, cfg):
    """A new run never replaces another run's checkpoints unless told to (--overwrite=True): it
    refuses with one line naming the ways on. --init_from=resume continues the run there. Returns
    the old run's files, which fit() removes once the new run has started (set-up done: a setting
    that fails at start-up leaves them), so no file mixes two runs."""
    os.makedirs(stage_dir, exist_ok=True)
    held = [f for f in ('ckpt.pt', 'best.pt') if os.path.isfile(os.path.join(stage_dir, f))]
    if cfg['init_from'] == 'resume':
        return []
    if held and not cfg['overwrite']:
        raise ConfigError(f"{stage_dir} holds another run ({', '.join(held)}); continue it with --init_from=resume, "
                          f"replace it with --overwrite=True, or choose another --out_dir")
    old = [os.path.join(stage_dir, f) for f in ('ckpt.pt', 'best.pt', 'results.json', 'metrics.jsonl')]
    inside = os.path.realpath(stage_dir) + os.sep
    for key in ('init_from', 'stage1_ckpt'):   # a start inside the folder the new run clears (search/ too)
        if cfg.get(key) and cfg[key] != 'scratch' and os.path.realpath(cfg[key]).startswith(inside):
            raise ConfigError(f"--{key}={cfg[key]} --overwrite=True: the run would remove its own starting point; "
                              f"copy it out of {stage_dir} first, or choose another --out_dir")
    return [p for p in old if os.path.isfile(p)]


def log_metrics(stage_dir, record):
    """Append one JSON line to stage_dir/metrics.jsonl (plot.py draws from it). A resumed run
    appends too, so an iteration may appear twice: readers keep its last record."""
    with open(os.path.join(stage_dir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
        f.write(json.dumps(plain(record)) + '\n')


def warm_start(model, cfg, data, master):
    """HeTLM warm start: weights from another run's checkpoint; a 1-set model is copied into every set."""
    src = read_checkpoint(cfg['init_from'])
    if src['tokenizer']['pages'] != data.tokenizer.pages:
        raise ConfigError(f"--init_from={cfg['init_from']} was trained on another vocabulary than {cfg['data_dir']}")
    try:
        model.load_state_dict(expand_state(src['model'], model))
    except ValueError as e:
        raise ConfigError(f"--init_from={cfg['init_from']}: does not fit this model ({e}); "
                          "use the same n_layer/n_head/n_embd/block_size/bias") from None
    if master:
        print(f"weights from {cfg['init_from']} (iteration {src['iter_num']}, "
              f"{src['model_args'].get('n_clusters', 1)} set(s)) -> {cfg['n_clusters']} set(s)")


def fmt_time(sec):
    sec = int(sec)
    return f"{sec // 60}m{sec % 60:02d}s" if sec >= 60 else f"{sec}s"


class Machinery:
    """Run's methods for the machinery (train.Run inherits them; they use its state)."""

    def elapsed(self):
        """Seconds this run has trained, resumes included (the time budget counts these)."""
        return self.elapsed_before + (0.0 if self.t_start is None else time.time() - self.t_start)

    def agree(self, value):
        """The first process's value, on every process (decisions that must not differ under DDP)."""
        if not self.ddp:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def choose_dtype(self, resumed=None):
        """float32 or bfloat16 autocast; dtype=auto on a CPU times both on the run's first batches,
        except on resume, which continues in the dtype the run had (resumed)."""
        cfg = self.cfg
        if cfg['dtype'] == 'auto' and (resumed == 'float32' or (resumed == 'bfloat16' and
                                       pick_dtype('auto', self.dev)[0] == 'bfloat16')):   # bf16 only where native
            cfg['dtype'], self.dtype_why = resumed, 'as the run it resumes'
        else:
            cfg['dtype'], self.dtype_why = pick_dtype(cfg['dtype'], self.dev)
            if cfg['dtype'] == 'bfloat16' and self.dtype_why != 'as set' and self.device_type == 'cpu':  # measure
                cfg['dtype'], self.dtype_why = faster_dtype(self.model, cfg, [self.batch(i) for i in range(12)],
                                                            self.weight, self.logit_bias)
                if self.ddp:  # every process trains in the dtype the first one measured
                    pick = [cfg['dtype'], self.dtype_why]
                    torch.distributed.broadcast_object_list(pick, src=0)
                    cfg['dtype'], self.dtype_why = pick
        self.autocast = (nullcontext() if cfg['dtype'] == 'float32' else
                         torch.autocast(self.device_type, dtype=torch.bfloat16))

    def share_cores(self):
        """Threads follow the cores other jobs leave free (runtime.CpuShare): said when they change."""
        before = torch.get_num_threads()
        if self.share is not None and self.share.adjust() != before and self.master:
            tqdm.write(f"threads: {before} -> {torch.get_num_threads()} ({self.share.why})")

    def fit_time_budget(self, sec_per_iter):
        """Re-plan a schedule that would overrun the time budget: end earlier, decay included."""
        cfg = self.cfg
        per_eval = np.mean(self.eval_secs) if self.eval_secs else 20 * sec_per_iter   # a guess until one ran
        new = self.agree(replan(cfg, self.iter_num, sec_per_iter, per_eval, self.deadline - self.elapsed()))
        if new is None or new >= cfg['max_iters']:
            return
        if any(k == 'eval_interval' for k, _, _ in self.derived):   # keep about 20 validations in all
            cfg['eval_interval'] = max(1, min(cfg['eval_interval'], new // 20))
        if self.master:
            tqdm.write(f"time budget {cfg['time_budget']:g} min: {cfg['max_iters']:,} iterations would not "
                       f"fit at {sec_per_iter * 1000:.0f} ms each; the run now ends at iteration {new:,} "
                       f"(learning rate decays to there; validation every {cfg['eval_interval']:,})")
        cfg['max_iters'], cfg['lr_decay_iters'] = new, min(cfg['lr_decay_iters'], new)
        self.bar.total = new

    def out_of_patience(self):
        """After a validation: None to go on; else why the run stops. A stop at a high learning rate
        first becomes a cooldown (best.pt's weights, decayed to min_lr), once."""
        cfg = self.cfg
        if not cfg['patience'] or self.iter_num - self.progress['iter'] < cfg['patience'] * cfg['eval_interval']:
            return None
        why = (f"neither validation {cfg['best_metric']} nor NLL has improved for {cfg['patience']} "
               f"evaluations (best {cfg['best_metric']} at iteration {self.best_iter})")
        if self.cool is not None or not wants_cooldown(cfg, self.lr_at(self.best_iter)):
            return f"early stop at iteration {self.iter_num}: {why}"
        if self.ddp:
            torch.distributed.barrier()   # best.pt is written
        state = read_checkpoint(self.best_path)
        self.raw_model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.cool, self.progress['iter'] = [self.iter_num, self.lr_at(self.best_iter)], self.iter_num
        cfg['max_iters'] = self.bar.total = self.iter_num + max(cfg['eval_interval'], int(cfg['cooldown'] * self.best_iter))
        if self.master:
            tqdm.write(f"cooldown at iteration {self.iter_num}: {why}; best.pt's weights now train "
                       f"{cfg['max_iters'] - self.iter_num:,} more iterations, learning rate {self.cool[1]:.2e} -> "
                       f"{cfg['min_lr']:.2e}")
        return None

    def asks_for_more(self, ended):
        """Does a resume of a run whose training had ended ask for more: iterations beyond where it
        ended, by a plan it ran to its end, or by an explicit --max_iters other than the one it had?"""
        more = self.iter_num < self.cfg['max_iters']
        if ended == RAN:
            return more
        return more and self.asked['max_iters'] > 0 and self.asked['max_iters'] != self.max_iters_before

    # --- the loop ---------------------------------------------------------------------------------
