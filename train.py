"""
Train the behavior GPT: next-page prediction on users' histories (HeTLM's small GPT trained from
scratch), in the stages of BehaviorLM's curriculum.

    python train.py --stage=1                              # built-in dataset, generated if missing
    python train.py --data_dir=data/bms --max_iters=3000   # a dataset prepared by data.py
    python train.py config/bms.py --init_from=resume       # a config file, then resume
    python train.py --n_clusters=5 --init_from=out/stage1/best.pt   # 5 sets, each starting as that model
    torchrun --standalone --nproc_per_node=2 train.py      # DistributedDataParallel (gloo on CPU)

Checkpoints go to out_dir/stage{stage}/: ckpt.pt (latest: model, optimizer, iteration, RNG) and
best.pt (best validation `best_metric`). Both load with torch.load(..., weights_only=True) and
carry the tokenizer, the anchor set and the config, so sample.py needs nothing else.
At the end the best checkpoint is evaluated once on the test split, next to the simple baselines
(baselines.py: most-popular, Markov, SR, SKNN, recency), with a paired bootstrap interval against
the best of them (evaluate.py); the tables are printed and saved as results.json.
Where the time budget has room, stage 1 first chooses dropout (and, for long histories, the
context) on validation by successive halving and trains the winner on (search.py; --search=False).

The curriculum (BehaviorLM, "anchor then tail"):
- stage 1 trains on every user's full history; the loss weighs anchor targets 1 and tail targets
  `tail_weight` (every page is still in the context, so its tied embedding is learned there);
- stage 2 starts from stage 1's best.pt, scores the difficulty of every training target (stage-1
  cross-entropy, one batched pass), keeps up to `per_behavior` samples per behavior from a
  difficulty band (rare behaviors keep all), and fine-tunes on those targets with their full
  preceding context at a lower learning rate, optionally with a KL term to the stage-1 model.

    python train.py --stage=1 && python train.py --stage=2
Baselines in the same harness: --tail_weight=1 (one-stage plain training), --tail_weight=1
--class_balanced=0.999 (class-balanced loss); every final report adds post-hoc logit adjustment of
the model it trained.
"""

import os
import sys
import math
import time

# oneDNN (PyTorch's CPU kernels) caches up to 1,024 compiled kernels, one per tensor shape, and
# behavior batches come in many shapes: on Online Retail in bf16 that cache held 0.7 GB (2.08 GB
# peak vs 1.40 GB at 64 entries, the same speed; docs/performance.md). Set before torch starts.
os.environ.setdefault('ONEDNN_PRIMITIVE_CACHE_CAPACITY', '64')

import numpy as np
import torch
from tqdm import tqdm

from configurator import ConfigError, run_main
from files import hold, release
from runtime import (RAN, CpuShare, Machinery, claim_stage_dir, fmt_time, log_metrics, plain, save_atomic,
                     setup_distributed, warm_start)
from model import GPT, GPTConfig, SCOPES, load_checkpoint, read_checkpoint
from data import BatchSchedule, DataError, describe_anchors, load_data, ensure_builtin, train_windows, get_batch
from cluster import load_clusters, window_clusters
import curriculum
from recipe import AUTO, data_stats, derive, describe
from tokenizer import N_SPECIAL
from evaluate import COLUMNS, LOWER_IS_BETTER, evaluate_model, final_report, per_user_scores
import search as settings_search
from sessions import mean_session_nll

# -----------------------------------------------------------------------------
# default config values: the built-in dataset, a model that trains in a few minutes on 2 CPU cores
# I/O
out_dir = 'out'                # checkpoints and results go to out_dir/stage{stage}/
data_dir = 'data/builtin'      # prepared by data.py; data/builtin is generated when missing
stage = 1                      # curriculum stage: 1 = every behavior (BehaviorLM's anchor stage when tail_weight < 1),
                               # 2 = the balanced stage (from stage 1's best.pt; curriculum.py)
init_from = 'scratch'          # 'scratch', 'resume' (from out_dir/stage{stage}/ckpt.pt), or a checkpoint
                               #   path whose weights start a new run: a 1-set model is copied into
                               #   every cluster's set (HeTLM warm start; hetlm.py uses it)
eval_interval = 0              # data: iterations between validation runs (and checkpoints); 0 = about 20 per run
log_interval = 50              # iterations between log lines
eval_users = 10000             # validation users scored at each eval (0 = all); final eval uses all.
                               #   NDCG@10 on 2,000 users moved by ~0.01 between evals of one model, more
                               #   than the gaps best.pt is chosen on (Online Retail: all 4,214 users
                               #   picked a checkpoint 1.6% better on test than 2,000 did)
