"""
Next-page evaluation: leave-last-out, full ranking over all pages, as SASRec and RecBole report it.

Protocol (docs/how-it-works.md, "Evaluation protocol (next page)"):
  1. each user with >= 3 pages has one validation target (the page before the last) and one test
     target (the last page); the context is everything before the target (truncated for the model);
  2. every page in the vocabulary is ranked for every example (no sampled negatives); special
     tokens are never ranked; rank = number of pages scored strictly higher than the target;
  3. a target unseen in training is <unk>: a miss for every metric, its rate is reported;
  4. HR@1/5/10, NDCG@5/10, MRR, NLL (softmax over pages only), top-1 accuracy on anchor / tail targets;
  5. the simple baselines of baselines.py run in the same harness, fitted on training data only
     (most-popular, first-order Markov, sequential rules, session-based kNN, the user's recent
     pages); the model is compared with the best of them on validation, with a paired bootstrap
     95% interval over users of the difference in NDCG@10 (paired_bootstrap).

  python evaluate.py --ckpt=out/stage1/best.pt                    # validation, model + baselines
  python evaluate.py --ckpt=out/stage1/best.pt --split=test       # report test once, at the end
  python evaluate.py --data_dir=data/bms --baselines_only         # floors, no checkpoint needed

On a dataset prepared with `--split=session` the targets are the first pages of the held-out
sessions, and HeTLM's session task is scored too (sessions.py: session NLL, generated sessions
against the real ones, --outcome=PAGE).
"""
import argparse
import math
import os
import sys
import json
import time

import numpy as np
import torch

from baselines import popularity
from configurator import Progress, compact_heap
from data import eval_examples
from files import atomic_output
from runtime import load_checkpoint, plain, resolve_device
from tokenizer import N_SPECIAL, PAD, UNK  # ids 0..3 are <pad> <unk> <bos> <eos>; pages start at 4

KS = (1, 5, 10)               # cut-offs for HR@k (NDCG@k for k in 5, 10)
LOWER_IS_BETTER = {"nll", "session_nll"}   # validation metrics where lower is better (the rest: higher)
COLUMNS = ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "nll", "acc_anchor", "acc_tail", "macro_f1", "w_prec"]
BEST_METRICS = set(COLUMNS) | {'hmean', 'macro_recall', 'session_nll'}   # session_nll: --split=session data only

# -----------------------------------------------------------------------------
# ranking math: one batch of scores -> per-row results

def rank_metrics(scores, targets):
    """scores (B, V) float, higher = more likely, or (1, V) shared by every row; targets (B,) int64.
    Returns per-row tensors: rank (0 = top, inf for <unk>/special targets), logp (log-softmax over
    pages of the target, NaN for <unk>), pred (top-1 page id). Ties count in the target's favour."""
    B = len(targets)
    scores = scores.float()
    pages = scores[:, N_SPECIAL:]                                        # (B or 1, P) only pages compete
    known = targets >= N_SPECIAL                                         # (B,)
    t = targets.clamp(min=N_SPECIAL).unsqueeze(1)                        # (B, 1) dummy page for <unk>
    target_score = scores.expand(B, -1).gather(1, t)                     # (B, 1)
    if len(scores) == 1 and B > 1:                                       # shared row: sort it once
        ascending = pages[0].sort().values
        rank = len(ascending) - torch.searchsorted(ascending, target_score.squeeze(1), right=True)
    else:                                                                # count as uint8: 2x faster than bool
        rank = (pages > target_score).view(torch.uint8).sum(1, dtype=torch.int64)
    known = known & torch.isfinite(target_score.squeeze(1))              # a diverged (NaN) model misses
    rank = torch.where(known, rank.to(torch.float64), math.inf)         # (B,)
    logp = (target_score.squeeze(1) - torch.logsumexp(pages, dim=1)).double()
    logp = torch.where(known, logp, math.nan)
    pred = (pages.argmax(dim=1) + N_SPECIAL).expand(B)
    return {"rank": rank, "logp": logp, "pred": pred}

