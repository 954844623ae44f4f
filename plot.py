"""
Pictures of a run, as PNG files (headless): needs matplotlib, an optional extra that no other
script imports (`pip install matplotlib`).

    python plot.py out/stage1            # -> out/stage1/plots/*.png
    python plot.py out/stage2 --split=val

From the run's metrics.jsonl (train.py appends every log line and validation to it):
  curves.png     training and validation NLL, validation NDCG@10 and the learning rate, by iteration
From its best.pt, scored once on the split (evaluate.py's harness):
  per_user.png   HeTLM's view: the distribution over users of their NLL and HR@10, per parameter set
                 when the model has several
  frequency.png  BehaviorLM's view: top-1 accuracy and HR@10 of targets by how often their page was
                 seen in training, anchors and tail apart
  stages.png     stage 1 vs stage 2 (when out_dir/stage1 and out_dir/stage2 both hold a best.pt):
                 NDCG@10, anchor and tail accuracy, their harmonic mean, with the Markov baseline
"""
import json
import os
import sys

import numpy as np

from tokenizer import N_SPECIAL

# -----------------------------------------------------------------------------
split = 'test'           # the split best.pt is scored on for the per-user, frequency and stage figures
device = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line ConfigError saying how to get it."""
    from configurator import ConfigError
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot.py needs matplotlib, an optional extra: pip install matplotlib") from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def read_log(path):
    """metrics.jsonl -> {'train': [records], 'val': [records]} by iteration, the last record of an
    iteration kept (a resumed run repeats the iterations after its last checkpoint)."""
    from configurator import ConfigError
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (train.py writes it; runs older than it have none)")
    out = {'train': {}, 'val': {}}
    need = {'train': ('train_nll',), 'val': ('nll', 'ndcg@10')}   # what the figures draw
    with open(path, encoding='utf-8', errors='replace') as f:     # a binary line: reported below, not a traceback
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out[r['kind']][int(r['iter'])] = r
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{path}:{n}: not a metrics record") from None
            gone = [k for k in need[r['kind']] if not isinstance(r.get(k), (int, float))]
            if gone:
                raise ConfigError(f"{path}:{n}: a {r['kind']} record without {', '.join(gone)} (not written by train.py?)")
    return {k: [v[i] for i in sorted(v)] for k, v in out.items()}


def plot_curves(plt, log, path):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tr, va = log['train'], log['val']
    if tr:
        ax.plot([r['iter'] for r in tr], [r['train_nll'] for r in tr], label='train NLL', lw=1)
    if va:
        ax.plot([r['iter'] for r in va], [r['nll'] for r in va], 'o-', label='validation NLL', ms=3)
        if 'session_nll' in va[0]:
            ax.plot([r['iter'] for r in va], [r['session_nll'] for r in va], 's-', label='validation session NLL', ms=3)
        ax2.plot([r['iter'] for r in va], [r['ndcg@10'] for r in va], 'o-', color='C2', ms=3, label='validation NDCG@10')
        best = [r for r in va if r.get('best')]
        if best:
            ax2.axvline(best[-1]['iter'], color='grey', ls=':', label=f"best.pt (iteration {best[-1]['iter']})")
    ax.set(xlabel='iteration', ylabel='NLL (nats per target)', title='loss')
    ax.legend()
    ax2.set(xlabel='iteration', ylabel='NDCG@10', title='validation ranking')
    if tr:
        lr = ax2.twinx()
        lr.plot([r['iter'] for r in tr], [r['lr'] for r in tr], color='C3', lw=0.8, alpha=0.6)
        lr.set_ylabel('learning rate', color='C3')
    ax2.legend(loc='lower right')
    save(fig, path)


def score(ckpt_path, split, dev):
    """(metrics with per-example arrays, clusters or None, data) of a checkpoint on a split."""
    from data import load_data
    from baselines import markov_scorer
    from evaluate import evaluate, evaluate_model
    from runtime import load_checkpoint
    model, ck = load_checkpoint(ckpt_path, dev)
    data = load_data(ck['config']['data_dir'])
    uc = None if ck.get('clusters') is None else ck['clusters'].numpy()
    m = evaluate_model(model, data, split, model.config.block_size, dev, clusters=uc)
    return m, uc, data, evaluate(data, split, {'markov': markov_scorer(data)})['markov']


def plot_per_user(plt, m, uc, path, split):
    from evaluate import per_user_by_cluster
    ex = m['examples']
    users, inv = np.unique(ex['user'], return_inverse=True)
    known = np.isfinite(ex['logp'])
    nll = np.bincount(inv[known], -ex['logp'][known], len(users)) / np.maximum(np.bincount(inv[known], minlength=len(users)), 1)
    hr = np.bincount(inv, (ex['rank'] < 10).astype(float), len(users)) / np.bincount(inv, minlength=len(users))
    has_nll = np.bincount(inv[known], minlength=len(users)) > 0
    groups = [('all users', np.ones(len(users), bool))]
    if uc is not None:
        groups += [(f'cluster {c}', uc[users] == c) for c in range(int(uc.max()) + 1)]
    stats = per_user_by_cluster(ex, uc)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, np.percentile(nll[has_nll], 99) if has_nll.any() else 1, 40)
    for name, sel in groups:
        s = stats['all' if name == 'all users' else name]
        a1.hist(nll[sel & has_nll], bins=bins, histtype='step', density=True,
                label=f"{name} (n={s['users']:,}): mean {s['nll_mean']:.2f}, std {s['nll_std']:.2f}")
    a1.set(xlabel='NLL of the user\'s target(s)', ylabel='density of users', title=f'per-user NLL ({split})')
    a1.legend(fontsize=8)
    names = [g[0] for g in groups]
    means = [hr[sel].mean() if sel.any() else np.nan for _, sel in groups]
    a2.bar(range(len(groups)), means, color=['C0'] + ['C1'] * (len(groups) - 1))
    a2.set_xticks(range(len(groups)), names, rotation=30 if len(groups) > 4 else 0)
    a2.set(ylabel='HR@10 (share of users with the target in the top 10)', ylim=(0, 1),
           title=f'HR@10 per user group ({split})')
    for i, v in enumerate(means):
        a2.text(i, v + 0.02, f'{v:.3f}', ha='center', fontsize=8)
    save(fig, path)


def plot_frequency(plt, m, data, path, split):
    ex = m['examples']
    counts = np.asarray(data.tokenizer.counts)                           # training count of every id
    known = ex['target'] >= N_SPECIAL
    seen = np.where(known, counts[np.where(known, ex['target'], 0)], 0)
    bucket = np.digitize(seen, [0, 5, 20, 100, 1000, 10000], right=True)   # 0: never seen (<unk>), 1: 1-5, ...
    labels = ['unseen', '1-5', '6-20', '21-100', '101-1,000', '1,001-10,000', '>10,000']
    is_anchor = np.isin(ex['target'], data.anchor_ids)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(labels))
    for j, (name, sel) in enumerate((('tail', ~is_anchor), ('anchors', is_anchor))):
        acc = [np.mean(ex['pred'][sel & (bucket == b)] == ex['target'][sel & (bucket == b)])
               if (sel & (bucket == b)).any() else np.nan for b in range(len(labels))]
        hr = [np.mean(ex['rank'][sel & (bucket == b)] < 10) if (sel & (bucket == b)).any() else np.nan
              for b in range(len(labels))]
        n = [int((sel & (bucket == b)).sum()) for b in range(len(labels))]
        ax.bar(x + (j - 0.5) * 0.4, hr, 0.4, alpha=0.35, color=f'C{j}')
        ax.bar(x + (j - 0.5) * 0.4, acc, 0.4, color=f'C{j}', label=f'{name}: top-1 accuracy (light: HR@10)')
        for xi, k in zip(x, n):
            if k:
                ax.text(xi + (j - 0.5) * 0.4, 0.01, f'{k:,}', ha='center', fontsize=6, rotation=90)
    ax.set_xticks(x, labels)
    ax.set(xlabel="times the target's page was seen in training", ylabel='share of targets', ylim=(0, 1),
           title=f'accuracy by page frequency ({split}; n per bar at its foot)')
    ax.legend()
    save(fig, path)


def plot_stages(plt, rows, path, split):
    keys = ('ndcg@10', 'acc_anchor', 'acc_tail', 'hmean')
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(keys))
    w = 0.8 / len(rows)
    for j, (name, m) in enumerate(rows.items()):
        vals = [m.get(k, np.nan) for k in keys]
        ax.bar(x + (j - (len(rows) - 1) / 2) * w, vals, w, label=name)
        for xi, v in zip(x, vals):
            ax.text(xi + (j - (len(rows) - 1) / 2) * w, v + 0.01, f'{v:.3f}', ha='center', fontsize=7)
    ax.set_xticks(x, keys)
    ax.set(ylabel=f'{split} split', title='stage 1 (anchors) vs stage 2 (balanced)')
    ax.legend()
    save(fig, path)


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    fig.clf()


def run(cfg, run_dir):
    from configurator import ConfigError
    from runtime import resolve_device
    plt = pyplot()
    if cfg['split'] not in ('val', 'test'):
        raise ConfigError(f"--split={cfg['split']}: expected val or test")
    best = os.path.join(run_dir, 'best.pt')
    if not os.path.isfile(best):
        raise ConfigError(f"{run_dir}: no best.pt (a train.py stage folder, e.g. out/stage1)")
    out = os.path.join(run_dir, 'plots')
    os.makedirs(out, exist_ok=True)
    written = []
    log_path = os.path.join(run_dir, 'metrics.jsonl')
    if os.path.isfile(log_path):
        plot_curves(plt, read_log(log_path), os.path.join(out, 'curves.png'))
        written.append('curves.png')
    else:
        print(f"note: {log_path} not found (a run from before train.py wrote it): no curves.png")
    dev = resolve_device(cfg['device'])
    m, uc, data, markov = score(best, cfg['split'], dev)
    plot_per_user(plt, m, uc, os.path.join(out, 'per_user.png'), cfg['split'])
    plot_frequency(plt, m, data, os.path.join(out, 'frequency.png'), cfg['split'])
    written += ['per_user.png', 'frequency.png']
    parent = os.path.dirname(os.path.normpath(run_dir))
    stages = [os.path.join(parent, f'stage{s}', 'best.pt') for s in (1, 2)]
    if all(os.path.isfile(p) for p in stages):
        rows = {f'stage {s}': score(p, cfg['split'], dev)[0] for s, p in zip((1, 2), stages)}
        rows['first-order Markov'] = markov
        plot_stages(plt, rows, os.path.join(out, 'stages.png'), cfg['split'])
        written.append('stages.png')
    print(f"wrote {', '.join(written)} to {out}")
    return [os.path.join(out, w) for w in written]


def main(argv):
    from configurator import run_main, usage
    from data import DataError
    if any(a in ('-h', '--help') for a in argv):
        print(usage(sys.modules[__name__], DEFAULTS))
        return
    dirs = [a for a in argv if not a.startswith('--')]
    if len(dirs) != 1:
        print("usage: python plot.py RUN_DIR [--split=test] [--device=auto]   (RUN_DIR: e.g. out/stage1)",
              file=sys.stderr)
        sys.exit(2)
    run_main(lambda cfg: run(cfg, dirs[0]), DEFAULTS, [a for a in argv if a.startswith('--')], (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
