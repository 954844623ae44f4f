"""
Settings that fit the data: the model and schedule train.py uses when the user does not set them.

A user's logs differ from ours in every direction (sessions of 2 or 200 pages, histories of 3 or
3,000 events, catalogues of 17 or 200,000 pages), so no fixed default fits them all. train.py
marks the settings below as "from the data" (0, or -1 where 0 is a real value); `derive` fills
each one from the prepared dataset's statistics by one rule, and returns a reason per rule that
train.py prints at start and stores in the checkpoint. A value given on the command line or in a
config file is never changed.

    from recipe import data_stats, derive
    cfg, reasons = derive(cfg, data_stats(data))

Every rule names the measurement that chose it (README, "Settings that fit the data").
check_config (one-line errors for settings that cannot work) and fill_settings (the rules, or the
settings of the run a resume or stage 2 continues) are what train.py calls.
"""

import math
import os

import numpy as np

from configurator import ConfigError
from evaluate import BEST_METRICS
from model import SCOPES
from tokenizer import N_SPECIAL

# what "from the data" looks like in train.py's globals block
AUTO = {'block_size': 0, 'n_layer': 0, 'n_head': 0, 'n_embd': 0, 'dropout': -1.0, 'batch_tokens': 0,
        'learning_rate': 0.0, 'min_lr': -1.0, 'max_iters': 0, 'warmup_iters': -1, 'eval_interval': 0,
        'transitions': -1, 'sampled_softmax': -1}
SPARSE_PER_PAGE = 50   # training events per page below which the transition term is on (docs/recipe.md)
SAMPLED_MIN_PAGES = 10_000   # pages from which a sampled softmax replaces the full one (docs/performance.md)
SAMPLED_PAGES = 1024         # and the pages it draws per step
OLDER_RUNS = {'sampled_softmax': 0}   # what a run we continue had, where its checkpoint predates the setting


def data_stats(data):
    """The statistics the recipe reads, from a prepared dataset (data.BehaviorData); cheap (numpy
    over the token stream once)."""
    off = np.asarray(data.offsets, dtype=np.int64)
    train_len = data.train_end - off[:-1]                        # (U,) tokens of each user's training part
    m = data.meta
    tok = np.asarray(data.tokens)
    user = np.repeat(np.arange(data.n_users, dtype=np.int64), np.diff(off))
    page = (tok >= N_SPECIAL) & (np.arange(len(tok)) < data.train_end[user])   # training page events
    pairs = user[page] * data.vocab_size + tok[page]
    n_events = int(page.sum())
    return {
        'users': data.n_users, 'eval_users': m['n_eval_users'], 'pages': data.vocab_size - N_SPECIAL,
        'train_tokens': int(train_len.sum()), 'train_events': n_events,
        'len_p50': float(np.percentile(train_len, 50)), 'len_p90': float(np.percentile(train_len, 90)),
        'session_len': m['n_events'] / max(1, m['n_sessions']),
        'repeat_rate': 1 - len(np.unique(pairs)) / max(1, n_events),  # events that revisit one of the user's pages
    }


def pow2(x, lo, hi):
    """The smallest power of two >= x, clipped to [lo, hi]."""
    return int(min(hi, max(lo, 2 ** math.ceil(math.log2(max(1.0, x))))))


