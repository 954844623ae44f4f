"""
Machinery a reader learning the methods can skip: what train.py needs to run well on a real machine
but that is no part of either method. Run (train.py) inherits Machinery's methods:
- the time budget (the plan re-aimed when it would overrun it), early stopping and its cooldown,
  and what a resume of a run that had ended may still do;
- the dtype (bf16 or fp32, timed in seconds) and the CPU threads (below);
- opening and checking the dataset, reading the checkpoint a resume starts from, the plan and
  validation lines, checkpoints (written atomically; validate_and_save), fit()'s start and end;
- DDP set-up, run folders (claim_stage_dir: one run per folder, --overwrite), the metrics log,
  warm starts from another run's weights;
- devices and dtypes (resolve_device, pick_dtype: the last section).

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
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
from tqdm import tqdm

from configurator import ConfigError
from files import atomic_output
from model import GPT, GPTConfig, check_gpt_config
from tokenizer import N_SPECIAL, SPECIALS
from data import BUILTIN_DIR, ensure_builtin, load_data


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

    process = None     # the one share of a process that follows the machine (for_process)

    @classmethod
    def for_process(cls, threads=0):
        """A run's share. One per process where it follows the load, so the runs of a search (or of
        hetlm.py) take turns on it instead of each paying the first look's wait again."""
        if threads > 0 or 'OMP_NUM_THREADS' in os.environ:
            return cls(threads)
        if cls.process is None:
            cls.process = cls(threads)
        return cls.process

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


