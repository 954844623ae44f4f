"""
Do clusters help when they are right? (README, "User clusters".) On a simulated dataset, which
knows each user's true segment, compare three clusterwise runs of the same shape trained on the
true segments, on k-means clusters and on a random split:

    python oracle_clusters.py --true=out/n5_true/stage1/ckpt.pt --kmeans=out/n5_kmeans/stage1/ckpt.pt \
        --random=out/n5_random/stage1/ckpt.pt

It prints (test split, per-user NLL):
1. the users k-means puts in another segment's cluster (each cluster is mapped to the segment most
   of its users belong to): how many, how long their histories are, and the NLL of the true-segment
   and k-means runs relative to the random split on them and on everyone else;
2. the true-segment run with users assigned by HeTLM's rule instead (the set with the lowest NLL on
   their training events, as refinement and sample.py assign): adjusted Rand index against the
   segments and test NLL, i.e. how much of the oracle's gain a behaviour-based assignment keeps.
"""
import os
import sys

import numpy as np

import cluster
from configurator import run_main
from data import DataError, load_data
from evaluate import evaluate_model, per_user_stats
from runtime import load_checkpoint, resolve_device

# -----------------------------------------------------------------------------
true = 'out/n5_true/stage1/ckpt.pt'        # sets trained on data.segments
kmeans = 'out/n5_kmeans/stage1/ckpt.pt'    # the same, on k-means clusters
random = 'out/n5_random/stage1/ckpt.pt'    # the same, on a random split
device = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, str)}


def test_nll(model, data, dev, clusters):
    """(users, per-example NLL) on the test split, users in evaluation order."""
    ex = evaluate_model(model, data, 'test', model.config.block_size, dev, clusters=clusters)['examples']
    return ex['user'], -ex['logp']


def run(cfg):
    from configurator import ConfigError
    dev = resolve_device(cfg['device'])
    runs = {}
    for name in ('true', 'kmeans', 'random'):
        if not os.path.isfile(cfg[name]):
            raise ConfigError(f"--{name}={cfg[name]}: no checkpoint there (README: the commands above)")
        runs[name] = load_checkpoint(cfg[name], dev)   # runtime.CheckpointError (a ConfigError) if it is not one
        if runs[name][1].get('clusters') is None:
            raise ConfigError(f"--{name}={cfg[name]}: not a clusterwise checkpoint (no user -> cluster assignment)")
    data = load_data(runs['true'][1]['config']['data_dir'])
    if data.segments is None:
        raise DataError(f"{data.data_dir} has no true segments (segments.npy): only a simulated dataset has them")
    seg = data.segments
    assign = {name: ck['clusters'].numpy() for name, (_, ck) in runs.items()}
    km = assign['kmeans']
    to_segment = {c: np.bincount(seg[km == c]).argmax() for c in np.unique(km)}
    wrong = np.array([to_segment[c] for c in km]) != seg                   # per user
    nll = {name: test_nll(model, data, dev, assign[name]) for name, (model, _) in runs.items()}
    users = nll['random'][0]
    lengths = np.diff(np.asarray(data.offsets))[users]
    w = wrong[users]
    print(f"k-means puts {w.sum():,} of the {len(users):,} test users ({w.mean():.1%}) in another segment's cluster; "
          f"median history {np.median(lengths[w]):.1f} tokens (the others: {np.median(lengths[~w]):.1f})")
    for name in ('true', 'kmeans'):
        d = nll[name][1] - nll['random'][1]
        print(f"  {name} vs random split, test NLL: misplaced users {d[w].mean():+.4f}, the others {d[~w].mean():+.4f}")
    model, _ = runs['true']
    per_set = cluster.per_set_nll(model, data, model.config.block_size, dev)
    by_rule = np.where(np.isnan(per_set).any(axis=1), assign['true'], np.nanargmin(per_set, axis=1))
    print(f"true-segment sets, users assigned by lowest NLL on their training events: adjusted Rand index "
          f"{cluster.adjusted_rand_index(by_rule, seg):.4f} (k-means {cluster.adjusted_rand_index(km, seg):.4f})")
    for label, a in (('their true segment', assign['true']), ('lowest NLL', by_rule)):
        s = per_user_stats(evaluate_model(model, data, 'test', model.config.block_size, dev, clusters=a)['examples'])
        print(f"  test per-user NLL, users on {label}: {s['nll_mean']:.4f} / std {s['nll_std']:.4f}")
    s = per_user_stats(evaluate_model(runs['random'][0], data, 'test', model.config.block_size, dev,
                                      clusters=assign['random'])['examples'])
    print(f"  (random split: {s['nll_mean']:.4f} / std {s['nll_std']:.4f})")


def main(argv):
    run_main(run, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
