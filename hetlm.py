"""
HeTLM end to end (Sundaresan et al., EMNLP 2025): cluster the users, give every cluster its own
parameter set, let clustering and training guide each other, and compare with one model of the
same size.

    python hetlm.py                                              # built-in dataset
    python hetlm.py --data_dir=data/msnbc --eval_users=5000      # any prepared dataset

The steps, each one train.py / cluster.py run (their options pass through: --n_embd, --max_iters,
--tail_weight, ...):
1. shared: one plain GPT of the per-cluster size trained on every user (max_iters iterations).
2. K sweep: for every K in `ks`, k-means on user vectors (`vectors`), K parameter sets that all
   start as the shared model (HeTLM warm start) trained `cluster_iters` more iterations, each
   row on its own cluster's set. The K with the lowest validation NLL is kept.
3. refinement at that K: every user moves to the set with the lowest NLL on their training
   events, the sets train `cluster_iters` more, repeated until fewer than `converge` of the users
   move (or `max_rounds`). The number moved is printed each round.
4. controls, same harness: K sets on a random user split (same warm start and iterations as the
   k-means row), and one plain GPT with as many parameters as the K sets (matched_single_config, below)
   trained from scratch for as many iterations as the final clusterwise model received in all.
5. report: per-user mean, standard deviation and 10th percentile of test NLL and HR@10, overall
   and per cluster, for every model; printed and written to out_dir/hetlm.json. On a dataset
   prepared with --split=session (HeTLM's own task), also the per-user NLL of the held-out test
   session and the F1 of a session generated from the earlier ones (sessions.py), and the K sweep
   and every checkpoint choice use the validation session's NLL.

A clusterwise round's model is its final weights (a fixed number of iterations at a decaying
learning rate); the two controls keep their best validation checkpoint, which can only favour them.
All selection (K, checkpoints) uses the validation split; the test split is scored once per model.
"""

import os
import sys
import time

import numpy as np
import torch

import cluster
import train
from configurator import ConfigError, run_main
from data import DataError, ensure_builtin, load_data, read_json as data_read_json
from files import hold, release, write_atomic
from evaluate import evaluate_model, per_user_by_cluster
from recipe import check_config, data_stats, derive, describe
from model import GPT, GPTConfig
from runtime import load_checkpoint, plain, resolve_device