best_metric = 'auto'           # validation metric that picks best.pt ('nll' lower, others higher);
                               #   auto: ndcg@10 in stage 1, hmean (anchor/tail accuracy) in stage 2
always_save_checkpoint = True  # write ckpt.pt at every eval, not only when best improves
overwrite = False              # a new run may replace the checkpoints of another run in out_dir
final_eval = True              # score best.pt on val and test at the end (tables, results.json)
search = True                  # stage 1: where the time budget has room, try a few settings the rules
                               #   cannot know (dropout; a longer context for long histories) by successive
                               #   halving on validation and train the best on (search.py); explicit ones win
# Settings marked "data" are derived from the prepared dataset when left at 0 (-1 where 0 is a
# real value) by the rules in recipe.py, printed at start with their reasons and stored in the
# checkpoint; a value set here, on the command line or in a config file is used as given.
# data
batch_tokens = 0               # data: micro-batch size per process, in padded tokens (rows x longest row)
block_size = 0                 # data: longest context in tokens; longer histories are cut into windows
gradient_accumulation_steps = 1
# model
n_layer = 0                    # data
n_head = 0                     # data
n_embd = 0                     # data
dropout = -1.0                 # data
bias = False
repeat_bias = True             # pages already in the context get a learned logit offset by the age of their
                               # latest visit (model.GPT.repeat_terms): revisits, or "never again", in one term
repeat_decay = True            # with repeat_bias: also log(sum of gamma^age over a page's visits), gamma learned
# AdamW
learning_rate = 0.0            # data: peak learning rate
max_iters = 0                  # data: from `epochs`; the time budget may shorten it
epochs = 40                    # passes over the training tokens that max_iters is derived from
time_budget = 10.0             # minutes of training (validations included) a run may take; 0 = no limit.
                               #   The schedule is re-planned to end, decay included, within it
patience = 5                   # stop after this many validations without a better best_metric or NLL; 0 = never
cooldown = 0.25                # an early stop at a high learning rate first reloads best.pt and decays the
                               #   learning rate to min_lr over this fraction of best.pt's iterations; 0 = off
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0                # 0 = no clipping
# learning-rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = -1              # data
lr_decay_iters = 0             # 0 = max_iters
min_lr = -1.0                  # data
# curriculum (BehaviorLM): stage 1 weights tail targets, stage 2 fine-tunes on a balanced subset
tail_weight = 1.0              # stage 1: loss weight of tail targets (anchors and <eos> weigh 1); < 1
                               #   trains the anchors first. 1.0 (plain) had the better validation NDCG@10
                               #   on BMS, MSNBC and UCI Online Retail, and the better stage-2 harmonic
                               #   mean on the built-in data (README, "The curriculum")
class_balanced = 0.0           # baseline: class-balanced loss, beta of Cui et al. 2019 (e.g. 0.999); 0 = off
stage1_ckpt = ''               # stage 2: where stage 1's weights come from ('' = out_dir/stage1/best.pt)
per_behavior = 200             # stage 2: samples kept per behavior; rarer behaviors keep all they have
band_low = 0.0                 # stage 2: difficulty band of each behavior, as quantiles of stage-1 loss:
band_high = 1.0                #   samples are spread evenly over it; dropping the easiest (band_low > 0)
                               #   lowered validation anchor/tail accuracy on the built-in data (README)
kl_weight = 0.0                # stage 2: weight of KL(stage-1 model || model) at the chosen targets
prior_keep = 0.75              # stage 2 (this project's addition, not BehaviorLM's): 0 = learn the subset's
                               # balanced prior (the paper); 1 = keep the data's prior (curriculum.py)
                               #   (logits + log(subset rate / data rate) in the loss: balanced softmax)
stage2_learning_rate = 5e-4    # stage 2: peak learning rate (decays to a tenth), lower than stage 1
stage2_iters = 500             # stage 2: iterations (max_iters is stage 1's)
# HeTLM: cluster-specific parameter sets (clusters from cluster.py)
n_clusters = 1                 # parameter sets; > 1 reads every user's cluster from `clusters`
cluster_scope = 'all'          # 'all': K independent models; 'blocks': shared embeddings and head;
                               #   'norms': shared weights, per-cluster LayerNorm gains and page bias
