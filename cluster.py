"""
Cluster users by their behavior: the first half of HeTLM's clusterwise model.

HeTLM (Sundaresan et al., EMNLP 2025) does not ask one language model to fit every user: it encodes
each user's browsing with a frozen encoder, groups the users with k-means, and gives each group its
own parameter set, so deal hunters and researchers need not share one next-page distribution. This
file makes the groups (and, with --refine, moves users to the set that predicts them best);
model.py holds the K parameter sets, `python train.py --n_clusters=K` trains them, and hetlm.py
runs the whole loop (K sweep, refinement, controls).

A user's vector is built from their TRAINING events only (tokens[offsets[u]:train_end[u]]), never
from a validation or test page:
- tfidf: page-frequency vectors, sublinear tf (1 + log count) times smooth idf over users, rows
  L2-normalized. With more pages than `dim`, the sparse users x pages matrix is reduced to `dim`
  dimensions by a truncated SVD (latent semantic analysis) and normalized again. No model needed.
- model: the mean of a trained GPT's final hidden states over the user's last block_size training
  tokens, the analog of HeTLM's frozen encoder.
Then k-means (k-means++ seeding, n_init restarts, empty clusters reseeded), clusters numbered by
decreasing size.

    python cluster.py --k=5                                        # built-in dataset, TF-IDF vectors
    python cluster.py --vectors=model --ckpt=out/stage1/best.pt    # a trained model's hidden states
    python cluster.py --data_dir=data/msnbc --k=10                 # 989,818 users in a few seconds

Writes data_dir/clusters.npy (int64 cluster of each user index) and data_dir/clusters.json
(settings, inertia, sizes), and prints each cluster's top pages; on the built-in dataset, also the
adjusted Rand index against the simulated users' true segments.
"""

import math
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch

from configurator import ConfigError, Progress

# -----------------------------------------------------------------------------
data_dir = 'data/builtin'      # a dataset prepared by data.py; data/builtin is generated when missing
k = 5                          # number of clusters
vectors = 'tfidf'              # 'tfidf' (page frequencies, no model) or 'model' (hidden states of ckpt)
ckpt = 'out/stage1/best.pt'    # vectors='model': a checkpoint trained on data_dir
dim = 64                       # tfidf: with more pages than this, reduce to dim dimensions (truncated SVD)
n_init = 4                     # k-means restarts; the one with the lowest inertia is kept
max_iter = 100                 # Lloyd iterations per restart, at most
seed = 1337
top_pages = 5                  # pages printed per cluster
batch_tokens = 16384           # vectors='model': tokens per forward pass
device = 'auto'                # vectors='model' / refine: 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'mps'
refine = ''                    # a clusterwise checkpoint (train.py --n_clusters=K): instead of k-means,
                               #   move every user to the set with the lowest NLL on their training pages
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

from tokenizer import N_SPECIAL  # noqa: E402  (pages are ids N_SPECIAL.. ; <pad> <unk> <bos> <eos> first)

# -----------------------------------------------------------------------------
# user vectors

def train_events(data):
    """(user, page) int64 arrays of every page event in the users' training regions, page = token id
    - N_SPECIAL (special tokens and <unk> dropped). One flat gather, no per-user loop."""
    start = np.asarray(data.offsets[:-1], dtype=np.int64)
    n = np.maximum(np.asarray(data.train_end, dtype=np.int64) - start, 0)     # (U,) training tokens
    user = np.repeat(np.arange(len(n)), n)                                    # (N,)
    pos = np.arange(int(n.sum())) + np.repeat(start - (np.cumsum(n) - n), n)  # (N,) absolute token index
    tok = np.asarray(data.tokens[pos], dtype=np.int64)
    keep = tok >= N_SPECIAL
    return user[keep], tok[keep] - N_SPECIAL