def faster_dtype(model, cfg, batches, weight, logit_bias, draw=None):
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
    negatives = None if draw is None else draw()     # a sampled softmax's pages (drawn after the RNG is kept)
    runs = {}
    for name in ('float32', 'bfloat16'):
        m = copy.deepcopy(model).train()
        opt = m.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'], (cfg['beta1'], cfg['beta2']), 'cpu')
        runs[name] = (m, opt, nullcontext() if name == 'float32' else torch.autocast('cpu', dtype=torch.bfloat16))

    def step(name, x, y, cid):
        m, opt, ctx = runs[name]
        t = time.perf_counter()
        with ctx:
            _, loss = m(x, y, cluster_ids=cid, class_weight=weight, logit_bias=logit_bias, return_logits=False,
                        negatives=negatives)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    ratios, secs, t0 = [], {'float32': [], 'bfloat16': []}, time.perf_counter()
    for i, (x, y, cid) in enumerate(batches):
        cols = min(model.config.vocab_size, cfg.get('sampled_softmax') or model.config.vocab_size)   # logits per row
        rows = max(1, TIMING_LOGITS // (cols * max(1, x.size(1))))                         # bounded work
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
    """torch.save through files.atomic_output: a crash or a full disk never leaves a torn checkpoint
    (the old one stays), and two writers never share a temporary file."""
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
                          "use the same n_layer/n_head/n_embd/block_size/bias/transitions") from None
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
                                                            self.weight, self.logit_bias, self.negatives)
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

    def open_dataset(self):
        """The prepared dataset (the built-in one is generated on first use), checked for a page and a
        validation target."""
        cfg = self.cfg
        if os.path.normpath(cfg['data_dir']) == os.path.normpath(BUILTIN_DIR):
            if self.master:
                ensure_builtin(cfg['data_dir'])
            if self.ddp:
                torch.distributed.barrier()
        data = load_data(cfg['data_dir'])
        if data.vocab_size <= N_SPECIAL:
            raise ConfigError(f"{cfg['data_dir']}: its vocabulary holds no page (only the special tokens); "
                              "prepare it again from a log with events")
        if not (np.asarray(data.val_pos) >= 0).any():
            raise ConfigError(f"{cfg['data_dir']}: no user has a validation and a test target (each needs at least 3 "
                              f"{'sessions' if data.split == 'session' else 'events'}), so nothing can be validated")
        return data

    def resume_state(self, ckpt):
        """A resume: the checkpoint's weights, optimizer, random stream and loop state (train.Run.restore)."""
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.iter_num, self.best_val, self.best_metrics = ckpt['iter_num'], ckpt['best_val'], ckpt['best_metrics']
        self.best_iter, self.elapsed_before = ckpt.get('best_iter', self.iter_num), ckpt.get('elapsed', 0.0)
        self.progress = ckpt.get('progress', {'nll': math.inf, 'iter': self.best_iter})
        self.cool = ckpt.get('cooldown')
        self.search = ckpt.get('search')
        self.finished = self.ended_before = ckpt.get('finished')
        self.max_iters_before = ckpt.get('asked_max_iters', 0)
        self.best_users = None if ckpt.get('best_users') is None else ckpt['best_users'].numpy()
        torch.set_rng_state(ckpt['rng_state'][self.rank % len(ckpt['rng_state'])])
        if self.talk:
            print(f"resuming from {self.ckpt_path} at iteration {self.iter_num}")

    def end_distributed(self):
        """Under DDP: every process waits for the report, then leaves the process group."""
        if self.ddp:
            torch.distributed.barrier()
            from torch.distributed import destroy_process_group
            destroy_process_group()

    def read_resume(self):
        """--init_from=resume: this stage's ckpt.pt, on the dataset's vocabulary."""
        if not os.path.isfile(self.ckpt_path):
            raise ConfigError(f"--init_from=resume: no checkpoint at {self.ckpt_path}")
        ckpt = read_checkpoint(self.ckpt_path)
        if ckpt['tokenizer']['pages'] != self.data.tokenizer.pages:
            raise ConfigError(f"--init_from=resume: {self.ckpt_path} was trained on another vocabulary "
                              f"than {self.cfg['data_dir']}")
        return ckpt

    def print_validation(self, metrics, improved):
        """A validation's line in metrics.jsonl and on the screen."""
        log_metrics(self.stage_dir, {'kind': 'val', 'iter': self.iter_num, 'elapsed': round(self.elapsed(), 1),
                                     'best': improved,
                                     **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        sess = f"session nll {metrics['session_nll']:.4f}, " if 'session_nll' in metrics else ''
        tqdm.write(f"iter {self.iter_num}: val {sess}nll {metrics['nll']:.4f}, hr@10 {metrics['hr@10']:.4f}, "
                   f"ndcg@10 {metrics['ndcg@10']:.4f}, acc anchor {metrics['acc_anchor']:.4f} "
                   f"tail {metrics['acc_tail']:.4f}{'  (best ' + self.cfg['best_metric'] + ')' if improved else ''}")

    def print_plan(self):
        cfg, m = self.cfg, self.data.meta
        print(f"data: {cfg['data_dir']}: {m['n_users']:,} users ({m['n_eval_users']:,} with val/test targets), "
              f"{self.data.vocab_size:,} tokens in the vocabulary, {len(self.windows):,} training windows")
        print(f"model: {self.raw_model.get_num_params() / 1e6:.3f}M parameters; device {self.dev}, dtype "
              f"{cfg['dtype']} ({self.dtype_why}), {self.world} process(es), {torch.get_num_threads()} threads each"
              + (f" ({self.share.why})" if self.share else ""))
        budget = f", time budget {cfg['time_budget']:g} min" if cfg['time_budget'] > 0 else ""
        print(f"plan: {cfg['max_iters']:,} iterations, validation every {cfg['eval_interval']:,}, early stop after "
              f"{cfg['patience']} without a better {cfg['best_metric']}{budget}")

    def save(self, path):
        """A checkpoint with everything a resume, sample.py and evaluate.py need (written atomically)."""
        rng_states = [torch.get_rng_state()]
        if self.ddp:  # every process's dropout RNG, so a resumed DDP run continues each stream
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if not self.master:
            return
        data, uc = self.data, self.user_clusters
        save_atomic({
            'model': self.raw_model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'model_args': self.model_args, 'iter_num': self.iter_num, 'rng_state': rng_states,
            'elapsed': self.elapsed(), 'best_val': self.best_val, 'best_iter': self.best_iter,
            'best_metrics': plain(self.best_metrics), 'progress': self.progress, 'cooldown': self.cool,
            'config': dict(self.cfg), 'derived': self.derived, 'search': self.search, 'finished': self.finished,
            'asked_max_iters': self.asked['max_iters'],
            'best_users': None if self.best_users is None else torch.from_numpy(np.asarray(self.best_users, np.float32)),
            'tokenizer': {'pages': list(data.tokenizer.pages), 'counts': plain(data.tokenizer.counts)},
            'anchor_ids': plain(data.anchor_ids), 'data_meta': plain(data.meta),
            'clusters': None if uc is None else torch.from_numpy(uc),
        }, path)

    def validate_and_save(self):
        """Validation, then best.pt (if it improved) and ckpt.pt; every process learns the outcome."""
        t = time.time()
        improved = self.validate() if self.master else False
        if self.ddp:  # everyone learns whether best improved (only the master evaluated)
            flag = [improved, self.best_iter, self.progress]
            torch.distributed.broadcast_object_list(flag, src=0)
            improved, self.best_iter, _ = flag
            self.progress.update(flag[2])
        if improved:
            self.save(self.best_path)
        if improved or self.cfg['always_save_checkpoint'] or self.iter_num == self.cfg['max_iters']:
            self.save(self.ckpt_path)
        self.eval_secs.append(time.time() - t)

    def begin_fit(self):
        """fit()'s start: False where a resumed run's training had ended (it was killed in its report,
        and asks for no more iterations); else the replaced run's files go (--overwrite), and this
        run's clock and random stream start again."""
        ended = self.ended_before
        if ended is not None and not self.asks_for_more(ended):
            if self.master:
                print(f"{self.ckpt_path}: training had ended ({ended}); only the report is left (an explicit "
                      f"--max_iters above {self.iter_num:,} trains on)")
            return False
        self.ended_before = self.finished = None
        for path in self.replaced:      # --overwrite=True: the old run goes once this one can start
            if os.path.isfile(path):
                os.remove(path)
        self.replaced = []
        self.t_start = time.time()                       # the clock runs while this run trains
        torch.set_rng_state(self.rng_state)              # and its own random stream (search.py interleaves runs)
        self.eval_secs = []                              # validation times: the budget plans with them
        self.deadline = self.cfg['time_budget'] * 60 if self.cfg['time_budget'] > 0 else math.inf   # s of elapsed()
        return True

    def end_fit(self, stop, pause_at):
        """fit()'s end: a pause is validated and saved; the clock stops; where training has ended,
        why, in ckpt.pt (a resume then only finishes the report). Returns stop."""
        cfg = self.cfg
        if stop is None and self.iter_num == pause_at:   # a pause is always validated and saved
            if self.iter_num % cfg['eval_interval'] != 0:
                self.validate_and_save()
            elif not cfg['always_save_checkpoint']:
                self.save(self.ckpt_path)
        self.elapsed_before, self.t_start = self.elapsed(), None   # the clock stops between fits
        self.rng_state = torch.get_rng_state()
        if pause_at is None or self.iter_num < pause_at:  # training has ended: a resume only reports
            moved = cfg['max_iters'] != self.planned_iters   # the time budget or a cooldown moved the end
            self.finished = stop or (f"its end was moved to iteration {self.iter_num:,}" if moved else RAN)
            self.save(self.ckpt_path)
        return stop


# -----------------------------------------------------------------------------
# checkpoints: read and checked before use

class CheckpointError(ConfigError):
    """A file that is not a usable checkpoint; one line naming the file and what is wrong. A
    ConfigError, so every script's run_main already prints it as one line and exits 2."""


def read_checkpoint(path, device='cpu'):
    """The one reader of a checkpoint file (train.py's): the validated dict, or a CheckpointError
    naming the file and what is wrong (missing, empty, cut short, not a torch file, objects that
    weights_only refuses, missing keys, bad model_args, weights that do not fit model_args). Only
    tensors and plain Python values are loaded (weights_only=True): a checkpoint cannot run code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no checkpoint there" + (" (a folder)" if os.path.isdir(path) else ""))
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip/pickle/EOF/unpickling errors: every one means "not a usable checkpoint"
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's words for an object weights_only refuses
        if unsafe:
            raise CheckpointError(f"{path}: holds a Python object ({unsafe.group(1)}), refused: a checkpoint may "
                                  "hold only tensors and plain values (weights_only=True), so it cannot run code") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (cut short, or not a PyTorch file; "
                              f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    kinds = {'model': dict, 'model_args': dict, 'config': dict, 'tokenizer': dict, 'iter_num': int}
    for key, kind in kinds.items():
        if not isinstance(ckpt.get(key), kind):
            raise CheckpointError(f"{path}: no {key!r} ({kind.__name__}) in it; not a checkpoint written by train.py")
    args = ckpt['model_args']
    unknown = sorted(set(args) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown model_args {unknown}")
    try:
        config = GPTConfig(**args)
        check_gpt_config(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: bad model_args: {e}") from None
    tok = ckpt['tokenizer']
    pages = tok.get('pages')
    if not (isinstance(pages, list) and isinstance(tok.get('counts'), list)
            and len(pages) == len(tok['counts']) == config.vocab_size and pages[:len(SPECIALS)] == SPECIALS
            and all(isinstance(p, str) for p in pages) and len(set(pages)) == len(pages)):
        raise CheckpointError(f"{path}: its tokenizer is not the specials then {config.vocab_size - len(SPECIALS)} "
                              "distinct pages with their counts (vocab_size in model_args)")
    if not isinstance(ckpt['config'].get('data_dir'), str):
        raise CheckpointError(f"{path}: config has no data_dir")
    with torch.device('meta'):  # the expected shapes, nothing allocated
        want = {k: (v.shape, v.is_floating_point()) for k, v in GPT(config).state_dict().items()}
    state = ckpt['model']
    for name, (shape, real) in want.items():   # weights are floats, the transition table's pages integers
        t = state.get(name)
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.is_floating_point() != real:
            got = 'missing' if t is None else (f"{tuple(t.shape)} of {t.dtype}" if isinstance(t, torch.Tensor)
                                               else type(t).__name__)
            raise CheckpointError(f"{path}: weight {name} is {got}, model_args ask for {tuple(shape)} of "
                                  f"{'floats' if real else 'integers'}")
    nxt = state.get('trans_next')
    if nxt is not None and nxt.numel() and not (0 <= int(nxt.min()) and int(nxt.max()) < config.vocab_size):
        raise CheckpointError(f"{path}: its transition table holds page ids outside [0, {config.vocab_size})")
    extra = sorted(set(state) - set(want))
    if extra:
        raise CheckpointError(f"{path}: weights {extra[:3]} do not belong to the model its model_args describe")
    clusters = ckpt.get('clusters')
    if clusters is not None and not (isinstance(clusters, torch.Tensor) and clusters.ndim == 1
                                     and not clusters.is_floating_point() and len(clusters) > 0
                                     and 0 <= int(clusters.min()) and int(clusters.max()) < config.n_clusters):
        raise CheckpointError(f"{path}: its user -> cluster assignment is not ids in [0, {config.n_clusters})")
    return ckpt


def load_checkpoint(path, device='cpu'):
    """Load a checkpoint written by train.py -> (model in eval mode, checkpoint dict), validated by
    read_checkpoint (a CheckpointError, one line, for anything wrong)."""
    ckpt = read_checkpoint(path, device)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    model.to(device)
    model.eval()
    return model, ckpt


def expand_state(state, model):
    """A state dict for `model` from `state`, a checkpoint of the same architecture with fewer
    parameter sets: a tensor with one set fewer dimension is copied into every set (HeTLM's warm
    start: every cluster's set begins as the shared model), a tensor of the same shape as is."""
    out = {}
    for name, want in model.state_dict().items():
        if name not in state:
            if name in ('page_bias', 'repeat_w', 'repeat_d', 'trans_w', 'trans_next', 'trans_count', 'trans_logpop'):
                # a plain GPT / an older run has none: its start (train.py fills the table from the data)
                out[name] = want
                continue
            raise ValueError(f"{name} is missing from the checkpoint")
        src = state[name]
        if src.shape == want.shape:
            out[name] = src
        elif src.shape == want.shape[1:]:
            out[name] = src.unsqueeze(0).expand_as(want).clone()
        else:
            raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit {tuple(want.shape)}")
    return out


# -----------------------------------------------------------------------------
# devices and dtypes

def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (an empty set where it cannot be read)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return set(value.split())
    except OSError:
        pass
    return set()


def pick_dtype(name, device):
    """'float32' / 'bfloat16' as given; 'auto' -> bf16 autocast only where the hardware runs it
    faster than fp32: a CUDA GPU with bf16 support, or a CPU with AMX or AVX512-BF16 (read from
    /proc/cpuinfo, never assumed; without them bf16 is emulated and slower). Returns (name, why)."""
    if name != 'auto':
        return name, 'as set'
    if device.startswith('cuda'):
        if torch.cuda.is_bf16_supported():
            return 'bfloat16', f'{torch.cuda.get_device_name(device)} supports bf16'
        return 'float32', 'this GPU has no bf16 support'
    if device == 'cpu':
        flags = cpu_flags()
        fast = [f for f in ('amx_bf16', 'avx512_bf16') if f in flags]
        if fast:
            return 'bfloat16', f"the CPU has {' and '.join(fast)}"
        return 'float32', ('the CPU has neither amx_bf16 nor avx512_bf16' if flags
                           else 'CPU features unknown (no /proc/cpuinfo)')
    return 'float32', f'{device}: fp32 by default'


def resolve_device(name):
    """'auto' -> cuda if available, then mps, then cpu; anything else as given, once checked
    (a ConfigError, one line, for a device this machine does not have)."""
    if name != 'auto':
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device={name}: not a device (expected auto, cpu, cuda, cuda:N or mps)") from None
        if dev.type == 'cuda' and not torch.cuda.is_available():
            raise ConfigError(f"--device={name}: CUDA is not available on this machine; use --device=cpu or auto")
        if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        mps = getattr(torch.backends, 'mps', None)
        if dev.type == 'mps' and not (mps is not None and mps.is_available()):
            raise ConfigError(f"--device={name}: MPS is not available on this machine; use --device=cpu or auto")
        if dev.type not in ('cpu', 'cuda', 'mps'):
            raise ConfigError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
        return name
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'