clusters = ''                  # int64 cluster per user (.npy); '' = data_dir/clusters.npy
# system
device = 'auto'                # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
threads = 0                    # CPU threads; 0: one per core while the machine is free, fewer while other
                               # jobs keep cores busy (looked at again at log lines, >= 10 s apart; runtime.CpuShare)
dtype = 'auto'                 # 'float32', 'bfloat16' (autocast), or 'auto': bf16 where it trains faster
                               #   (a bf16 GPU; a CPU with AMX / AVX512-BF16 when a few timed steps say so),
                               #   fp32 elsewhere; printed. bf16 matched fp32's validation NDCG@10 (README)
compile = False                # torch.compile the model (checkpoints still hold the plain weights)
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()   # the settings: lowercase globals (not imported CONSTANTS)
            if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str))}

MODEL_KEYS = ('block_size', 'n_layer', 'n_head', 'n_embd', 'dropout', 'bias', 'n_clusters', 'cluster_scope',
              'repeat_bias', 'repeat_decay')
OLDER_CHECKPOINTS = {'repeat_bias': False, 'repeat_decay': False}   # model_args a checkpoint from before the setting lacks


def get_lr(it, cfg, cool=None):
    """Linear warmup for warmup_iters, then cosine decay to min_lr at lr_decay_iters. In a cooldown
    (cool = [start, lr], after an early stop) a linear decay from lr at start to min_lr at max_iters."""
    if cool:
        start, lr = cool
        return lr + min(1.0, (it - start) / max(1, cfg['max_iters'] - start)) * (cfg['min_lr'] - lr)
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


def better(a, b, metric):
    """Is validation value a better than b? NaN is never better (a diverged run is never best)."""
    if math.isnan(a):
        return False
    return math.isnan(b) or (a < b if metric in LOWER_IS_BETTER else a > b)


BEST_METRICS = set(COLUMNS) | {'hmean', 'macro_recall', 'session_nll'}   # session_nll: --split=session data only


def check_config(cfg):
    """One-line errors for settings that would otherwise fail deep inside a run."""
    for k in ('max_iters', 'eval_interval', 'log_interval', 'gradient_accumulation_steps', 'batch_tokens',
              'block_size', 'stage2_iters', 'per_behavior', 'n_layer', 'n_head', 'n_embd', 'epochs'):
        if cfg[k] < 1 and cfg[k] != AUTO.get(k):
            raise ConfigError(f"--{k}={cfg[k]}: must be a positive integer" + (" (0: from the data)" if k in AUTO else ""))
    for k in ('dropout', 'learning_rate', 'min_lr', 'warmup_iters'):
        if cfg[k] < 0 and cfg[k] != AUTO[k]:
            raise ConfigError(f"--{k}={cfg[k]}: must be >= 0 ({AUTO[k]}: from the data)")
    if cfg['eval_users'] < 0:
        raise ConfigError(f"--eval_users={cfg['eval_users']}: must be >= 0 (0 = all)")
    if cfg.get('threads', 0) < 0:
        raise ConfigError(f"--threads={cfg['threads']}: must be >= 0 (0: one per free core)")
    if os.path.exists(cfg['out_dir']) and not os.path.isdir(cfg['out_dir']):
        raise ConfigError(f"--out_dir={cfg['out_dir']}: exists and is not a folder")
    if cfg['time_budget'] < 0 or cfg['patience'] < 0:
        raise ConfigError(f"--time_budget={cfg['time_budget']} --patience={cfg['patience']}: must be >= 0 (0 = off)")
    if cfg['dtype'] not in ('auto', 'float32', 'bfloat16'):
        raise ConfigError(f"--dtype={cfg['dtype']}: expected 'auto', 'float32' or 'bfloat16'")
    if cfg['stage'] not in (1, 2):
        raise ConfigError(f"--stage={cfg['stage']}: expected 1 (every behavior) or 2 (the balanced stage)")
    if cfg['init_from'] not in ('scratch', 'resume'):   # a checkpoint to warm-start from
        if cfg['stage'] == 2:
            raise ConfigError(f"--init_from={cfg['init_from']}: stage 2 starts from --stage1_ckpt instead")
        if not os.path.isfile(cfg['init_from']):
            raise ConfigError(f"--init_from={cfg['init_from']}: expected 'scratch', 'resume' or a checkpoint file")
    if cfg['n_clusters'] < 1 or cfg['cluster_scope'] not in SCOPES:
        raise ConfigError(f"--n_clusters={cfg['n_clusters']} --cluster_scope={cfg['cluster_scope']}: "
                          f"need n_clusters >= 1 and a scope in {SCOPES}")
    if cfg['best_metric'] != 'auto' and cfg['best_metric'] not in BEST_METRICS:
        raise ConfigError(f"--best_metric={cfg['best_metric']}: expected 'auto' or one of {sorted(BEST_METRICS)}")
    if not 0 <= cfg['band_low'] < cfg['band_high'] <= 1:
        raise ConfigError(f"--band_low={cfg['band_low']} --band_high={cfg['band_high']}: need 0 <= low < high <= 1")
    if cfg['tail_weight'] < 0 or not 0 <= cfg['class_balanced'] < 1:
        raise ConfigError("--tail_weight must be >= 0 and --class_balanced in [0, 1)")