def classification_metrics(pred, target, n_classes):
    """BehaviorLM's view of top-1 predictions as a classifier over pages: macro recall and macro-F1
    (averaged over the pages that occur as targets) and precision weighted by target support."""
    known = target >= N_SPECIAL
    support = np.bincount(target[known], minlength=n_classes).astype(np.float64)       # (V,)
    predicted = np.bincount(pred, minlength=n_classes).astype(np.float64)
    tp = np.bincount(target[known & (pred == target)], minlength=n_classes).astype(np.float64)
    present = support > 0
    recall = tp[present] / support[present]
    precision = np.divide(tp, predicted, out=np.zeros(n_classes), where=predicted > 0)[present]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(recall)),
                   where=(precision + recall) > 0)
    if not present.any():
        return {"macro_recall": math.nan, "macro_f1": math.nan, "w_prec": math.nan}
    return {"macro_recall": float(recall.mean()), "macro_f1": float(f1.mean()),
            "w_prec": float((precision * support[present]).sum() / support[present].sum())}


def summarize(examples, anchor_ids, train_counts=None):
    """Per-example arrays (rank, logp, target, pred, user) -> dict of scalar metrics.
    train_counts (V,): training count of each page, for the few-shot view (tail pages seen at most
    5 / 20 times in training)."""
    rank, logp, target, pred = examples["rank"], examples["logp"], examples["target"], examples["pred"]
    n = len(rank)
    known = target >= N_SPECIAL
    is_anchor = np.isin(target, np.asarray(anchor_ids, dtype=np.int64))
    hit = pred == target                                                 # never true for <unk>
    mean = lambda x: float(np.mean(x)) if len(x) else math.nan
    m = {f"hr@{k}": mean(rank < k) for k in KS}
    for k in (5, 10):
        m[f"ndcg@{k}"] = mean(ndcg_at(rank, k))
    m["mrr"] = mean(1.0 / (rank + 1.0))                                  # full MRR; inf rank -> 0
    m["nll"] = mean(-logp[known])                                        # <unk> targets excluded
    m["acc_anchor"] = mean(hit[is_anchor])
    m["acc_tail"] = mean(hit[~is_anchor])                                # tail includes <unk> (misses)
    a, t = m["acc_anchor"], m["acc_tail"]
    m["hmean"] = 2 * a * t / (a + t) if a + t > 0 else (math.nan if math.isnan(a + t) else 0.0)
    n_classes = int(max(target.max(initial=0), pred.max(initial=0))) + 1
    if train_counts is not None:
        n_classes = max(n_classes, len(train_counts))
        seen = np.asarray(train_counts)[np.where(known, target, 0)]
        for k in (5, 20):
            m[f"acc_fewshot{k}"] = mean(hit[known & ~is_anchor & (seen <= k)])
            m[f"n_fewshot{k}"] = int((known & ~is_anchor & (seen <= k)).sum())
    m.update(classification_metrics(pred.astype(np.int64), target.astype(np.int64), n_classes))
    m["n"], m["n_anchor"] = n, int(is_anchor.sum())
    m["unk"] = mean(~known)
    m["examples"] = examples
    return m

def ndcg_at(rank, k=10):
    """Per-example NDCG@k from 0-based ranks (inf for a miss): 1 / log2(rank + 2) inside the top k, else 0."""
    rank = np.asarray(rank, dtype=np.float64)
    return np.where(rank < k, 1.0 / np.log2(np.minimum(rank, k) + 2.0), 0.0)

def paired_bootstrap(a, b, n_boot=1000, seed=0, level=0.95, chunk=1 << 22):
    """Paired bootstrap over users of mean(a) - mean(b): a, b (n,) per-user scores of two methods on
    the same users (one example per user). Users are resampled with replacement n_boot times, the
    same resample for both methods, so what they share (easy and hard users) cancels. Returns
    (difference, low, high): the observed difference and the percentile interval at `level`.
    Draws are made in chunks of about `chunk` indices, so a million users need no n_boot x n table."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan
    rng, means = np.random.default_rng(seed), []
    rows = max(1, chunk // n)                                            # resamples per draw
    for i in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - i), n))
        means.append(d[idx].mean(axis=1))
    means = np.concatenate(means)
    tail = 100 * (1 - level) / 2
    return float(d.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))

def per_user_stats(examples):
    """HeTLM's alignment view: per-user mean, std and 10th percentile of NLL and HR@10 (users whose
    only targets are <unk> are left out of the NLL figures). nll_p90 is the worst decile's edge."""
    users, inv = np.unique(examples["user"], return_inverse=True)
    hr10 = np.bincount(inv, weights=(examples["rank"] < 10).astype(np.float64)) / np.bincount(inv)
    known = np.isfinite(examples["logp"])
    n_known = np.bincount(inv[known], minlength=len(users))
    nll = np.bincount(inv[known], weights=-examples["logp"][known], minlength=len(users))
    nll = nll[n_known > 0] / n_known[n_known > 0]
    f = lambda fn, x, *a: float(fn(x, *a)) if len(x) else math.nan
    return {"users": len(users), "nll_mean": f(np.mean, nll), "nll_std": f(np.std, nll),
            "nll_p10": f(np.percentile, nll, 10), "nll_p90": f(np.percentile, nll, 90),
            "hr@10_mean": f(np.mean, hr10), "hr@10_std": f(np.std, hr10), "hr@10_p10": f(np.percentile, hr10, 10)}

