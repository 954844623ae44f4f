"""
Train the behavior GPT: next-page prediction on users' histories (HeTLM's small GPT trained from
scratch), in the stages of BehaviorLM's curriculum.

    python train.py --stage=1                              # built-in dataset, generated if missing
    python train.py --data_dir=data/bms --max_iters=3000   # a dataset prepared by data.py
    python train.py config/bms.py --init_from=resume       # a config file, then resume
    torchrun --standalone --nproc_per_node=2 train.py      # DistributedDataParallel (gloo on CPU)

Checkpoints go to out_dir/stage{stage}/: ckpt.pt (latest: model, optimizer, iteration, RNG) and
best.pt (best validation `best_metric`). Both load with torch.load(..., weights_only=True) and
carry the tokenizer, the anchor set and the config, so sample.py needs nothing else.
At the end the best checkpoint is evaluated once on the test split, next to the most-popular and
first-order Markov baselines (evaluate.py), and the table is printed and saved as results.json.

Stage 1 is plain next-page training on full histories for now; the anchor weighting of stage 1 and
the balanced stage 2 arrive with the curriculum issue.
"""

import os
import sys
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
# default config values: the built-in dataset, a model that trains in a few minutes on 2 CPU cores
# I/O
out_dir = 'out'                # checkpoints and results go to out_dir/stage{stage}/
data_dir = 'data/builtin'      # prepared by data.py; data/builtin is generated when missing
stage = 1                      # curriculum stage (1 = anchor stage; 2 = balanced stage, later)
init_from = 'scratch'          # 'scratch' or 'resume' (from out_dir/stage{stage}/ckpt.pt)
eval_interval = 250            # iterations between validation runs (and checkpoints)
log_interval = 50              # iterations between log lines
eval_users = 2000              # validation users scored at each eval (0 = all); final eval uses all
best_metric = 'ndcg@10'        # validation metric that picks best.pt (higher is better; 'nll' lower)
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when best improves
# data
batch_tokens = 4096            # micro-batch size per process, in padded tokens (rows x longest row)
block_size = 64                # longest context in tokens; longer histories are cut into windows
gradient_accumulation_steps = 1
# model
n_layer = 2
n_head = 2
n_embd = 64
dropout = 0.1
bias = False
# AdamW
learning_rate = 3e-3           # peak learning rate
max_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0                # 0 = no clipping
# learning-rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0             # 0 = max_iters
min_lr = 3e-4
# system
device = 'auto'                # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'float32'              # 'float32' or 'bfloat16' (autocast)
compile = False                # torch.compile the model (checkpoints still hold the plain weights)
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

MODEL_KEYS = ('block_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias')


def resolve_device(name):
    if name != 'auto':
        return name
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def get_lr(it, cfg):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg['decay_lr']:
        return cfg['learning_rate']
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg['min_lr'] + coeff * (cfg['learning_rate'] - cfg['min_lr'])