# -----------------------------------------------------------------------------
# HeTLM settings; every train.py setting is accepted too (its defaults, except where set here)
out_dir = 'out/hetlm'          # one sub-folder per run, hetlm.json at the top
ks = '2,5'                     # cluster counts tried; the lowest validation NLL wins
vectors = 'tfidf'              # user vectors for k-means: 'tfidf' (page frequencies) or 'model' (shared model)
cluster_iters = 500            # iterations of the K sets per round (after the shared model's max_iters)
cluster_lr = 3e-4              # peak learning rate of those rounds (they start from trained weights)
converge = 0.01                # refinement stops when fewer than this share of users move
max_rounds = 3                 # refinement rounds at most
controls = True                # also train the random-split and equal-parameter single controls
# -----------------------------------------------------------------------------
OWN = {k: v for k, v in dict(globals()).items()
       if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
# the comparisons need runs of fixed length: no time budget, no early stop (the controls train as long)
DEFAULTS = {**train.DEFAULTS, 'tail_weight': 1.0, 'best_metric': 'nll', 'final_eval': False, 'time_budget': 0.0,
            'patience': 0, 'overwrite': True, **OWN}   # it reuses or replaces its own runs (done.json)


def count_params(config):
    """Parameters of GPT(config), counted on the meta device (nothing is allocated)."""
    with torch.device('meta'):
        return sum(p.numel() for p in GPT(config).parameters())


def matched_single_config(config):
    """HeTLM's fair baseline: one plain GPT (n_clusters = 1) with about as many parameters as the
    clusterwise model `config`, by widening n_embd (a multiple of n_head). Returns (config, ratio)."""
    target = count_params(config)
    base = {**config.__dict__, 'n_clusters': 1}
    size = lambda width: count_params(GPTConfig(**{**base, 'n_embd': width * config.n_head}))
    lo, hi = 1, 16 * config.n_embd // config.n_head   # widths in units of n_head; count grows with width
    while hi - lo > 1:                                # binary search for the last width not above target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= target else (lo, mid)
    width = min((lo, hi), key=lambda w: abs(size(w) - target))
    return GPTConfig(**{**base, 'n_embd': width * config.n_head}), size(width) / target


def train_cfg(cfg, name, **over):
    """train.py's config for one run of the pipeline, in out_dir/name."""
    c = {k: cfg[k] for k in train.DEFAULTS}
    c.update({'out_dir': os.path.join(cfg['out_dir'], name), 'stage': 1, 'init_from': 'scratch', **over})
    return c


def run_train(cfg, name, last=False, **over):
    """Train one model (or reuse a finished run in out_dir/name); returns the path of its best.pt
    (or, last=True, of its final weights ckpt.pt)."""
    c = train_cfg(cfg, name, **over)
    best = os.path.join(c['out_dir'], 'stage1', 'ckpt.pt' if last else 'best.pt')
    done = os.path.join(c['out_dir'], 'done.json')
    if os.path.isfile(done) and read_json(done) == plain(c):
        print(f"[{name}] already trained with these settings: {best}")
        return best
    print(f"\n[{name}] training ({c['max_iters']} iterations, {c['n_clusters']} set(s))")
    train.train(c)
    write_atomic(done, plain(c))
    return best


def read_json(path):
    """done.json's settings, or None where it cannot be read (cut short: the run is trained again)."""
    try:
        return data_read_json(path)
    except DataError:
        print(f"note: {path} is not readable JSON (cut short?): that run is trained again")
        return None


def cluster_round(cfg, name, labels, init, k):
    """Write an assignment and train K sets on it, warm-started from `init`."""
    path = os.path.join(cfg['out_dir'], name + '.clusters.npy')
    write_atomic(path, labels.astype(np.int64))
    warm = min(cfg['warmup_iters'], cfg['cluster_iters'] // 10)
    return run_train(cfg, name, last=True, n_clusters=k, clusters=path, init_from=init, max_iters=cfg['cluster_iters'],
                     learning_rate=cfg['cluster_lr'], min_lr=cfg['cluster_lr'] / 10, warmup_iters=warm,
                     lr_decay_iters=0)


def score(ckpt_path, data, split, cfg, dev):
    """Validation or test metrics of a checkpoint with its own cluster assignment."""
    model, ck = load_checkpoint(ckpt_path, dev)
    uc = None if ck.get('clusters') is None else ck['clusters'].numpy()
    m = evaluate_model(model, data, split, ck['model_args']['block_size'], dev, clusters=uc,
                       max_users=(cfg['eval_users'] or None) if split == 'val' else None, seed=cfg['seed'])
    return m, uc, ck


def val_nll(ckpt_path, data, cfg, dev):
    """The validation NLL the K sweep compares: of the next page, or (session split) of the held-out session."""
    if data.split != 'session':
        return score(ckpt_path, data, 'val', cfg, dev)[0]['nll']
    from sessions import mean_session_nll
    model, ck = load_checkpoint(ckpt_path, dev)
    uc = None if ck.get('clusters') is None else ck['clusters'].numpy()
    return mean_session_nll(model, data, 'val', dev, cfg['eval_users'] or None, cfg['seed'], uc)


def user_vectors(cfg, data, shared, dev):
    """The vectors k-means clusters, once for the whole sweep: TF-IDF, or the shared model's."""
    if cfg['vectors'] == 'model':
        model, ck = load_checkpoint(shared, dev)
        return cluster.model_vectors(model, data, ck['model_args']['block_size'], dev)
    return cluster.tfidf_vectors(data, seed=cfg['seed'])


def kmeans_labels(cfg, data, k, x):
    labels, _, _ = cluster.kmeans(x, k, seed=cfg['seed'])
    labels = labels.cpu().numpy().astype(np.int64)
    if data.segments is not None:
        print(f"k-means K={k}: adjusted Rand index against the true segments "
              f"{cluster.adjusted_rand_index(labels, data.segments):.4f}")
    return labels


def run(cfg):
    t_start = time.time()
    try:
        k_list = sorted({int(x) for x in str(cfg['ks']).split(',') if x.strip()})
    except ValueError:
        raise ConfigError(f"--ks={cfg['ks']}: expected cluster counts separated by commas, e.g. 2,5,8") from None
    if not k_list or k_list[0] < 2:
        raise ConfigError(f"--ks={cfg['ks']}: every K must be >= 2")
    if cfg['vectors'] not in ('tfidf', 'model'):
        raise ConfigError(f"--vectors={cfg['vectors']}: expected 'tfidf' or 'model'")
    if cfg['cluster_iters'] < 1 or cfg['max_rounds'] < 0 or not 0 <= cfg['converge'] < 1:
        raise ConfigError("need --cluster_iters >= 1, --max_rounds >= 0 and 0 <= --converge < 1")
    if cfg['eval_users'] < 0:
        raise ConfigError(f"--eval_users={cfg['eval_users']}: must be >= 0 (0: every user)")
    check_config(cfg)
    if os.path.normpath(cfg['data_dir']) == os.path.normpath(train.DEFAULTS['data_dir']):
        ensure_builtin(cfg['data_dir'])
    data = load_data(cfg['data_dir'])
    stats = data_stats(data)
    cfg, reasons = derive(cfg, stats)   # settings from the data, once: every run of the pipeline shares them
    print(describe(reasons, stats))
    if data.split == 'session' and cfg['best_metric'] == 'nll':
        cfg['best_metric'] = 'session_nll'   # the session task: checkpoints by the held-out session's NLL
    if k_list[-1] > data.n_users:
        raise ConfigError(f"--ks={cfg['ks']}: more clusters than the {data.n_users:,} users")
    hold(cfg['out_dir'], 'hetlm.py')   # one writer per out folder (files.py): its runs live under it
    try:
        return pipeline(cfg, data, k_list, t_start)
    finally:
        release(cfg['out_dir'])


def pipeline(cfg, data, k_list, t_start):
    """run's steps 1-5, the out folder held."""
    dev = resolve_device(cfg['device'])
    # 1. the shared model, the starting point of every parameter set
    shared = run_train(cfg, 'shared', cluster_scope='all')   # one set: the same model for every scope
    # 2. K sweep on validation NLL
    best_k, labels, val_by_k = k_sweep(cfg, data, k_list, shared, dev)
    # 3. endogenous refinement at the chosen K
    current, rounds = refine(cfg, data, best_k, labels, dev)
    # 4. controls
    models = control_models(cfg, data, best_k, shared, current, rounds)
    # 5. the report: per-user statistics on the test split
    report = {'ks': k_list, 'val_nll_by_k': val_by_k, 'best_k': best_k, 'rounds': rounds, 'models': {}}
    per_user_report(models, data, cfg, dev, report)
    if data.split == 'session':
        session_report(models, data, cfg, dev, report)
    report['seconds'] = round(time.time() - t_start, 1)
    write_atomic(os.path.join(cfg['out_dir'], 'hetlm.json'), plain(report))
    print(f"\nwrote {os.path.join(cfg['out_dir'], 'hetlm.json')} ({report['seconds']:.0f} s in all)")
    return report


def k_sweep(cfg, data, k_list, shared, dev):
    """k-means users into each K of k_list, K sets trained from the shared model each; the K of the
    lowest validation NLL wins. Returns (best K, its labels, {K: validation NLL}; K=1: the shared model)."""
    sweep, labels_of = {}, {}
    x = user_vectors(cfg, data, shared, dev)
    for k in k_list:
        labels_of[k] = kmeans_labels(cfg, data, k, x)
        path = cluster_round(cfg, f'k{k}', labels_of[k], shared, k)
        sweep[k] = val_nll(path, data, cfg, dev)
        print(f"K={k}: validation NLL {sweep[k]:.4f}")
    best_k = min(k_list, key=lambda k: sweep[k])
    shared_val = val_nll(shared, data, cfg, dev)
    print("\nK sweep (validation NLL): " + ", ".join(f"K={k} {v:.4f}" for k, v in sweep.items())
          + f" -> K={best_k}; the shared model alone (K=1): {shared_val:.4f}"
          + (" -- lower than every K: on this data the clusters did not help" if shared_val < sweep[best_k] else ""))
    return best_k, labels_of[best_k], {1: shared_val, **sweep}


def refine(cfg, data, best_k, labels, dev):
    """Endogenous refinement: every user moves to the set that predicts them best (cluster.reassign)
    and the sets train on, until few move. Returns (the last round's checkpoint, the rounds)."""
    current, rounds = os.path.join(cfg['out_dir'], f'k{best_k}', 'stage1', 'ckpt.pt'), []
    for r in range(1, cfg['max_rounds'] + 1):
        model, _ = load_checkpoint(current, dev)
        nll = cluster.per_set_nll(model, data, model.config.block_size, dev)
        new, moved = cluster.reassign(nll, labels)
        share = moved / data.n_users
        rounds.append({'round': r, 'moved': moved, 'share': share})
        ari = ('' if data.segments is None else
               f"; adjusted Rand index against the true segments {cluster.adjusted_rand_index(new, data.segments):.4f}")
        print(f"refinement round {r}: {moved:,} of {data.n_users:,} users moved ({share:.2%}){ari}")
        if moved == 0:
            break
        labels = new
        current = cluster_round(cfg, f'k{best_k}_r{r}', labels, current, best_k)
        if share < cfg['converge']:
            break
    return current, rounds


def control_models(cfg, data, best_k, shared, current, rounds):
    """The models the report compares: {name: (checkpoint, iterations it received in all)}: the
    shared model, k-means, after refinement, and (cfg controls) a random split and one model of the
    K sets' parameter count."""
    n_rounds = len([x for x in rounds if x['moved'] > 0])
    base, step = cfg['max_iters'], cfg['cluster_iters']   # iterations each model received in all
    models = {'shared (one set, 1/K of the parameters)': (shared, base),
              f'k-means, K={best_k}': (os.path.join(cfg['out_dir'], f'k{best_k}', 'stage1', 'ckpt.pt'), base + step)}
    if n_rounds:
        models[f'after refinement ({n_rounds} round{"s" if n_rounds > 1 else ""})'] = (current, base + step * (1 + n_rounds))
    if cfg['controls']:
        single_cfg, ratio = matched_single_config(GPTConfig(
            block_size=cfg['block_size'], vocab_size=data.vocab_size, n_layer=cfg['n_layer'], n_head=cfg['n_head'],
            n_embd=cfg['n_embd'], dropout=cfg['dropout'], bias=cfg['bias'], n_clusters=best_k,
            cluster_scope=cfg['cluster_scope'], repeat_bias=cfg['repeat_bias'],
            repeat_decay=cfg['repeat_decay'], transitions=cfg['transitions']))
        rand = np.random.default_rng(cfg['seed']).integers(0, best_k, data.n_users)
        models[f'random split, K={best_k}'] = (cluster_round(cfg, f'random{best_k}', rand, shared, best_k), base + step)
        iters = base + step * (1 + n_rounds)
        print(f"\nequal-parameter single model: n_embd {single_cfg.n_embd}, {count_params(single_cfg):,} "
              f"parameters ({ratio:.3f}x the {best_k} sets), {iters} iterations")
        models['single, equal parameters'] = (run_train(cfg, f'single{best_k}', n_embd=single_cfg.n_embd,
                                                        max_iters=iters, cluster_scope='all'), iters)
    return models


def per_user_report(models, data, cfg, dev, report):
    """HeTLM's comparison: per-user NLL and HR@10 statistics on the test split, overall and per
    cluster (a higher mean and a lower spread is the paper's claim), into report['models']."""
    cols = ('nll_mean', 'nll_std', 'nll_p10', 'nll_p90', 'hr@10_mean', 'hr@10_std', 'hr@10_p10')
    print(f"\ntest split, per-user statistics ({data.meta['n_eval_users']:,} users; NLL of each user's "
          f"test pages, lower is better; p10/p90 = 10th/90th percentile):")
    head = f"{'model':<40s} {'params':>9s} {'iters':>6s} " + " ".join(f"{c:>10s}" for c in cols)
    print(head)
    for name, (path, iters) in models.items():
        m, uc, ck = score(path, data, 'test', cfg, dev)
        stats = per_user_by_cluster(m['examples'], uc)
        n_par = count_params(GPTConfig(**ck['model_args']))
        report['models'][name] = {'checkpoint': path, 'params': n_par, 'iters': iters, 'ndcg@10': m['ndcg@10'],
                                  'stats': stats}
        print(f"{name:<40s} {n_par:>9,d} {iters:>6d} " + " ".join(f"{stats['all'][c]:>10.4f}" for c in cols))
    print("\nper cluster (test NLL mean / std of its users):")
    for name, r in report['models'].items():
        parts = [f"{c}: {s['nll_mean']:.3f}/{s['nll_std']:.3f} (n={s['users']})" for c, s in r['stats'].items()
                 if c != 'all']
        if parts:
            print(f"  {name}: " + "; ".join(parts))


SESSION_COLS = (('nll_page', 'nll/page'), ('nll_session', 'nll/session'), ('greedy_f1', 'F1 greedy'),
                ('sampled_f1', 'F1 sampled'), ('greedy_rouge_l', 'ROUGE-L greedy'))


def session_report(models, data, cfg, dev, report):
    """HeTLM's own task on a --split=session dataset: per user, the NLL of the held-out test session
    and the F1 of a session generated from the earlier ones (sessions.py); mean / std / p10 over
    users, overall and per parameter set, for every model and first-order Markov."""
    import sessions
    print("\ntest sessions (HeTLM's task, sessions.py), per user: mean / std / p10")
    print(f"{'model':<40s} " + " ".join(f"{label:>22s}" for _, label in SESSION_COLS))
    runs = {name: path for name, (path, _) in models.items()}
    runs['first-order Markov'] = None
    for name, path in runs.items():
        uc = None
        if path is None:
            logp = sessions.markov_logp(data)
        else:
            model, ck = load_checkpoint(path, dev)
            uc = None if ck.get('clusters') is None else ck['clusters'].numpy()
            logp = sessions.model_logp(model, dev, uc)
        r = sessions.evaluate_sessions(data, 'test', {name: logp}, seed=cfg['seed'], progress=lambda *_: None)[name]
        groups = {'all': np.ones(len(r['users']), bool)}
        if uc is not None:
            groups.update({f'cluster {c}': uc[r['users']] == c for c in range(int(uc.max()) + 1)})
        stats = {g: {k: sessions.spread(r[k][sel]) for k, _ in SESSION_COLS} | {'users': int(sel.sum())}
                 for g, sel in groups.items() if sel.any()}
        report['models'].setdefault(name, {})['sessions'] = stats
        cells = ['/'.join(f"{stats['all'][k][q]:.3f}" for q in sessions.STATS) for k, _ in SESSION_COLS]
        print(f"{name:<40s} " + " ".join(f"{c:>22s}" for c in cells))
    print("per cluster (test session NLL/page and F1 greedy, mean / std of its users):")
    for name, r in report['models'].items():
        parts = [f"{c}: {s['nll_page']['mean']:.3f}/{s['nll_page']['std']:.3f}, {s['greedy_f1']['mean']:.3f}/"
                 f"{s['greedy_f1']['std']:.3f} (n={s['users']})" for c, s in r['sessions'].items() if c != 'all']
        if parts:
            print(f"  {name}: " + "; ".join(parts))


def main(argv):
    run_main(run, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