def per_user_by_cluster(examples, clusters=None):
    """{'all': per_user_stats} and, given clusters (n_users,), one 'cluster c' entry per parameter set
    that has evaluated users (a set with none is left out)."""
    out = {"all": per_user_stats(examples)}
    if clusters is not None:
        for c in range(int(clusters.max()) + 1):
            sel = clusters[examples["user"]] == c
            if sel.any():
                out[f"cluster {c}"] = per_user_stats({k: v[sel] for k, v in examples.items()})
    return out

# -----------------------------------------------------------------------------
# the evaluation set and the loop shared by every method

eval_set = eval_examples   # (users, ctx_start, ctx_end, targets); max_users > 0: a fixed seeded subset

EVAL_TOKENS = 1 << 14  # context tokens per model pass at most (block 256: 64 users); bounds eval memory
EVAL_LOGITS = 1 << 25  # scores per evaluation batch at most (128 MB in fp32): with 200,000 pages, 167 users


def evaluate(data, split, scorers, batch_size=512, max_users=None, seed=0):
    """scorers: {name: fn(users, ctx_start, ctx_end) -> (B, V) or shared (1, V) scores} -> {name: metrics}.
    Examples are visited sorted by context length, so a model's batches carry little padding;
    per-example results are put back in user order."""
    users, ctx_start, ctx_end, targets = eval_set(data, split, max_users, seed)
    order = np.argsort(ctx_end - ctx_start, kind="stable")
    out = {name: {k: [] for k in ("rank", "logp", "pred")} for name in scorers}
    batch_size = max(1, min(batch_size, EVAL_LOGITS // data.vocab_size))   # bounded (B, V) scores
    with compact_heap():   # (B, V) blocks of a new size at each batch would fragment the heap
        for i in Progress(range(0, len(order), batch_size), desc=f"scoring {split}", unit="batch", leave=False):
            rows = order[i:i + batch_size]
            tgt = torch.from_numpy(targets[rows])
            for name, score in scorers.items():
                scores = score(users[rows], ctx_start[rows], ctx_end[rows])  # (B, V)
                r = rank_metrics(scores, tgt.to(scores.device))
                for k in r:
                    out[name][k].append(r[k].cpu().numpy())
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    results = {}
    for name, r in out.items():
        ex = {k: (np.concatenate(v) if v else np.zeros(0))[inverse] for k, v in r.items()}
        ex.update(target=targets, user=users)
        tok = getattr(data, "tokenizer", None)
        results[name] = summarize(ex, data.anchor_ids, None if tok is None else tok.counts)
    return results

# -----------------------------------------------------------------------------
# the model as a scorer

@torch.inference_mode()
def model_scores(model, data, ctx_start, ctx_end, block_size, device, cluster_ids=None, drop_first=0):
    """Logits (B, V) of the next page after each context. Contexts keep their last block_size
    tokens, right-padded with PAD (causal attention: the last real position never sees the pads).
    drop_first=k (a diagnostic): a whole context (not cut by the block) of more than k + 1 tokens
    loses the k tokens after its first, so its target sits k positions shallower."""
    start = np.maximum(ctx_start, ctx_end - block_size)
    lengths = ctx_end - start                                            # (B,) >= 1 (<bos> at least)
    T = int(lengths.max())
    pos = start[:, None] + np.arange(T)[None, :]                         # (B, T) absolute positions
    real = pos < ctx_end[:, None]
    x = np.where(real, np.asarray(data.tokens[np.minimum(pos, ctx_end[:, None] - 1)], dtype=np.int64), PAD)
    if drop_first:
        ok = (start == ctx_start) & (lengths > drop_first + 1)
        x[ok, 1:T - drop_first] = x[ok, 1 + drop_first:]
        x[ok, T - drop_first:] = PAD
        lengths = np.where(ok, lengths - drop_first, lengths)
    idx = torch.from_numpy(x).to(device)
    last = torch.as_tensor(lengths - 1, device=device)[:, None]          # (B, 1) each context's last position
    logits = model.next_logits(idx, last, cluster_ids, rows=max(1, EVAL_TOKENS // T))   # rows bound the activations
    return logits[:, 0]                                                  # (B, V)


def log_prior(data):
    """log of each page's training frequency (add-one smoothed); 0 for specials, which are never ranked."""
    p = popularity(data)
    p[:N_SPECIAL] = 1.0
    return torch.from_numpy(np.log(p)).float()


def evaluate_model(model, data, split, block_size, device, batch_size=512, max_users=None, seed=0, clusters=None,
                   logit_adjust=0.0, drop_first=0):
    """Metrics of one model; clusters (n_users,) = each user's parameter set, or None (K = 1).
    logit_adjust = tau > 0: post-hoc logit adjustment (Menon et al., 2021), rank by
    logits - tau * log prior(page), which favours rare pages. A list of taus -> {tau: metrics},
    all from one pass of the model (each batch's logits are shared by every tau)."""
    taus = list(logit_adjust) if isinstance(logit_adjust, (list, tuple)) else [logit_adjust]
    prior = log_prior(data).to(device) if any(taus) else None
    last = {}                                    # the current batch's users and logits
    def scorer(tau):
        def score(users, ctx_start, ctx_end):
            if last.get("users") is None or not np.array_equal(last["users"], users):
                cids = None if clusters is None else np.asarray(clusters)[users]
                last["users"] = users
                last["logits"] = model_scores(model, data, ctx_start, ctx_end, block_size, device, cids, drop_first)
            return last["logits"] - tau * prior if tau else last["logits"]
        return score
    res = evaluate(data, split, {tau: scorer(tau) for tau in taus}, batch_size, max_users, seed)
    return res if isinstance(logit_adjust, (list, tuple)) else res[taus[0]]

# -----------------------------------------------------------------------------
# the simple baselines (baselines.py), and the model against the best of them

def evaluate_baselines(data, split, max_users=None, seed=0, batch_scores=1 << 22):
    """{name: metrics} of every simple baseline (baselines.py: most-popular, Markov, SR, SKNN,
    recency), their own settings chosen on validation. A baseline row costs nothing but its V
    scores, so a batch holds ~batch_scores of them (MSNBC: 200k rows, 200k pages: 64 rows): per-batch
    overhead bounds small vocabularies, memory bounds large ones."""
    return Baselines(data, seed).evaluate(split, max_users, batch_scores)


class Baselines:
    """The simple baselines of a report, fitted on the training data once; what they choose on
    validation (SKNN's neighbourhood size, recency's decay) is chosen once and kept for test."""

    def __init__(self, data, seed=0):
        self.data, self.seed, self.scorers = data, seed, None

    def evaluate(self, split, max_users=None, batch_scores=1 << 22):
        if self.scorers is None:
            import baselines
            self.scorers = baselines.strong_baselines(self.data, seed=self.seed)
        batch_size = max(64, batch_scores // self.data.vocab_size)
        return evaluate(self.data, split, self.scorers, batch_size, max_users, self.seed)

    @staticmethod
    def best(results, metric="ndcg@10"):
        """The name of the best baseline in results (call it on validation, keep it for test)."""
        return max(results, key=lambda name: results[name][metric])


def compare(model, baseline, metric_k=10, seed=0, n_boot=1000):
    """The model against a baseline on the same users: NDCG@k of each, their ratio, and the paired
    bootstrap 95% interval of the difference (paired_bootstrap)."""
    if "user" in model["examples"] and not np.array_equal(model["examples"]["user"], baseline["examples"]["user"]):
        raise ValueError("compare: the model and the baseline were scored on different users")
    a, b = ndcg_at(model["examples"]["rank"], metric_k), ndcg_at(baseline["examples"]["rank"], metric_k)
    diff, lo, hi = paired_bootstrap(a, b, n_boot, seed)
    return {"model": float(a.mean()) if len(a) else math.nan, "baseline": float(b.mean()) if len(b) else math.nan,
            "ratio": float(a.mean() / b.mean()) if len(a) and b.mean() > 0 else math.nan,
            "diff": diff, "low": lo, "high": hi, "users": len(a), "resamples": n_boot}


def gain_line(name, base, gain, chosen_on="validation"):
    """One line: the model against the best baseline, with the interval and what it means."""
    verdict = ("better" if gain["low"] > 0 else "worse" if gain["high"] < 0 else "no clear difference")
    return (f"{name} vs {base} (the best baseline on {chosen_on}): NDCG@10 {gain['model']:.4f} vs {gain['baseline']:.4f} "
            f"({gain['ratio']:.2f}x), difference {gain['diff']:+.4f}, 95% interval [{gain['low']:+.4f}, "
            f"{gain['high']:+.4f}] (paired bootstrap over {gain['users']:,} users): {verdict}")

# -----------------------------------------------------------------------------

def format_table(results, columns=COLUMNS):
    """{name: metrics} -> aligned plain-text table, one row per method, then n and <unk> rate."""
    w = max([len("method")] + [len(name) for name in results])
    width = [max(7, len(c)) for c in columns]
    lines = [f"{'method':<{w}}  " + " ".join(f"{c:>{k}}" for c, k in zip(columns, width))]
    for name, m in results.items():
        lines.append(f"{name:<{w}}  " + " ".join(f"{m.get(c, math.nan):>{k}.4f}" for c, k in zip(columns, width)))
    sizes = sorted({(m["n"], m["unk"]) for m in results.values()})
    lines.append("  ".join(f"n={n:,} examples, <unk> targets {unk:.2%} (counted as misses)" for n, unk in sizes))
    return "\n".join(lines)

def per_user_scores(metrics, metric):
    """Per-user values (float32, users in a fixed order) of a validation metric that is a mean over
    users (NDCG, HR, MRR, NLL); None for the others. The search compares runs user by user with them."""
    rank = metrics['examples']['rank']
    if metric.startswith('ndcg@'):
        values = ndcg_at(rank, int(metric[5:]))
    elif metric.startswith('hr@'):
        values = rank < int(metric[3:])
    elif metric == 'mrr':
        values = 1.0 / (rank + 1.0)
    elif metric == 'nll':   # users whose target is <unk> have none (NaN): search.py compares the others
        values = -metrics['examples']['logp']
    else:
        return None
    return np.asarray(values, dtype=np.float32)


def final_report(best_path, data, cfg, dev, stage_dir, search=None):
    """Evaluate best.pt once on validation and test, next to the baselines and to post-hoc logit
    adjustment of the same model (its tau chosen on validation), and print the tables; then the
    model against the best baseline (chosen on validation) with a paired bootstrap interval."""
    model, ckpt = load_checkpoint(best_path, dev)
    block = ckpt['model_args']['block_size']
    uc = None if ckpt.get('clusters') is None else ckpt['clusters'].numpy()
    # logit adjustment baseline: tau picked by validation harmonic mean of anchor and tail accuracy
    # (every tau from one pass of the model; then one pass per split scores the model with and without it)
    taus = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]   # 0: no adjustment, when none helps on validation
    la = evaluate_model(model, data, 'val', block, dev, max_users=cfg['eval_users'] or None, seed=cfg['seed'],
                        logit_adjust=taus, clusters=uc)
    tau = max(taus, key=lambda t: la[t]['hmean'])
    results = {'best_iter': ckpt['iter_num'], 'checkpoint': best_path, 'logit_adjust_tau': tau}
    if search:
        results['search'] = search
    baselines, best_base = Baselines(data, cfg['seed']), None
    for split in ('val', 'test'):
        m = evaluate_model(model, data, split, block, dev, logit_adjust=[0.0, tau], clusters=uc)
        rows = {'gpt (best.pt)': m[0.0], f'gpt + logit adj. {tau}': m[tau]}
        base = baselines.evaluate(split)
        rows.update(base)
        best_base = best_base or baselines.best(base)           # chosen on validation, kept for test
        print(f"\n{split} split, full ranking over {data.vocab_size - N_SPECIAL:,} pages "
              f"(stage {cfg['stage']}, best.pt from iteration {ckpt['iter_num']}):")
        print(format_table(rows))
        m = rows['gpt (best.pt)']
        gain = compare(m, rows[best_base], seed=cfg['seed'])
        print(gain_line('gpt', best_base, gain, 'validation'))
        u = per_user_stats(m['examples'])
        print(f"gpt per user: NLL mean {u['nll_mean']:.4f} std {u['nll_std']:.4f} p90 {u['nll_p90']:.4f}; "
              f"HR@10 mean {u['hr@10_mean']:.4f} std {u['hr@10_std']:.4f} p10 {u['hr@10_p10']:.4f}")
        print(f"gpt: harmonic mean of anchor/tail accuracy {m['hmean']:.4f}, macro recall {m['macro_recall']:.4f}; "
              f"few-shot tail accuracy (pages seen <= 5 / <= 20 times in training): "
              f"{fewshot(m, 5)} / {fewshot(m, 20)}")
        results[split] = {name: {k: v for k, v in r.items() if isinstance(v, (int, float))} for name, r in rows.items()}
        results.setdefault('vs_best_baseline', {})[split] = dict(gain, baseline=best_base)
    if data.split == 'session':   # HeTLM's task: the held-out test session, scored and generated per user
        import sessions
        methods = {'gpt (best.pt)': sessions.model_logp(model, dev, uc), 'markov': sessions.markov_logp(data),
                   'most-popular': sessions.popular_logp(data)}
        print("\ntest sessions (sessions.py; evaluate.py --outcome=PAGE adds outcome prediction): per user")
        res = sessions.evaluate_sessions(data, 'test', methods, seed=cfg['seed'], progress=lambda *_: None)
        print(sessions.session_table(res, uc))
        results['test_sessions'] = sessions.summary(res)
    with atomic_output(os.path.join(stage_dir, 'results.json')) as f:   # whole or absent, even after a kill
        json.dump(plain(results), f, indent=1)
    return results


def fewshot(m, k):
    """Few-shot tail accuracy with its count; no figure where no target is that rare."""
    n = m.get(f'n_fewshot{k}', 0)
    return f"{m[f'acc_fewshot{k}']:.4f} (n={n})" if n else "none (n=0)"


def fail(message):
    """One line on stderr and exit status 2, as every script's errors (configurator.run_main)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """evaluate.py's flags, checked (one line and exit status 2 where one is wrong)."""
    p = argparse.ArgumentParser(description="full-ranking next-page evaluation")
    p.add_argument("--ckpt", default="out/stage1/best.pt")      # checkpoint to evaluate
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--data_dir", default="")                    # default: the checkpoint's data_dir
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--max_users", type=int, default=0)          # 0 = every evaluable user
    p.add_argument("--device", default="auto")
    p.add_argument("--baselines_only", action="store_true")     # the simple baselines (baselines.py), no model
    # the session task (sessions.py), on a dataset prepared with --split=session
    p.add_argument("--task", default="auto", choices=["auto", "page", "session"])  # auto: session too on such data
    p.add_argument("--outcome", default="")                     # a page, e.g. purchase: P(the session holds it)
    p.add_argument("--outcome_samples", type=int, default=10)   # sampled sessions per user for that probability
    p.add_argument("--max_len", type=int, default=0)            # generated pages at most (0: training sessions' p99)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--drop_first", type=int, default=0)         # diagnostic: score the model with the k pages
                                                                #   after each whole context's first token left out
    args = p.parse_args(argv)
    if args.baselines_only and not args.data_dir:
        fail("--baselines_only needs --data_dir=...")
    if not args.baselines_only and not os.path.exists(args.ckpt):
        fail(f"checkpoint not found: {args.ckpt} (train one with python train.py)")
    if args.max_users < 0 or args.batch_size < 1 or args.outcome_samples < 1 or args.max_len < 0 or args.drop_first < 0:
        fail(f"--max_users={args.max_users} --batch_size={args.batch_size} --outcome_samples="
                 f"{args.outcome_samples} --max_len={args.max_len}: need max_users >= 0 (0: every user), drop_first >= 0, "
                 "batch_size >= 1, outcome_samples >= 1, max_len >= 0 (0: from the data)")
    return args


def load(args):
    """(data, model, its checkpoint, device); the model, checkpoint and device are None with
    --baselines_only. A bad dataset, checkpoint or device fails in one line."""
    from configurator import ConfigError
    from data import load_data, DataError
    model, ckpt, device = None, None, None
    try:
        if args.baselines_only:
            data = load_data(args.data_dir)
        else:
            device = resolve_device(args.device)
            model, ckpt = load_checkpoint(args.ckpt, device)
            data = load_data(args.data_dir or ckpt["config"]["data_dir"])
            if ckpt["tokenizer"]["pages"] != list(data.tokenizer.pages):
                raise DataError(f"{args.ckpt} was trained on another vocabulary than {data.data_dir}")
    except (DataError, ConfigError) as e:   # a bad dataset, checkpoint (runtime.CheckpointError) or --device
        fail(f"{e}")
    return data, model, ckpt, device


def print_per_user(examples, uc):
    """HeTLM's view of a model: the spread of per-user NLL and HR@10, overall and per parameter set."""
    stats = per_user_by_cluster(examples, uc)
    print("model, per user: NLL mean / std / p10 / p90, HR@10 mean / p10")
    for name in ["all"] + ([] if uc is None else [f"cluster {c}" for c in range(int(uc.max()) + 1)]):
        s, label = stats.get(name), "all users" if name == "all" else name
        if s is None:
            print(f"  {label} (0 users)")
        else:
            print(f"  {label} ({s['users']:,}): {s['nll_mean']:.4f} / {s['nll_std']:.4f} / {s['nll_p10']:.4f} / "
                  f"{s['nll_p90']:.4f}, {s['hr@10_mean']:.4f} / {s['hr@10_p10']:.4f}")


def main(argv=None):
    args = parse_args(argv)
    from data import DataError
    t0 = time.time()
    results, uc = {}, None
    data, model, ckpt, device = load(args)
    session_task = args.task == "session" or (args.task == "auto" and data.split == "session")
    if args.outcome and not session_task:
        fail(f"--outcome={args.outcome}: scored on the session task only, and {data.data_dir} was prepared "
                 f"with --split={data.split} (prepare it with --split=session, or leave --outcome out)")
    if args.outcome and data.tokenizer.page_id(args.outcome) == UNK:
        fail(f"--outcome={args.outcome}: no such page in the vocabulary of {data.data_dir}")
    if not args.baselines_only:
        uc = None if ckpt.get("clusters") is None else ckpt["clusters"].numpy()   # clusterwise: each user's set
        results["model"] = evaluate_model(model, data, args.split, model.config.block_size, device,
                                          args.batch_size, args.max_users or None, args.seed, clusters=uc,
                                          drop_first=args.drop_first)
    simple = Baselines(data, args.seed)
    base = simple.evaluate(args.split, args.max_users or None)
    results.update(base)
    print(format_table(results))
    if not args.baselines_only:   # the model against the best baseline (chosen on validation), with error bars
        best = Baselines.best(base if args.split == "val" else simple.evaluate("val", args.max_users or None))
        print(gain_line("model", best, compare(results["model"], results[best], seed=args.seed)))
    if not args.baselines_only:   # HeTLM's view: the spread over users, overall and per parameter set
        print_per_user(results["model"]["examples"], uc)
    if session_task:
        import sessions
        methods = {} if args.baselines_only else {"model": sessions.model_logp(model, device, uc)}
        methods.update({"markov": sessions.markov_logp(data), "most-popular": sessions.popular_logp(data)})
        print(f"\nsession task ({args.split} sessions, sessions.py): per user, mean / std / p10")
        try:
            res = sessions.evaluate_sessions(data, args.split, methods, args.max_users or None, args.seed,
                                             args.max_len or None, args.outcome or None, args.outcome_samples)
        except DataError as e:
            fail(f"{e}")
        print(sessions.session_table(res, uc))
    print(f"split={args.split}, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
