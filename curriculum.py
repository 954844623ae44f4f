"""
BehaviorLM's curriculum (Meng et al., 2025, "Tuning Language Models for Robust Prediction of Diverse
User Behaviors"), whole: anchors and tail, the per-page loss weights of stage 1, the difficulty of
every training target, the balanced subset of stage 2, stage 2's loss terms, its schedule and the
metric that selects its checkpoint. train.py calls these; model.py and data.py know nothing of it.

- Anchors (data.py picks them when it prepares a log: the pages holding the head of the training
  targets) and the tail (every other page). Stage 1 trains on every user's full history; its loss
  weighs anchors and <eos> 1 and tail targets `tail_weight` (default 1: every page alike, the plain
  next-page loss; < 1 is BehaviorLM's "anchor first" stage, > 1 up-weights the tail).
- Stage 2 starts from stage 1's best.pt. It scores the difficulty of every training target
  (stage-1 cross-entropy, one batched pass), keeps up to `per_behavior` samples per behavior spread
  over a difficulty band (rare behaviors keep all they have), and fine-tunes on those targets with
  their full preceding context, at a lower learning rate for a short schedule.
- Two loss terms of stage 2: a KL term to the stage-1 model (`kl_weight`, off by default), and the
  subset's prior correction (`prior_keep`): the balanced subset shows rare behaviors far more often
  than the data does, so a fraction prior_keep of log(subset rate / data rate) is added to the
  logits inside the loss (a balanced softmax, Ren et al. 2020) and the model keeps the data's prior.
  prior_keep is this project's addition, not BehaviorLM's (0 = the paper's plain fine-tuning).
- Stage 2's checkpoint is chosen by the harmonic mean of anchor and tail accuracy on validation
  (`best_metric=auto`), the figure the curriculum is for.

Simplified from the paper: BehaviorLM fine-tunes a pretrained LLM on text renderings of behaviors;
here the same curriculum trains a small GPT from scratch on page tokens.
"""

import math

import numpy as np
import torch
from torch.nn import functional as F

from configurator import Progress
from data import epoch_batches, get_batch, train_windows
from tokenizer import N_SPECIAL


def class_weights(cfg, data):
    """(V,) loss weight per target class for stage 1: anchors and <eos> 1, tail pages tail_weight;
    times the class-balanced weight (1 - beta) / (1 - beta^n_c) when class_balanced = beta > 0."""
    from tokenizer import EOS
    V = data.vocab_size
    w = np.full(V, cfg['tail_weight'])
    w[data.anchor_ids] = 1.0
    w[EOS] = 1.0
    if cfg['class_balanced'] > 0:
        beta = cfg['class_balanced']
        n = np.asarray(data.tokenizer.counts, dtype=np.float64)
        eos = np.flatnonzero(np.asarray(data.tokens) == EOS)          # <eos> targets in training regions
        user = np.searchsorted(np.asarray(data.offsets), eos, side='right') - 1
        n[EOS] = int((eos < np.asarray(data.train_end)[user]).sum())
        w = w * np.where(n > 0, (1 - beta) / (1 - beta ** np.maximum(n, 1)), 0.0)
        w = w / w[n > 0].mean()
    if np.allclose(w, 1.0):
        return None  # plain cross-entropy
    return torch.tensor(w, dtype=torch.float32)