def tfidf_vectors(data, dim=64, seed=1337):
    """(U, D) float32 TF-IDF vectors of the users' training pages with unit rows (zeros for a user
    with no training page); D = number of pages if <= dim, else dim (truncated SVD, seeded)."""
    user, page = train_events(data)
    U, P = data.n_users, data.vocab_size - N_SPECIAL
    ij = torch.from_numpy(np.stack([user, page]))
    counts = torch.sparse_coo_tensor(ij, torch.ones(len(user)), (U, P), check_invariants=True)
    counts = counts.coalesce()                                             # repeats summed: (user, page) counts
    rows, cols = counts.indices()
    df = torch.bincount(cols, minlength=P).double()                        # (P,) users per page
    idf = torch.log((1 + U) / (1 + df)) + 1                                # smooth idf, as scikit-learn
    w = (1 + torch.log(counts.values().double())) * idf[cols]              # sublinear tf x idf
    norm = torch.zeros(U, dtype=torch.float64).index_add_(0, rows, w * w).sqrt()
    x = torch.sparse_coo_tensor(counts.indices(), (w / norm[rows]).float(), (U, P), is_coalesced=True,
                                check_invariants=False)
    if P <= dim:
        return x.to_dense()                                                # (U, P): few pages
    # latent semantic analysis: project on the top right singular vectors, never a dense U x P matrix
    with torch.random.fork_rng(devices=[]):                                # svd_lowrank uses the global RNG
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(x, q=min(dim, U), niter=4)             # (P, dim)
    z = torch.sparse.mm(x, v)                                              # (U, dim)
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.inference_mode()
def model_vectors(model, data, block_size, device, batch_tokens=16384):
    """(U, C) float32: the mean of the model's final hidden states over each user's last block_size
    training tokens. Users are grouped by that length, so every batch holds rows of ONE length: no
    pads at all, and a row's vector does not depend on what it was batched with."""
    end = np.asarray(data.train_end, dtype=np.int64)
    start = np.maximum(np.asarray(data.offsets[:-1], dtype=np.int64), end - block_size)
    lengths = end - start                                                  # (U,) <= block_size
    out = torch.zeros(data.n_users, model.config.n_embd)
    was_training = model.training
    model.eval()
    bar = Progress(total=int(lengths.sum()), unit='tok', unit_scale=True, leave=False, desc='user vectors')
    for L in np.unique(lengths[lengths > 0]).tolist():
        users = np.flatnonzero(lengths == L)
        rows = max(1, batch_tokens // L)
        for i in range(0, len(users), rows):
            u = users[i:i + rows]
            x = np.asarray(data.tokens[start[u, None] + np.arange(L)], dtype=np.int64)   # (B, L)
            h = model.hidden_states(torch.from_numpy(x).to(device))                      # (B, L, C)
            out[torch.from_numpy(u)] = h.float().mean(dim=1).cpu()
            bar.update(len(u) * L)
    bar.close()
    model.train(was_training)
    return out

# -----------------------------------------------------------------------------
# k-means

def assign(x, x_sq, c, chunk):
    """Nearest centroid of every row -> (labels (N,) int64, squared distance (N,) float32). Distances
    are ||x||^2 - 2 x.c + ||c||^2: one matmul, and ||x||^2 added only to the minimum. A chunk of rows
    at a time, so the (chunk, K) block stays small for any N."""
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), device=x.device)
    c_sq = (c * c).sum(1)
    for i in range(0, len(x), chunk):
        d = torch.addmm(c_sq, x[i:i + chunk], c.T, alpha=-2)               # (chunk, K) minus ||x||^2
        dist[i:i + chunk], labels[i:i + chunk] = d.min(dim=1)
    return labels, dist.add_(x_sq).clamp_min_(0)                          # float32 rounding can dip < 0


def kmeans_pp(x, x_sq, k, g, chunk):
    """k-means++ seeding (Arthur & Vassilvitskii 2007), greedy as scikit-learn: each step draws
    2 + log(k) candidates with probability proportional to D(x)^2 and keeps the one that lowers the
    potential most. -> (k, D) initial centroids."""
    N, trials = len(x), 2 + int(math.log(k))
    first = int(torch.randint(N, (1,), generator=g))
    centroids = [x[first]]
    _, d = assign(x, x_sq, x[first:first + 1], chunk)                      # (N,) D(x)^2
    for _ in range(1, k):
        cum = torch.cumsum(d.double(), 0)
        if cum[-1] > 0:
            u = torch.rand(trials, generator=g, dtype=torch.float64).to(x.device) * cum[-1]
            cand = torch.searchsorted(cum, u).clamp_max_(N - 1)
        else:                                                              # every point is a centroid already
            cand = torch.randint(N, (trials,), generator=g).to(x.device)
        # (N, trials) in one piece: trials <= 9 for k <= 1000, so no larger than x once D >= 9
        dc = torch.minimum(torch.addmm(x_sq[cand], x, x[cand].T, alpha=-2).add_(x_sq[:, None]), d[:, None])
        best = int(dc.sum(0, dtype=torch.float64).argmin())               # lowest potential
        centroids.append(x[int(cand[best])])
        d = dc[:, best].clamp_min(0)
    return torch.stack(centroids)