def derive(cfg, s):
    """cfg with every "from the data" setting filled in, and [(key, value, reason)] for those."""
    cfg, out = dict(cfg), []

    def rule(key, value, reason):
        if cfg[key] == AUTO[key]:
            cfg[key] = value
            out.append((key, value, reason))

    D, per_page = s['train_tokens'], s['train_events'] / max(1, s['pages'])
    # context: the histories of 9 users in 10 (p90 of training lengths), as a power of two in
    # [32, 128]; on UCI Online Retail (p90 220) 256 tokens scored below 64 at the same steps
    rule('block_size', pow2(s['len_p90'], 32, 128), f"p90 of users' training tokens is {s['len_p90']:.0f}")
    # width: a catalogue of thousands of pages needs wider page vectors, if each page has enough
    # events to learn one (Online Retail, 3,661 pages, 115 events each: 128 > 64 at the same steps;
    # the sparse simulated shop, 19,576 pages, 10 each, over-fits at 64 already)
    wide = s['pages'] >= 1000 and per_page >= 50
    rule('n_embd', 128 if wide else 64, f"{s['pages']:,} pages, {per_page:,.0f} training events per page")
    # the transition term (model.GPT.transition_terms): where a page has too few events for its
    # embedding to learn whom it follows (the sparse shop, 10 per page: validation 1.00x -> 1.04x
    # Markov); with hundreds per page the GPT learns it, and the term slowed it (BMS, 244 per page:
    # validation 0.4483 -> 0.4347)
    sparse = per_page < SPARSE_PER_PAGE
    rule('transitions', 32 if sparse else 0, f"{per_page:,.0f} training events per page: "
         + ("too few to learn whom each page follows" if sparse else f"at least {SPARSE_PER_PAGE}, the GPT learns it"))
    # the loss: a catalogue of over 10,000 pages makes the full softmax most of a step; a sampled one
    # (model.GPT._sampled_loss) trains 3.6x faster there to the same validation (the sparse shop,
    # 19,576 pages: about 51,600 against 14,100 target tokens/s); with a few thousand pages it
    # gained 1.1x and validated lower (Online Retail, 3,661 pages)
    big = s['pages'] >= SAMPLED_MIN_PAGES
    rule('sampled_softmax', SAMPLED_PAGES if big else 0, f"{s['pages']:,} pages: "
         + (f"a sampled softmax of {SAMPLED_PAGES:,} drawn pages" if big else f"under {SAMPLED_MIN_PAGES:,}, the full softmax"))
    rule('n_layer', 2, "2 blocks, as SASRec")
    rule('n_head', max(1, cfg['n_embd'] // 32), f"heads of 32 dimensions (n_embd {cfg['n_embd']})")
    # regularization: 0.3 was no better on the sparse simulated shop, where 0.1 over-fits too
    rule('dropout', 0.1, "0.1 on every development set")
    # micro-batches: at least 16 rows of the longest context
    rule('batch_tokens', max(4096, 16 * cfg['block_size']), f"16 rows of {cfg['block_size']} tokens, at least 4,096")
    rule('learning_rate', 3e-3 if cfg['n_embd'] <= 64 else 2e-3, f"n_embd {cfg['n_embd']}")
    rule('min_lr', cfg['learning_rate'] / 10, "a tenth of the peak")
    # length: `epochs` passes over the training tokens (padding ignored), at least 1,000 iterations;
    # the time budget may shorten it (train.py re-plans the schedule after its first iterations)
    its = math.ceil(cfg['epochs'] * D / cfg['batch_tokens'])
    rule('max_iters', max(1000, its), f"{cfg['epochs']} epochs of {D:,} tokens in batches of {cfg['batch_tokens']:,}")
    rule('warmup_iters', min(100, cfg['max_iters'] // 20), "5% of the iterations, at most 100")
    rule('eval_interval', min(cfg['max_iters'], max(50, cfg['max_iters'] // 20)), "about 20 validations per run")
    return cfg, out


def describe(reasons, s):
    """The block train.py prints at start: the statistics, then each derived value with its reason."""
    lines = [f"settings from the data ({s['users']:,} users, {s['pages']:,} pages, {s['train_tokens']:,} training "
             f"tokens; per user p50 {s['len_p50']:.0f} / p90 {s['len_p90']:.0f} tokens; {s['session_len']:.1f} "
             f"pages per session; {s['repeat_rate']:.0%} repeats):"]
    lines += [f"  {k:<14} {v:<8g} {why}" for k, v, why in reasons]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# train.py's settings: checked, then filled from the data

def check_config(cfg):
    """One-line errors for settings that would otherwise fail deep inside a run."""
    for k in ('max_iters', 'eval_interval', 'log_interval', 'gradient_accumulation_steps', 'batch_tokens',
              'block_size', 'stage2_iters', 'per_behavior', 'n_layer', 'n_head', 'n_embd', 'epochs'):
        if cfg[k] < 1 and cfg[k] != AUTO.get(k):
            raise ConfigError(f"--{k}={cfg[k]}: must be a positive integer" + (" (0: from the data)" if k in AUTO else ""))
    for k in ('dropout', 'learning_rate', 'min_lr', 'warmup_iters', 'transitions', 'sampled_softmax'):
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
            if cfg[k] == auto and (k in prior['config'] or k in OLDER_RUNS):
                cfg[k] = prior['config'].get(k, OLDER_RUNS.get(k))
    if any(cfg[k] == auto for k, auto in AUTO.items()):
        stats = data_stats(data)
        cfg, new = derive(cfg, stats)
        reasons += new
        if master:
            print(describe(new, stats))
    return cfg, [list(r) for r in reasons], stats