def target_difficulty(model, data, windows, device, batch_tokens=4096, groups=None):
    """Stage-1 cross-entropy of every page target inside the training windows, in one batched pass.
    Returns (pos, target, difficulty): absolute token index of each target, its page, its loss."""
    model.eval()
    lengths = windows[:, 1] - windows[:, 0]
    budget = max(64, min(batch_tokens, (1 << 24) // data.vocab_size))  # bound the (N, V) logits
    batches = epoch_batches(lengths, budget, 0, 0, groups=groups)
    pos, tgt, ce = [], [], []
    for rows in Progress(batches, desc='difficulty', unit='batch', leave=False):
        x, y = get_batch(data, windows, rows)
        keep = y >= N_SPECIAL                               # pages only: behaviors, not <eos>/<unk>
        y[~keep] = -1
        cid = None if groups is None else torch.from_numpy(groups[rows]).to(device)
        logits, _ = model(x.to(device), y.to(device), cluster_ids=cid)  # (N, V) at the kept targets
        ce.append(F.cross_entropy(logits.float(), y[keep].to(device), reduction='none').cpu().numpy())
        r, t = keep.nonzero(as_tuple=True)
        pos.append(windows[rows][r.numpy(), 0] + t.numpy() + 1)
        tgt.append(y[keep].numpy())
    return np.concatenate(pos), np.concatenate(tgt), np.concatenate(ce)


def balanced_subset(target, difficulty, per_behavior, band_low, band_high):
    """Indices of the balanced stage-2 samples. Per behavior (target page), samples are sorted by
    difficulty; a behavior with at most per_behavior samples keeps them all (the few-shot regime);
    otherwise per_behavior samples are taken evenly spread over its [band_low, band_high] quantile
    band (if the band is smaller than that, the hardest per_behavior below band_high)."""
    order = np.lexsort((difficulty, target))                # by behavior, then easiest first
    t = target[order]
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    ends = np.r_[starts[1:], len(t)]
    keep = []
    for a, b in zip(starts, ends):
        n = b - a
        if n <= per_behavior:
            keep.append(order[a:b])
            continue
        lo, hi = int(band_low * n), max(int(math.ceil(band_high * n)), per_behavior)
        band = order[a:b][lo:hi] if hi - lo >= per_behavior else order[a:b][hi - per_behavior:hi]
        keep.append(band[np.linspace(0, len(band) - 1, per_behavior).round().astype(np.int64)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def stage2_windows(data, cfg, ref_model, device, master, user_clusters=None):
    """The balanced subset as windows [start, target + 1): each chosen target with up to block_size
    tokens of its own user's preceding training history."""
    windows = train_windows(data, cfg['block_size'])
    from cluster import window_clusters
    groups = window_clusters(data, windows, user_clusters)
    pos, target, diff = target_difficulty(ref_model, data, windows, device, groups=groups)
    chosen = balanced_subset(target, diff, cfg['per_behavior'], cfg['band_low'], cfg['band_high'])
    user = np.searchsorted(np.asarray(data.offsets), pos[chosen], side='right') - 1
    start = np.maximum(np.asarray(data.offsets)[user], pos[chosen] - cfg['block_size'])
    counts = np.bincount(target, minlength=data.vocab_size)          # samples per behavior: data, subset
    kept = np.bincount(target[chosen], minlength=data.vocab_size)
    if master:
        anchor = np.isin(target[chosen], data.anchor_ids).mean() if len(chosen) else 0.0
        print(f"stage 2 subset: {len(chosen):,} of {len(target):,} training targets, "
              f"{int((kept > 0).sum()):,} behaviors ({int(((counts > 0) & (counts <= cfg['per_behavior'])).sum()):,} "
              f"keep all their samples), anchor share {anchor:.1%} (was {np.isin(target, data.anchor_ids).mean():.1%}), "
              f"difficulty band [{cfg['band_low']}, {cfg['band_high']}], mean stage-1 loss "
              f"{diff[chosen].mean():.3f} (all: {diff.mean():.3f})")
    # how much more often each behavior is seen in the subset than in the data, for prior_keep
    rate, base = kept / max(1, len(chosen)), counts / max(1, len(target))
    ratio = np.divide(rate, base, out=np.ones(data.vocab_size), where=(rate > 0) & (base > 0))
    bias = torch.tensor(cfg['prior_keep'] * np.log(ratio), dtype=torch.float32)
    return np.stack([start, pos[chosen] + 1], axis=1), bias


def kl_to_stage1(logits, ref_logits):
    """Stage 2's optional term: KL(stage-1 model || model) at the chosen targets, per target."""
    return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1),
                    log_target=True, reduction='batchmean')


def stage2_schedule(cfg):
    """Stage 2 is a short fine-tuning at a lower learning rate: the settings it replaces."""
    return dict(learning_rate=cfg['stage2_learning_rate'], min_lr=cfg['stage2_learning_rate'] / 10,
                max_iters=cfg['stage2_iters'], warmup_iters=min(cfg['warmup_iters'], cfg['stage2_iters'] // 10),
                lr_decay_iters=0)


def selection_metric(stage, data):
    """best_metric=auto: stage 2 picks its checkpoint by the harmonic mean of anchor and tail
    accuracy (where both kinds of target exist); stage 1 by NDCG@10 (session NLL on the session task)."""
    a = data.meta['anchor']
    both = 0 < a['n_anchors'] < data.vocab_size - N_SPECIAL
    return 'hmean' if stage == 2 and both else 'session_nll' if data.split == 'session' else 'ndcg@10'