def lloyd(x, x_sq, c, max_iter, tol, chunk):
    """Lloyd iterations from centroids c until the squared centroid shift is <= tol. A cluster left
    empty takes the point farthest from its centroid (as scikit-learn), which leaves its old cluster.
    -> (labels, centroids, inertia), labels from a final assignment to the returned centroids."""
    K = len(c)
    for _ in range(max_iter):
        labels, dist = assign(x, x_sq, c, chunk)
        counts = torch.bincount(labels, minlength=K)                       # (K,)
        sums = torch.zeros_like(c).index_add_(0, labels, x)                # (K, D)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            far = torch.topk(dist, len(empty)).indices.tolist()            # the worst-served points
            for j, p in zip(empty, far):
                old = int(labels[p])
                sums[old] -= x[p]
                counts[old] -= 1
                sums[j], counts[j] = x[p], 1
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= tol:
            break
    labels, dist = assign(x, x_sq, c, chunk)
    return labels, c, float(dist.sum(dtype=torch.float64))


def kmeans(x, k, n_init=4, max_iter=100, tol=1e-4, seed=1337, init=None, chunk_elems=1 << 22):
    """k-means on the rows of x (N, D) -> (labels (N,) int64, centroids (k, D) float32, inertia).

    n_init restarts from k-means++ seeds drawn from one seeded torch.Generator (same seed, same
    result); the restart with the lowest inertia (sum of squared distances to the centroids) wins.
    init: (k, D) starting centroids instead (one run). tol is relative to the mean feature variance,
    as scikit-learn. Clusters are numbered by decreasing size (ties: lower centroid index first)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    N = len(x)
    if not 1 <= k <= N:
        raise ValueError(f"k={k}: need 1 <= k <= the number of points ({N:,})")
    g = torch.Generator().manual_seed(seed)
    x_sq = (x * x).sum(1)                                                  # (N,)
    chunk = max(1, chunk_elems // k)
    tol = tol * float(x.var(dim=0, unbiased=False).mean())
    best = None
    runs = 1 if init is not None else n_init
    bar = Progress(range(runs), desc=f'k-means k={k}', leave=False)
    for _ in bar:
        if init is not None:
            c0 = torch.as_tensor(init, dtype=torch.float32).clone()
        else:
            c0 = kmeans_pp(x, x_sq, k, g, chunk)
        labels, c, inertia = lloyd(x, x_sq, c0, max_iter, tol, chunk)
        if best is None or inertia < best[2]:
            best = (labels, c, inertia)
        bar.set_postfix(inertia=f'{best[2]:.5g}')
    labels, c, inertia = best
    order = torch.argsort(-torch.bincount(labels, minlength=k), stable=True)   # new id -> old id
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=order.device)
    return rank[labels], c[order], inertia


def adjusted_rand_index(a, b):
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985): 1 = the same partition, ~0 =
    chance agreement, negative = worse than chance. Labels may be any hashable numpy values."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.ndim == 1, "two labelings of the same points"
    n = len(a)
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    nb = int(bi.max()) + 1
    table = np.bincount(ai * nb + bi, minlength=(int(ai.max()) + 1) * nb).reshape(-1, nb)  # contingency
    pairs = lambda m: (m * (m - 1.0) / 2.0).sum()                          # sum of C(m, 2), float64
    same_both, same_a, same_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = same_a * same_b / pairs(np.array([n]))
    top = (same_a + same_b) / 2
    if top == expected:                                   # both trivial: one cluster, or all singletons
        return 1.0
    return float((same_both - expected) / (top - expected))

# -----------------------------------------------------------------------------
# endogenous refinement (HeTLM): move each user to the parameter set that predicts them best

@torch.no_grad()
def per_set_nll(model, data, block_size, device, batch_tokens=4096):
    """(n_users, K) mean NLL of each user's training page targets under each parameter set of a
    clusterwise model (NaN for users without one). One forward pass over the data per set."""
    from data import train_windows
    from curriculum import target_difficulty
    K = model.config.n_clusters
    windows = train_windows(data, block_size)
    total = np.zeros((data.n_users, K))
    count = np.zeros(data.n_users)
    for k in range(K):  # the stage-2 difficulty pass, run with every window on set k
        pos, _, ce = target_difficulty(model, data, windows, device, batch_tokens, np.full(len(windows), k))
        user = np.searchsorted(np.asarray(data.offsets), pos, side='right') - 1
        np.add.at(total[:, k], user, ce)
        if k == 0:
            np.add.at(count, user, 1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return total / count[:, None]


def reassign(nll, current):
    """New assignment: each user's lowest-NLL set (users without training pages, and users whose
    current set ties the lowest, stay put).
    Returns (labels, number of users moved)."""
    known = ~np.isnan(nll).any(axis=1)
    labels = current.copy()
    best = np.argmin(nll[known], axis=1)
    rows = np.flatnonzero(known)
    # move only to a strictly better set: ties (e.g. sets that are still identical) keep the user
    better = nll[rows, best] < nll[rows, current[rows]]
    labels[rows[better]] = best[better]
    return labels, int((labels != current).sum())


# -----------------------------------------------------------------------------
# the command line

def describe(data, labels, k, n_top):
    """Print each cluster's size and its top pages by share of the cluster's training events, with
    lift = that share / the page's share of all training events."""
    labels = np.asarray(labels)
    user, page = train_events(data)
    P = data.vocab_size - N_SPECIAL
    counts = np.bincount(labels[user] * P + page, minlength=k * P).reshape(k, P)     # (K, P) events
    overall = counts.sum(0) / max(counts.sum(), 1)                                   # (P,)
    sizes = np.bincount(labels, minlength=k)
    for c in range(k):
        n_ev = int(counts[c].sum())
        print(f"cluster {c}: {sizes[c]:,} users ({sizes[c] / len(labels):.1%}), {n_ev:,} training events")
        share = counts[c] / max(n_ev, 1)
        for p in np.argsort(-share, kind='stable')[:n_top]:
            if counts[c, p]:
                name = data.tokenizer.pages[p + N_SPECIAL]
                print(f"    {name:<32s} {share[p]:6.1%}   lift {share[p] / overall[p]:5.2f}")
    return sizes