def fill_settings(cfg, data, prior, master):
    """Settings left "from the data" (recipe.AUTO): those of the run we continue (prior: its
    checkpoint, on resume or in stage 2), else derived by recipe.derive and printed with their
    reasons. Returns (cfg, [(key, value, reason)] of every setting that came from the data, the
    data's statistics where they were read, else None)."""
    reasons, stats = [], None
    if prior is not None:
        reasons = [r for r in prior.get('derived', []) if cfg[r[0]] == AUTO[r[0]]]
        for k, auto in AUTO.items():
            if cfg[k] == auto and k in prior['config']:
                cfg[k] = prior['config'][k]
    if any(cfg[k] == auto for k, auto in AUTO.items()):
        stats = data_stats(data)
        cfg, new = derive(cfg, stats)
        reasons += new
        if master:
            print(describe(new, stats))
    return cfg, [list(r) for r in reasons], stats


def train(cfg):
    """Run one training stage with config dict `cfg`; returns the final report's results (the first
    process, with final_eval on; None otherwise)."""
    first = int(os.environ.get('RANK', 0)) == 0
    if first:   # one writer per out folder (files.hold): a second train.py there is refused
        hold(cfg['out_dir'], f"train.py --stage={cfg['stage']}")
    try:
        if settings_search.applies(cfg):   # stage 1 with room in the budget: settings chosen on validation
            run, stop = settings_search.run(cfg, Run)
        else:
            run = Run(cfg)
            stop = run.fit()
        return run.finish(stop)
    finally:
        if first:
            release(cfg['out_dir'])