def epoch_batches(lengths, batch_tokens, epoch, seed, bucket=64):
    """One epoch's micro-batches (arrays of window indices), a function of (seed, epoch) only.

    Behavior logs are mostly short histories with a long tail of long ones, so a fixed number of
    rows wastes most of the compute on padding or starves the optimizer. Instead windows are
    shuffled, sorted by length inside chunks of about `bucket` batches, and cut into batches of
    at most `batch_tokens` padded tokens (rows x longest row); then the batches are shuffled."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    n_in = lengths - 1                                  # input tokens of each window
    chunk = max(1, int(bucket * batch_tokens / max(1.0, float(n_in.mean()))))
    batches = []
    for c in range(0, len(perm), chunk):
        part = perm[c:c + chunk]
        part = part[np.argsort(n_in[part], kind='stable')]   # ascending: a batch's last row is its longest
        L, i = n_in[part], 0
        while i < len(part):
            k = max(1, batch_tokens // int(L[i]))
            while k > 1 and k * int(L[min(i + k, len(part)) - 1]) > batch_tokens:
                k = max(1, batch_tokens // int(L[min(i + k, len(part)) - 1]))
            batches.append(part[i:i + k])
            i += k
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


class BatchSchedule:
    """Micro-batch number -> window indices of this process. A function of the step number alone,
    so a resumed run continues the data order where it stopped (no batch is seen twice).
    With W processes, micro-batch s of process r is batch s*W + r of the epoch's list."""

    def __init__(self, lengths, batch_tokens, rank, world_size, seed):
        self.lengths, self.batch_tokens, self.seed = lengths, batch_tokens, seed
        self.rank, self.world = rank, world_size
        self.starts = [0]           # first micro-batch number of each epoch seen so far
        self._epoch, self._batches = None, None
        if len(lengths) == 0:
            raise ValueError("no training windows: every user's training part is shorter than 2 tokens")

    def _load(self, epoch):
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.batch_tokens, epoch, self.seed)
        return self._batches

    def __call__(self, step):
        epoch = 0
        while True:
            if epoch + 1 == len(self.starts):   # learn where the next epoch starts
                self.starts.append(self.starts[-1] + len(self._load(epoch)) // self.world)
            if step < self.starts[epoch + 1]:
                break
            epoch += 1
        j = step - self.starts[epoch]
        return self._load(epoch)[j * self.world + self.rank]


def save_atomic(obj, path):
    """torch.save to a temporary file, then os.replace: a crash never leaves a torn checkpoint."""
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def better(a, b, metric):
    return a < b if metric == 'nll' else a > b


def train(cfg):
    """Run one training stage with config dict `cfg`; returns a dict of results (master process)."""
    from configurator import ConfigError
    from model import GPT, GPTConfig
    from data import load_data, ensure_builtin, train_windows, get_batch
    from evaluate import evaluate_model, evaluate_baselines, format_table

    if cfg['stage'] != 1:
        raise ConfigError(f"--stage={cfg['stage']}: only stage 1 exists so far "
                          "(the balanced stage 2 arrives with the curriculum)")
    if cfg['init_from'] not in ('scratch', 'resume'):
        raise ConfigError(f"--init_from={cfg['init_from']}: expected 'scratch' or 'resume'")
    if cfg['dtype'] not in ('float32', 'bfloat16'):
        raise ConfigError(f"--dtype={cfg['dtype']}: expected 'float32' or 'bfloat16'")

    # distributed setup (torchrun sets RANK/WORLD_SIZE): nanoGPT's recipe, gloo on CPU
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = resolve_device(cfg['device'])
    if ddp:
        from torch.distributed import init_process_group
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        world = int(os.environ['WORLD_SIZE'])
        if dev.startswith('cuda'):
            dev = f'cuda:{local_rank}'
            torch.cuda.set_device(dev)
        init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
        if dev == 'cpu':  # share the cores between the processes of this machine
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', world))))
    else:
        rank, world = 0, 1
    master = rank == 0
    device_type = 'cuda' if dev.startswith('cuda') else ('mps' if dev.startswith('mps') else 'cpu')
    torch.manual_seed(cfg['seed'] + rank)
    ptdtype = torch.bfloat16 if cfg['dtype'] == 'bfloat16' else torch.float32
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)

    # data: the built-in dataset is generated on first use
    if os.path.normpath(cfg['data_dir']) == os.path.normpath(DEFAULTS['data_dir']):
        if master:
            ensure_builtin(cfg['data_dir'])
        if ddp:
            torch.distributed.barrier()
    data = load_data(cfg['data_dir'])
    windows = train_windows(data, cfg['block_size'])
    schedule = BatchSchedule(windows[:, 1] - windows[:, 0], cfg['batch_tokens'], rank, world, cfg['seed'])

    stage_dir = os.path.join(cfg['out_dir'], f"stage{cfg['stage']}")
    ckpt_path, best_path = os.path.join(stage_dir, 'ckpt.pt'), os.path.join(stage_dir, 'best.pt')
    if master:
        os.makedirs(stage_dir, exist_ok=True)

    # model (+ optimizer), from scratch or resumed
    iter_num, best_val, best_metrics = 0, None, {}
    ckpt = None
    if cfg['init_from'] == 'resume':
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"--init_from=resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if ckpt['tokenizer']['pages'] != data.tokenizer.pages:
            raise ConfigError(f"--init_from=resume: {ckpt_path} was trained on another vocabulary than {cfg['data_dir']}")
        model_args = ckpt['model_args']
        for k in MODEL_KEYS:  # the architecture comes from the checkpoint
            cfg[k] = model_args[k]
    else:
        model_args = dict(block_size=cfg['block_size'], vocab_size=data.vocab_size, n_layer=cfg['n_layer'],
                          n_head=cfg['n_head'], n_embd=cfg['n_embd'], dropout=cfg['dropout'], bias=cfg['bias'])
    model = GPT(GPTConfig(**model_args)).to(dev)
    optimizer = model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                           (cfg['beta1'], cfg['beta2']), device_type)
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        iter_num, best_val, best_metrics = ckpt['iter_num'], ckpt['best_val'], ckpt['best_metrics']
        torch.set_rng_state(ckpt['rng_state'][rank % len(ckpt['rng_state'])])
        if master:
            print(f"resuming from {ckpt_path} at iteration {iter_num}")
        del ckpt
    raw_model = model
    if cfg['compile']:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(dev.split(':')[1])] if device_type == 'cuda' else None)

    if master:
        m = data.meta
        print(f"data: {cfg['data_dir']}: {m['n_users']:,} users ({m['n_eval_users']:,} with val/test targets), "
              f"{data.vocab_size:,} tokens in the vocabulary, {len(windows):,} training windows")
        print(f"model: {raw_model.get_num_params() / 1e6:.3f}M parameters; device {dev}, dtype {cfg['dtype']}, "
              f"{world} process(es), {torch.get_num_threads()} threads each")

    def checkpoint(path):
        rng_states = [torch.get_rng_state()]
        if ddp:  # every process's dropout RNG, so a resumed DDP run continues each stream
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if not master:
            return
        save_atomic({
            'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
            'model_args': model_args, 'iter_num': iter_num, 'best_val': best_val,
            'best_metrics': plain(best_metrics), 'config': dict(cfg), 'rng_state': rng_states,
            'tokenizer': {'pages': list(data.tokenizer.pages), 'counts': plain(data.tokenizer.counts)},
            'anchor_ids': plain(data.anchor_ids), 'data_meta': plain(data.meta),
        }, path)

    def run_eval():
        nonlocal best_val, best_metrics
        raw_model.eval()
        metrics = evaluate_model(raw_model, data, 'val', cfg['block_size'], dev,
                                 max_users=cfg['eval_users'] or None, seed=cfg['seed'])
        raw_model.train()
        value = metrics[cfg['best_metric']]
        improved = best_val is None or better(value, best_val, cfg['best_metric'])
        if improved:
            best_val, best_metrics = value, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if master:
            tqdm.write(f"iter {iter_num}: val nll {metrics['nll']:.4f}, hr@10 {metrics['hr@10']:.4f}, "
                       f"ndcg@10 {metrics['ndcg@10']:.4f}{'  (best)' if improved else ''}")
        return improved

    # training loop
    ga = cfg['gradient_accumulation_steps']
    model.train()
    t0, tokens_seen, loss_acc = time.time(), 0, None
    bar = tqdm(total=cfg['max_iters'], initial=iter_num, desc=f"stage {cfg['stage']}", unit='it',
               disable=not master or None, dynamic_ncols=True)
    while iter_num < cfg['max_iters']:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for micro in range(ga):
            x, y = get_batch(data, windows, schedule(iter_num * ga + micro))
            tokens_seen += int((y != -1).sum())
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if ddp:  # sync gradients only on the last micro-step
                model.require_backward_grad_sync = micro == ga - 1
            with autocast:
                _, loss = model(x, y)
                loss = loss / ga
            loss.backward()
            loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
        if cfg['grad_clip'] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        bar.update(1)

        if iter_num % cfg['log_interval'] == 0 and master:
            dt = time.time() - t0
            tqdm.write(f"iter {iter_num}: loss {loss_acc.item() / cfg['log_interval']:.4f}, lr {lr:.2e}, "
                       f"{tokens_seen * world / dt:,.0f} target tokens/s")
            t0, tokens_seen, loss_acc = time.time(), 0, None
        elif iter_num % cfg['log_interval'] == 0:
            loss_acc = None
        if iter_num % cfg['eval_interval'] == 0 or iter_num == cfg['max_iters']:
            improved = run_eval() if master else False
            if ddp:  # everyone learns whether best improved (only the master evaluated)
                flag = [improved]
                torch.distributed.broadcast_object_list(flag, src=0)
                improved = flag[0]
            if improved:
                checkpoint(best_path)
            if cfg['always_save_checkpoint'] or iter_num == cfg['max_iters']:
                checkpoint(ckpt_path)
            t0, tokens_seen = time.time(), 0
    bar.close()

    results = None
    if master:
        results = final_report(best_path, data, cfg, dev, stage_dir)
    if ddp:
        torch.distributed.barrier()
        from torch.distributed import destroy_process_group
        destroy_process_group()
    return results


def final_report(best_path, data, cfg, dev, stage_dir):
    """Evaluate best.pt once on validation and test, with the baselines, and print the table."""
    from model import load_checkpoint
    from evaluate import evaluate_model, evaluate_baselines, format_table
    model, ckpt = load_checkpoint(best_path, dev)
    results = {'best_iter': ckpt['iter_num'], 'checkpoint': best_path}
    for split in ('val', 'test'):
        rows = {'gpt (best.pt)': evaluate_model(model, data, split, ckpt['model_args']['block_size'], dev)}
        rows.update(evaluate_baselines(data, split))
        print(f"\n{split} split, full ranking over {data.vocab_size - 4:,} pages "
              f"(best.pt from iteration {ckpt['iter_num']}):")
        print(format_table(rows))
        results[split] = {name: {k: v for k, v in r.items() if isinstance(v, (int, float))} for name, r in rows.items()}
    with open(os.path.join(stage_dir, 'results.json'), 'w') as f:
        json.dump(plain(results), f, indent=1)
    return results


def main(argv):
    from configurator import parse_config, ConfigError
    from data import DataError
    try:
        cfg = parse_config(DEFAULTS, argv)
        train(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main(sys.argv[1:])