def refine_step(cfg, data):
    """One round of HeTLM's endogenous refinement: reassign users by lowest NLL over the sets of
    a trained clusterwise checkpoint, write clusters.npy; then retrain (train.py --n_clusters=K)."""
    from configurator import ConfigError
    from files import write_atomic, writing
    from runtime import load_checkpoint, resolve_device
    if not os.path.isfile(cfg['refine']):
        raise ConfigError(f"--refine={cfg['refine']}: no checkpoint there")
    model, ck = load_checkpoint(cfg['refine'], resolve_device(cfg['device']))
    if model.config.n_clusters < 2 or ck.get('clusters') is None:
        raise ConfigError(f"--refine={cfg['refine']}: not a clusterwise checkpoint (train with --n_clusters=K)")
    if ck['tokenizer']['pages'] != data.tokenizer.pages:
        raise ConfigError(f"--refine={cfg['refine']} was trained on another vocabulary than {cfg['data_dir']}")
    t0 = time.time()
    current = ck['clusters'].numpy()
    nll = per_set_nll(model, data, model.config.block_size, next(model.parameters()).device, cfg['batch_tokens'])
    labels, moved = reassign(nll, current)
    known = ~np.isnan(nll).any(axis=1)
    before = nll[known, current[known]].mean()
    after = nll[known, labels[known]].mean()
    print(f"refinement: {moved:,} of {len(labels):,} users moved ({moved / len(labels):.2%}); mean training NLL "
          f"{before:.4f} -> {after:.4f} under {cfg['refine']} ({time.time() - t0:.1f} s)")
    info = {'refined_from': cfg['refine'], 'k': int(model.config.n_clusters), 'moved': moved,
            'nll_before': float(before), 'nll_after': float(after),
            'sizes': np.bincount(labels, minlength=model.config.n_clusters).tolist(), 'n_users': len(labels),
            'created': datetime.now(timezone.utc).isoformat(timespec='seconds')}
    if data.segments is not None:
        info['ari_segments'] = adjusted_rand_index(labels, data.segments)
        print(f"adjusted Rand index against the true segments: {info['ari_segments']:.4f}")
    with writing(cfg['data_dir'], 'cluster.py'):   # not while data.py prepares the folder again
        write_atomic(os.path.join(cfg['data_dir'], 'clusters.npy'), labels)
        write_atomic(os.path.join(cfg['data_dir'], 'clusters.json'), info)   # describes the file it sits beside
    print(f"wrote {os.path.join(cfg['data_dir'], 'clusters.npy')} and clusters.json; retrain with "
          f"python train.py --data_dir={cfg['data_dir']} --n_clusters={model.config.n_clusters}"
          + ("; under 1% moved: converged" if moved < 0.01 * len(labels) else ""))
    return labels, {'moved': moved, 'nll_before': float(before), 'nll_after': float(after)}


