"""
Train the behavior GPT: next-page prediction on users' histories (HeTLM's small GPT trained from
scratch), in the stages of BehaviorLM's curriculum (curriculum.py).

    python train.py --stage=1                              # built-in dataset, generated if missing
    python train.py --stage=2                              # the balanced stage, from stage 1's best.pt
    python train.py --data_dir=data/bms --max_iters=3000   # a dataset prepared by data.py
    python train.py config/bms.py --init_from=resume       # a config file, then resume
    python train.py --n_clusters=5 --init_from=out/stage1/best.pt   # 5 sets, each starting as that model
    torchrun --standalone --nproc_per_node=2 train.py      # DistributedDataParallel (gloo on CPU)

Checkpoints go to out_dir/stage{stage}/: ckpt.pt (latest: model, optimizer, iteration, RNG) and
best.pt (best validation `best_metric`), with the tokenizer, anchors and config, so sample.py
needs nothing else (both load with torch.load(..., weights_only=True)). At the end best.pt is
scored once on the test split beside the simple baselines (baselines.py), with a paired bootstrap
interval against the best of them (evaluate.py); the tables go to stdout and results.json. Where
the time budget has room, stage 1 first chooses dropout (and, for long histories, the context) on
validation by successive halving (search.py; --search=False).

Stage 1 trains on every user's full history (tail targets weigh `tail_weight`); stage 2 fine-tunes
on a difficulty-balanced subset of the training targets, each with its full context, at a lower
learning rate, optionally with a KL term to the stage-1 model (curriculum.py). Baselines in the
same harness: --tail_weight=1 (one stage), --class_balanced=0.999 (class-balanced loss); every
final report adds post-hoc logit adjustment of the model it trained.
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
from runtime import (RAN, CpuShare, Machinery, claim_stage_dir, fmt_time, load_checkpoint, log_metrics,
                     setup_distributed, warm_start)
from model import GPT, GPTConfig, draw_negatives, sampling_weights
from data import BatchSchedule, DataError, describe_anchors, train_windows, get_batch
from cluster import load_clusters, window_clusters
import curriculum
from recipe import AUTO, check_config, fill_settings
from tokenizer import N_SPECIAL
from baselines import popularity, transition_table
from evaluate import LOWER_IS_BETTER, evaluate_model, final_report, per_user_scores
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
transitions = -1               # data: the transition term, up to this many pages that followed each token in
                               #   the training data get a learned logit offset by their count (model.GPT.transition_terms;
                               #   32 where pages have few training events, else 0 = none)
sampled_softmax = -1           # data: pages drawn per step (by popularity^0.75) for a sampled softmax in place of
                               #   the full one (model.GPT._sampled_loss; 1024 from 10,000 pages, else 0 = the full softmax)
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
              'repeat_bias', 'repeat_decay', 'transitions')
OLDER_CHECKPOINTS = {'repeat_bias': False, 'repeat_decay': False, 'transitions': 0}   # model_args a checkpoint from before the setting lacks


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
        self.share = CpuShare.for_process(cfg['threads']) if cpu else None
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
            # the only buffers are the transition table, the same on every rank: not re-sent every step
            self.model = DDP(self.model, device_ids=[int(self.dev.split(':')[1])] if self.device_type == 'cuda' else None,
                             broadcast_buffers=False)
        if self.talk:
            self.print_plan()
        self.t_start = time.time()
        self.rng_state = torch.get_rng_state()   # this run's dropout stream (runs of a search take turns)

    # --- setup -------------------------------------------------------------------------------
    def load_data(self):
        """The prepared dataset (runtime.Machinery.open_dataset), and the metric that picks best.pt."""
        cfg = self.cfg
        data = self.open_dataset()
        if cfg['best_metric'] == 'auto':  # stage 2: hmean of anchor and tail accuracy (curriculum.py)
            cfg['best_metric'] = curriculum.selection_metric(cfg['stage'], data)
        if cfg['best_metric'] == 'session_nll' and data.split != 'session':
            raise ConfigError(f"--best_metric=session_nll: {cfg['data_dir']} has no held-out sessions "
                              f"(prepared with --split={data.split}, not --split=session)")
        if self.talk:
            print(describe_anchors({'n_pages': data.vocab_size - N_SPECIAL, **data.meta['anchor']}))
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
            ckpt = self.read_resume()     # runtime.Machinery: our own ckpt.pt, checked
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
        if cfg['stage'] == 2 and cfg['sampled_softmax'] == AUTO['sampled_softmax']:
            cfg['sampled_softmax'] = 0    # one target per window: the full softmax is cheap (the sampled one is unmeasured there)
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
                               repeat_bias=cfg['repeat_bias'], repeat_decay=cfg['repeat_decay'],
                               transitions=cfg['transitions'])
        self.model = GPT(GPTConfig(**self.model_args)).to(self.dev)
        if ckpt is None and self.ref_model is not None:   # stage 2 starts as stage 1's model
            self.model.load_state_dict(self.ref_model.state_dict())
        if cfg['init_from'] not in ('scratch', 'resume'):   # warm start from another run's weights (checked above)
            warm_start(self.model, cfg, self.data, self.talk)
        if ckpt is None and cfg['transitions']:   # the transition term's table: this data's training counts
            self.model.set_transitions(*transition_table(self.data, cfg['transitions']))
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
        self.neg_q = None if cfg['sampled_softmax'] == 0 else sampling_weights(popularity(data, eos=True))   # (CPU)
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
        if ckpt is not None:
            self.resume_state(ckpt)     # runtime.Machinery: the checkpoint's weights, optimizer, RNG and loop state

    # --- pieces of the loop ---------------------------------------------------------------------
    def batch(self, step):
        """Micro-batch `step` of this process: inputs, targets, cluster ids (or None), on the device."""
        rows = self.schedule(step)
        x, y = get_batch(self.data, self.windows, rows, last_only=self.cfg['stage'] == 2)
        cid = None if self.groups is None else torch.from_numpy(self.groups[rows]).to(self.dev)
        return x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True), cid

    def lr_at(self, it, cool=None):
        return get_lr(it, self.cfg, cool)

    def negatives(self):
        """A sampled softmax's pages for one micro-batch (None: the full softmax), drawn with the CPU's
        random stream (the one checkpoints keep), then moved to the device."""
        if self.neg_q is None:
            return None
        return tuple(a.to(self.dev) for a in draw_negatives(self.neg_q, self.cfg['sampled_softmax']))

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
                                          return_logits=use_kl,   # without KL: chunked loss, no (N, V) logits
                                          negatives=None if use_kl else self.negatives())
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
                       + (" (sampled softmax)" if self.neg_q is not None and not self.cfg['kl_weight'] > 0 else "")
                       + (f" (weighted loss {self.loss_acc.item() / n:.4f})" if self.weight is not None else "")
                       + f", lr {lr:.2e}, {self.tokens_seen * self.world / dt:,.0f} target tokens/s, "
                       f"{fmt_time(self.elapsed())} elapsed, ~{fmt_time(left)} left")
        self.reset_meters()

    def reset_meters(self):
        self.t0, self.tokens_seen, self.loss_acc, self.nll_acc = time.time(), 0, None, 0.0

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
        self.print_validation(metrics, improved)
        return improved

    def fit(self, pause_at=None):
        """Train until max_iters, early stopping or the time budget; returns why it stopped early
        (None: it ran its iterations). pause_at (a multiple of eval_interval): return None at that
        iteration, validated and saved, with the run's clock stopped; fit() again goes on (search.py)."""
        cfg = self.cfg
        if not self.begin_fit():        # runtime.Machinery: a resumed run that had ended only reports
            return None if self.ended_before == RAN else self.ended_before
        step_secs, stop = [], None      # step times: the time budget plans with them
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
        return self.end_fit(stop, pause_at)

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
        self.end_distributed()
        return results


def main(argv):
    run_main(train, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