class Run(Machinery):
    """One training stage, in the order a reader meets it:
      __init__   the data, the run we continue (stage 1 for stage 2, or our own checkpoint on
                 resume), the settings (from the data unless set), the model, the training
                 targets (stage 1: every window; stage 2: the balanced subset), the optimizer;
      fit        the loop: step, log, validate + checkpoint, early stop / cooldown, time budget;
      finish     what happened, then the final report on best.pt.
    The loop's state (iteration, best validation, early-stopping progress, cooldown) lives here and
    goes into every checkpoint, so a resumed run continues where it stopped. Under DDP every process
    builds the same Run; the first one validates, writes checkpoints and prints."""

    def __init__(self, cfg, verbose=True):
        check_config(cfg)
        self.asked = dict(cfg)              # the settings as given (before the rules fill them)
        self.cfg = cfg = dict(cfg)
        self.ddp, self.rank, self.world, self.dev = setup_distributed(cfg)
        cpu = self.dev == 'cpu' and not self.ddp    # (under DDP the processes split the cores)
        self.share = CpuShare(cfg['threads']) if cpu else None
        self.master = self.rank == 0
        self.talk = self.master and verbose   # the set-up's printout (search.py's candidates skip it)
        self.device_type = 'cuda' if self.dev.startswith('cuda') else ('mps' if self.dev.startswith('mps') else 'cpu')
        torch.manual_seed(cfg['seed'] + self.rank)
        self.data = self.load_data()
        self.stage_dir = os.path.join(cfg['out_dir'], f"stage{cfg['stage']}")
        self.ckpt_path, self.best_path = (os.path.join(self.stage_dir, f) for f in ('ckpt.pt', 'best.pt'))
        self.replaced = claim_stage_dir(self.stage_dir, cfg) if self.master else []
        ckpt, self.ref_model, stage1 = self.runs_we_continue()
        self.choose_settings(prior=ckpt or stage1)
        self.planned_iters = cfg['max_iters']   # the plan before the time budget or a cooldown moves its end
        self.build_model(ckpt)
        self.training_targets()
        self.restore(ckpt)
        self.choose_dtype(resumed=None if ckpt is None else ckpt['config'].get('dtype'))
        self.raw_model = self.model          # the plain module: checkpoints, validation
        if cfg['compile']:
            self.model = torch.compile(self.model)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.model, device_ids=[int(self.dev.split(':')[1])] if self.device_type == 'cuda' else None)
        if self.talk:
            self.print_plan()
        self.t_start = time.time()
        self.rng_state = torch.get_rng_state()   # this run's dropout stream (runs of a search take turns)

    # --- setup -------------------------------------------------------------------------------
    def load_data(self):
        """The prepared dataset (the built-in one is generated on first use), and best_metric."""
        cfg = self.cfg
        if os.path.normpath(cfg['data_dir']) == os.path.normpath(DEFAULTS['data_dir']):
            if self.master:
                ensure_builtin(cfg['data_dir'])
            if self.ddp:
                torch.distributed.barrier()
        data = load_data(cfg['data_dir'])
        if data.vocab_size <= 4:
            raise ConfigError(f"{cfg['data_dir']}: its vocabulary holds no page (only the special tokens); "
                              "prepare it again from a log with events")
        if not (np.asarray(data.val_pos) >= 0).any():
            raise ConfigError(f"{cfg['data_dir']}: no user has a validation and a test target (each needs at least 3 "
                              f"{'sessions' if data.split == 'session' else 'events'}), so nothing can be validated")
        a = data.meta['anchor']
        if cfg['best_metric'] == 'auto':  # stage 2: hmean of anchor and tail accuracy (curriculum.py)
            cfg['best_metric'] = curriculum.selection_metric(cfg['stage'], data)
        if cfg['best_metric'] == 'session_nll' and data.split != 'session':
            raise ConfigError(f"--best_metric=session_nll: {cfg['data_dir']} has no held-out sessions "
                              f"(prepared with --split={data.split}, not --split=session)")
        if self.talk:
            print(describe_anchors({'n_pages': data.vocab_size - N_SPECIAL, **a}))
        return data

    def runs_we_continue(self):
        """(our own latest checkpoint on resume, stage 1's model, stage 1's checkpoint); None where
        there is none. Stage 1's best model is stage 2's start, difficulty scorer and KL reference."""
        cfg, data = self.cfg, self.data
        ckpt, ref_model, stage1 = None, None, None
        if cfg['stage'] == 2:
            src = cfg['stage1_ckpt'] or os.path.join(cfg['out_dir'], 'stage1', 'best.pt')
            if not os.path.isfile(src):
                raise ConfigError(f"--stage=2 starts from stage 1, but there is no {src}; "
                                  "run python train.py --stage=1 first (same --out_dir) or set --stage1_ckpt")
            ref_model, stage1 = load_checkpoint(src, self.dev)
            if stage1['tokenizer']['pages'] != data.tokenizer.pages:
                raise ConfigError(f"--stage=2: {src} was trained on another vocabulary than {cfg['data_dir']}")
            for p in ref_model.parameters():
                p.requires_grad_(False)
            if self.talk:
                print(f"stage 2 starts from {src} (iteration {stage1['iter_num']})")
        if cfg['init_from'] == 'resume':
            if not os.path.isfile(self.ckpt_path):
                raise ConfigError(f"--init_from=resume: no checkpoint at {self.ckpt_path}")
            ckpt = read_checkpoint(self.ckpt_path)
            if ckpt['tokenizer']['pages'] != data.tokenizer.pages:
                raise ConfigError(f"--init_from=resume: {self.ckpt_path} was trained on another vocabulary "
                                  f"than {cfg['data_dir']}")
        return ckpt, ref_model, stage1

    def choose_settings(self, prior):
        """The model and schedule: the architecture of the run we continue (prior), the settings
        left "from the data" (recipe.py), stage 2's short fine-tuning schedule; and the clusters."""
        cfg = self.cfg
        if prior is not None:  # the architecture comes from the checkpoint
            for k in MODEL_KEYS:
                cfg[k] = prior['model_args'].get(k, OLDER_CHECKPOINTS.get(k, DEFAULTS[k]))
        if cfg['stage'] == 2 and cfg['eval_interval'] == AUTO['eval_interval']:
            cfg['eval_interval'] = max(1, cfg['stage2_iters'] // 2)
        filled, self.derived, self.stats = fill_settings(cfg, self.data, prior, self.talk)
        cfg.update(filled)                # one config dict for the whole run
        if cfg['stage'] == 2:  # a short fine-tuning at a lower learning rate
            cfg.update(curriculum.stage2_schedule(cfg))
        check_config(cfg)
        if prior is None:
            self.user_clusters = load_clusters(cfg, self.data)
        else:
            self.user_clusters = None if prior.get('clusters') is None else prior['clusters'].numpy()

    def build_model(self, ckpt):
        """The GPT (one or K parameter sets), its starting weights and the optimizer."""
        cfg = self.cfg
        self.model_args = dict(block_size=cfg['block_size'], vocab_size=self.data.vocab_size, n_layer=cfg['n_layer'],
                               n_head=cfg['n_head'], n_embd=cfg['n_embd'], dropout=cfg['dropout'], bias=cfg['bias'],
                               n_clusters=cfg['n_clusters'], cluster_scope=cfg['cluster_scope'],
                               repeat_bias=cfg['repeat_bias'], repeat_decay=cfg['repeat_decay'])
        self.model = GPT(GPTConfig(**self.model_args)).to(self.dev)
        if ckpt is None and self.ref_model is not None:   # stage 2 starts as stage 1's model
            self.model.load_state_dict(self.ref_model.state_dict())
        if cfg['init_from'] not in ('scratch', 'resume'):   # warm start from another run's weights (checked above)
            warm_start(self.model, cfg, self.data, self.talk)
        self.optimizer = self.model.configure_optimizers(cfg['weight_decay'], cfg['learning_rate'],
                                                         (cfg['beta1'], cfg['beta2']), self.device_type)

    def training_targets(self):
        """What the loss sees: windows of the training histories (stage 1, with class weights), or
        the balanced subset (stage 2, with its prior correction); and the batch schedule over them."""
        cfg, data = self.cfg, self.data
        self.weight, self.logit_bias = None, None
        if cfg['stage'] == 1:
            self.windows = train_windows(data, cfg['block_size'])
            self.weight = curriculum.class_weights(cfg, data)
        else:  # each window ends at one chosen target; every process computes the same subset
            self.windows, bias = curriculum.stage2_windows(data, cfg, self.ref_model, self.dev, self.master,
                                                           self.user_clusters)
            if cfg['prior_keep'] > 0:
                self.logit_bias = bias.to(self.dev)
        if self.weight is not None:
            self.weight = self.weight.to(self.dev)
        self.groups = window_clusters(data, self.windows, self.user_clusters)
        # scope 'all' (K independent models): one parameter set per batch, as fast as a single model;
        # scopes with shared weights mix clusters in a batch, so shared weights see every cluster each step
        self.schedule = BatchSchedule(self.windows[:, 1] - self.windows[:, 0], cfg['batch_tokens'], self.rank,
                                      self.world, cfg['seed'], self.groups if cfg['cluster_scope'] == 'all' else None)

    def restore(self, ckpt):
        """The loop's state: fresh, or the checkpoint's (resume: weights, optimizer, RNG, best so far)."""
        self.iter_num, self.best_val, self.best_metrics, self.best_iter, self.elapsed_before = 0, None, {}, 0, 0.0
        self.best_users = None        # per-user best_metric at the best validation (search.py compares runs)
        self.search = None            # the settings search this run won (search.py), stored in checkpoints
        self.finished = None          # why training ended (a resume then only finishes the report)
        self.ended_before = None      # the same, from the checkpoint a resume starts from
        self.max_iters_before = 0     # and the --max_iters that run was given (0: from the data)
        # early stopping looks at two things: best_metric, and validation NLL, which is far less noisy
        # than a ranking metric on eval_users users (NDCG@10 on 2,000 users moves by ~0.01 between
        # evaluations of the same model); a run stops only when neither improved for `patience` of them
        self.progress = {'nll': math.inf, 'iter': 0}
        self.cool = None              # [iteration, learning rate] where a cooldown from best.pt began
        if ckpt is None:
            return
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

    # --- pieces of the loop ---------------------------------------------------------------------
    def batch(self, step):
        """Micro-batch `step` of this process: inputs, targets, cluster ids (or None), on the device."""
        rows = self.schedule(step)
        x, y = get_batch(self.data, self.windows, rows, last_only=self.cfg['stage'] == 2)
        cid = None if self.groups is None else torch.from_numpy(self.groups[rows]).to(self.dev)
        return x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True), cid

    def lr_at(self, it, cool=None):
        return get_lr(it, self.cfg, cool)

    def step(self):
        """One optimizer step over gradient_accumulation_steps micro-batches; returns its learning rate."""
        cfg, ga = self.cfg, self.cfg['gradient_accumulation_steps']
        use_kl = self.ref_model is not None and cfg['kl_weight'] > 0
        lr = self.lr_at(self.iter_num, self.cool)
        for group in self.optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        for micro in range(ga):
            x, y, cid = self.batch(self.iter_num * ga + micro)
            self.tokens_seen += int((y != -1).sum())
            if self.ddp:  # sync gradients only on the last micro-step
                self.model.require_backward_grad_sync = micro == ga - 1
            with self.autocast:
                logits, loss = self.model(x, y, cluster_ids=cid, class_weight=self.weight, logit_bias=self.logit_bias,
                                          return_logits=use_kl)   # without KL: chunked loss, no (N, V) logits
                nll = loss.detach() if use_kl else self.raw_model.last_nll   # unweighted (stage 2 has no weights)
                if use_kl:  # stay close to stage 1 (anchors)
                    with torch.no_grad():
                        ref_logits, _ = self.ref_model(x, y, cluster_ids=cid)
                    loss = loss + cfg['kl_weight'] * curriculum.kl_to_stage1(logits, ref_logits)
                loss = loss / ga
            loss.backward()
            self.loss_acc = loss.detach() if self.loss_acc is None else self.loss_acc + loss.detach()
            self.nll_acc += nll / ga
        if self.iter_num % cfg['log_interval'] == cfg['log_interval'] - 1 and not torch.isfinite(self.loss_acc):
            raise ConfigError(f"the loss diverged (non-finite) at iteration {self.iter_num}; "
                              f"lower --learning_rate (now {cfg['learning_rate']}) or set --grad_clip")
        if cfg['grad_clip'] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg['grad_clip'])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def log(self, lr, sec_per_iter):
        """The log line every log_interval steps: unweighted training NLL (comparable to validation
        NLL; the weighted loss beside it when tail_weight/class_balanced weigh targets), speed, time."""
        cfg = self.cfg
        if self.master:
            dt, n = time.time() - self.t0, cfg['log_interval']
            left = (cfg['max_iters'] - self.iter_num) * sec_per_iter
            log_metrics(self.stage_dir, {'kind': 'train', 'iter': self.iter_num, 'elapsed': round(self.elapsed(), 1),
                                         'lr': lr, 'train_nll': self.nll_acc.item() / n,
                                         'tokens_per_s': self.tokens_seen * self.world / dt})
            tqdm.write(f"iter {self.iter_num}/{cfg['max_iters']}: train nll {self.nll_acc.item() / n:.4f}"
                       + (f" (weighted loss {self.loss_acc.item() / n:.4f})" if self.weight is not None else "")
                       + f", lr {lr:.2e}, {self.tokens_seen * self.world / dt:,.0f} target tokens/s, "
                       f"{fmt_time(self.elapsed())} elapsed, ~{fmt_time(left)} left")
        self.reset_meters()

    def reset_meters(self):
        self.t0, self.tokens_seen, self.loss_acc, self.nll_acc = time.time(), 0, None, 0.0

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

    def validate(self):
        """Score the model on validation users (first process); update the best and the progress
        early stopping watches; print and log. Returns whether best_metric improved."""
        cfg, data = self.cfg, self.data
        self.raw_model.eval()
        metrics = evaluate_model(self.raw_model, data, 'val', cfg['block_size'], self.dev,
                                 max_users=cfg['eval_users'] or None, seed=cfg['seed'], clusters=self.user_clusters)
        if data.split == 'session':   # HeTLM's task: the NLL of the whole held-out session (sessions.py)
            metrics['session_nll'] = mean_session_nll(self.raw_model, data, 'val', self.dev, cfg['eval_users'] or None,
                                                      cfg['seed'], self.user_clusters)
        self.raw_model.train()
        value = metrics[cfg['best_metric']]
        improved = self.best_val is None or better(value, self.best_val, cfg['best_metric'])
        if improved:
            self.best_val, self.best_iter = value, self.iter_num
            self.best_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.best_users = per_user_scores(metrics, cfg['best_metric'])
        nll = metrics.get('session_nll', metrics['nll'])
        if improved or nll < self.progress['nll'] - 1e-4:     # (a change in the 5th digit is not progress)
            self.progress.update(nll=min(self.progress['nll'], nll), iter=self.iter_num)
        log_metrics(self.stage_dir, {'kind': 'val', 'iter': self.iter_num, 'elapsed': round(self.elapsed(), 1),
                                     'best': improved,
                                     **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        sess = f"session nll {metrics['session_nll']:.4f}, " if 'session_nll' in metrics else ''
        tqdm.write(f"iter {self.iter_num}: val {sess}nll {metrics['nll']:.4f}, hr@10 {metrics['hr@10']:.4f}, "
                   f"ndcg@10 {metrics['ndcg@10']:.4f}, acc anchor {metrics['acc_anchor']:.4f} "
                   f"tail {metrics['acc_tail']:.4f}{'  (best ' + cfg['best_metric'] + ')' if improved else ''}")
        return improved

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

    def fit(self, pause_at=None):
        """Train until max_iters, early stopping or the time budget; returns why it stopped early
        (None: it ran its iterations). pause_at (a multiple of eval_interval): return None at that
        iteration, validated and saved, with the run's clock stopped; fit() again goes on (search.py)."""
        cfg = self.cfg
        ended = self.ended_before    # a resumed run whose training had ended (killed in its report)
        if ended is not None and not self.asks_for_more(ended):
            if self.master:
                print(f"{self.ckpt_path}: training had ended ({ended}); only the report is left (an explicit "
                      f"--max_iters above {self.iter_num:,} trains on)")
            return None if ended == RAN else ended
        self.ended_before = self.finished = None
        for path in self.replaced:      # --overwrite=True: the old run goes once this one can start
            if os.path.isfile(path):
                os.remove(path)
        self.replaced = []
        self.t_start = time.time()                       # the clock runs while this run trains
        torch.set_rng_state(self.rng_state)              # and its own random stream (search.py interleaves runs)
        self.eval_secs, step_secs, stop = [], [], None   # validation and step times: the budget plans with them
        self.deadline = cfg['time_budget'] * 60 if cfg['time_budget'] > 0 else math.inf   # seconds of elapsed()
        warm = cfg['stage'] == 2 or cfg['init_from'] not in ('scratch', 'resume')
        if warm and self.iter_num == 0:  # the trained weights we start from are the score to beat
            self.validate_and_save()
        self.bar = tqdm(total=cfg['max_iters'], initial=self.iter_num, desc=f"stage {cfg['stage']}", unit='it',
                        disable=not self.master or None, dynamic_ncols=True)
        self.model.train()
        self.reset_meters()
        while self.iter_num < cfg['max_iters'] and stop is None and (pause_at is None or self.iter_num < pause_at):
            t_step = time.time()
            lr = self.step()
            self.iter_num += 1
            self.bar.update(1)
            step_secs.append(time.time() - t_step)
            sec_per_iter = float(np.median(step_secs[-100:]))       # the median: robust to a slow step
            # time budget: after a few iterations, and after each validation, check the plan still fits
            # (the first process decides for all, so every process runs the same schedule)
            if self.deadline < math.inf and (len(step_secs) == 10 or self.iter_num % cfg['eval_interval'] == 0):
                self.fit_time_budget(sec_per_iter)
            if self.iter_num % cfg['log_interval'] == 0:
                self.log(lr, sec_per_iter)
                self.share_cores()
            if self.iter_num % cfg['eval_interval'] == 0 or self.iter_num == cfg['max_iters']:
                self.validate_and_save()
                self.t0, self.tokens_seen = time.time(), 0
                stop = self.out_of_patience()
            if stop is None and self.iter_num % cfg['log_interval'] == 0 and self.agree(self.elapsed() > self.deadline):
                stop = f"time budget of {cfg['time_budget']:g} min reached at iteration {self.iter_num}"
                if self.iter_num % cfg['eval_interval'] != 0:
                    self.validate_and_save()
        self.bar.close()
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

    def finish(self, stop):
        """Say how the run ended, then the final report on best.pt (first process)."""
        cfg, results = self.cfg, None
        if self.master:
            print(stop or f"finished {self.iter_num:,} iterations in {fmt_time(self.elapsed())} "
                          f"(best at iteration {self.best_iter:,})")
            if cfg['stage'] == 2 and self.best_iter == 0:
                print(f"stage 2 keeps the stage-1 model: no fine-tuned checkpoint beat its validation "
                      f"{cfg['best_metric']} ({self.best_val:.4f}), so best.pt is stage 1's weights; a lower "
                      f"--stage2_learning_rate, --kl_weight > 0 or --prior_keep=1 change less of it")
            if cfg['final_eval']:
                results = final_report(self.best_path, self.data, cfg, self.dev, self.stage_dir, self.search)
        if self.ddp:
            torch.distributed.barrier()
            from torch.distributed import destroy_process_group
            destroy_process_group()
        return results


def main(argv):
    run_main(train, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