def run(cfg):
    from configurator import ConfigError
    from data import ensure_builtin, load_data
    from files import write_atomic, writing

    for key in ('k', 'dim', 'n_init', 'max_iter', 'batch_tokens'):
        if cfg[key] < 1:
            raise ConfigError(f"--{key}={cfg[key]}: must be >= 1")
    if cfg['top_pages'] < 0:
        raise ConfigError(f"--top_pages={cfg['top_pages']}: must be >= 0")
    if cfg['vectors'] not in ('tfidf', 'model'):
        raise ConfigError(f"--vectors={cfg['vectors']}: expected 'tfidf' or 'model'")
    if os.path.normpath(cfg['data_dir']) == os.path.normpath(DEFAULTS['data_dir']):
        ensure_builtin(cfg['data_dir'])
    data = load_data(cfg['data_dir'])
    if cfg['k'] > data.n_users:
        raise ConfigError(f"--k={cfg['k']}: more clusters than the {data.n_users:,} users of {cfg['data_dir']}")
    P = data.vocab_size - N_SPECIAL
    if cfg['refine']:
        return refine_step(cfg, data)

    t0 = time.time()
    if cfg['vectors'] == 'tfidf':
        x = tfidf_vectors(data, cfg['dim'], cfg['seed'])
        what = f"TF-IDF over {P:,} pages" + (f", truncated SVD to {x.shape[1]} dims" if P > cfg['dim'] else "")
    else:
        from runtime import load_checkpoint, resolve_device
        if not os.path.isfile(cfg['ckpt']):
            raise ConfigError(f"--ckpt={cfg['ckpt']}: no checkpoint there; train one (python train.py --stage=1)")
        model, ck = load_checkpoint(cfg['ckpt'], resolve_device(cfg['device']))
        if ck['tokenizer']['pages'] != data.tokenizer.pages:
            raise ConfigError(f"--ckpt={cfg['ckpt']} was trained on another vocabulary than {cfg['data_dir']} "
                              f"(its data_dir: {ck['config']['data_dir']})")
        x = model_vectors(model, data, ck['model_args']['block_size'], next(model.parameters()).device,
                          cfg['batch_tokens'])
        what = f"mean hidden states of {cfg['ckpt']}"
    print(f"user vectors ({what}): {x.shape[0]:,} x {x.shape[1]} in {time.time() - t0:.1f} s")

    t1 = time.time()
    labels, _, inertia = kmeans(x, cfg['k'], cfg['n_init'], cfg['max_iter'], seed=cfg['seed'])
    labels = labels.cpu().numpy().astype(np.int64)
    print(f"k-means (k={cfg['k']}, {cfg['n_init']} restarts): inertia {inertia:.6g} in {time.time() - t1:.1f} s\n")
    sizes = describe(data, labels, cfg['k'], cfg['top_pages'])

    info = {'k': cfg['k'], 'vectors': cfg['vectors'], 'seed': cfg['seed'], 'n_init': cfg['n_init'],
            'dim': int(x.shape[1]), 'inertia': inertia, 'sizes': sizes.tolist(), 'n_users': data.n_users}
    if cfg['vectors'] == 'model':
        info['ckpt'] = cfg['ckpt']
    if data.segments is not None:   # the built-in dataset knows each simulated user's true segment
        info['ari_segments'] = adjusted_rand_index(labels, data.segments)
        print(f"\nadjusted Rand index against the {len(np.unique(data.segments))} true segments: "
              f"{info['ari_segments']:.4f}")
    info['seconds'] = round(time.time() - t0, 2)
    info['created'] = datetime.now(timezone.utc).isoformat(timespec='seconds')
    with writing(cfg['data_dir'], 'cluster.py'):   # not while data.py prepares the folder again
        write_atomic(os.path.join(cfg['data_dir'], 'clusters.npy'), labels)
        write_atomic(os.path.join(cfg['data_dir'], 'clusters.json'), info)
    print(f"wrote {os.path.join(cfg['data_dir'], 'clusters.npy')} and clusters.json")
    return labels, info


# -----------------------------------------------------------------------------
# a new user: the parameter set with the lowest NLL on their pages (predict.py, sample.py)

def set_nll(model, device, contexts):
    """(K, N) NLL per page of each context's last block_size + 1 tokens under each of the model's K
    parameter sets: HeTLM's rule puts a new history in the set with the lowest (predict.py,
    sample.py). Batched: one pass per set and batch of similar length; NaN for a context with no
    page target (pick_set then takes set 0)."""
    from sessions import model_logp
    K, block = model.config.n_clusters, model.config.block_size
    x = [np.asarray(c[-block - 1:], dtype=np.int64) for c in contexts]
    order = np.argsort([len(c) for c in x], kind="stable")
    nll = np.full((K, len(x)), math.nan)
    for c in range(K):
        logp = model_logp(model, device, np.full(len(x), c))
        per = logp.rows_per_pass(block, block)
        for s in range(0, len(order), per):
            b = order[s:s + per]
            T = max(len(x[i]) for i in b) - 1
            if T < 1:
                continue
            tgt = np.full((len(b), T), -1, dtype=np.int64)   # targets aligned to the end, as logp's positions
            for j, i in enumerate(b):
                if len(x[i]) > 1:
                    tgt[j, T - len(x[i]) + 1:] = x[i][1:]
            lp = logp([x[i][:-1] if len(x[i]) > 1 else x[i] for i in b], b, T)          # (B, T, V)
            t = torch.from_numpy(tgt)
            keep = t >= N_SPECIAL
            got = lp.gather(2, t.clamp(min=0).unsqueeze(2)).squeeze(2)
            n = keep.sum(1)
            nll[c, b] = torch.where(n > 0, -(torch.where(keep, got, 0.0)).sum(1) / n.clamp(min=1), math.nan).numpy()
    return nll


def pick_set(nll):
    """(K, N) set_nll -> (N,) the set with the lowest NLL; set 0 where no set has a page to score."""
    return np.where(np.isnan(nll), np.inf, nll).argmin(0)


# -----------------------------------------------------------------------------
# the sets in training: each user's cluster, each window's

def window_clusters(data, windows, user_clusters):
    """Cluster id of each window's user, or None without clusters."""
    if user_clusters is None:
        return None
    return user_clusters[np.searchsorted(np.asarray(data.offsets), windows[:, 0], side='right') - 1]


def load_clusters(cfg, data):
    """The user -> cluster assignment for n_clusters > 1 (None for a single model)."""
    if cfg['n_clusters'] == 1:
        return None
    path = cfg['clusters'] or os.path.join(cfg['data_dir'], 'clusters.npy')
    if not os.path.isfile(path):
        raise ConfigError(f"--n_clusters={cfg['n_clusters']} needs a user -> cluster assignment at {path}: "
                          f"run python cluster.py --data_dir={cfg['data_dir']} --k={cfg['n_clusters']}")
    try:
        c = np.load(path, allow_pickle=False)   # a pickled object is refused: loading it could run code
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{path}: not a .npy array of cluster ids ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not np.issubdtype(c.dtype, np.integer) or c.shape != (data.n_users,):
        raise ConfigError(f"{path}: expected {data.n_users:,} integer cluster ids, got {c.dtype} of shape {c.shape}")
    c = c.astype(np.int64)
    if c.min() < 0 or c.max() >= cfg['n_clusters']:
        raise ConfigError(f"{path}: expected {data.n_users:,} cluster ids in [0, {cfg['n_clusters']}), "
                          f"got shape {c.shape}, range [{c.min()}, {c.max()}]")
    return c


def main(argv):
    from configurator import run_main
    from data import DataError
    run_main(run, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
