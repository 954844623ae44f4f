"""cluster.py: k-means (blobs, seeds, restarts, empty-cluster reseeding), the adjusted Rand index,
TF-IDF and model user vectors, the command line. Tiny data only, written into tmp_path."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster  # noqa: E402
from cluster import adjusted_rand_index, kmeans, model_vectors, tfidf_vectors  # noqa: E402
from data import load_data, prepare  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import N_SPECIAL  # noqa: E402


def blobs(sizes, dim=5, spread=0.3, seed=0):
    """Gaussian blobs around centers ~10 apart -> (x (N, dim) float32, true blob of each row)."""
    g = torch.Generator().manual_seed(seed)
    centers = 10 * torch.randn(len(sizes), dim, generator=g)
    truth = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = centers[truth] + spread * torch.randn(len(truth), dim, generator=g)
    perm = torch.randperm(len(truth), generator=g)                  # blobs interleaved, not in row order
    return x[perm], truth[perm].numpy()


def dataset(tmp_path, lines, name="log.seq"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    prepare(str(path), str(tmp_path / "ds"))
    return load_data(str(tmp_path / "ds"))


def random_dataset(tmp_path, n_users=40, n_pages=12, seed=0):
    """Users with 1-3 sessions of 1-12 pages: histories shorter and longer than a small block_size."""
    rng = np.random.default_rng(seed)
    lines = [f"u{u}: " + " ".join(f"p{rng.integers(n_pages)}" for _ in range(rng.integers(1, 13)))
             for u in range(n_users) for _ in range(rng.integers(1, 4))]
    return dataset(tmp_path, lines)

# ----------------------------------------------------------------------------- k-means

def test_kmeans_recovers_blobs_numbered_by_size_and_is_seed_deterministic():
    x, truth = blobs([200, 120, 80])
    labels, centroids, inertia = kmeans(x, 3, n_init=2, seed=7)
    assert labels.dtype == torch.int64 and centroids.shape == (3, 5)
    assert adjusted_rand_index(labels.numpy(), truth) == 1.0
    assert torch.bincount(labels).tolist() == [200, 120, 80]       # cluster 0 is the largest
    for c in range(3):                                              # centroids are their points' means
        assert torch.allclose(centroids[c], x[labels == c].mean(0), atol=1e-4)
    assert math.isclose(inertia, float(((x - centroids[labels]) ** 2).sum()), rel_tol=1e-4)
    again = kmeans(x, 3, n_init=2, seed=7)
    assert torch.equal(labels, again[0]) and torch.equal(centroids, again[1]) and inertia == again[2]


def test_kmeans_keeps_the_restart_with_lowest_inertia(monkeypatch):
    x = torch.rand(600, 2, generator=torch.Generator().manual_seed(1))   # uniform: many local minima
    seen = []
    lloyd = cluster.lloyd

    def recording(*args):
        out = lloyd(*args)
        seen.append(out[2])
        return out
    monkeypatch.setattr(cluster, "lloyd", recording)
    _, _, inertia = kmeans(x, 12, n_init=6, seed=0)
    assert len(seen) == 6 and len(set(seen)) > 1                   # the restarts really differ
    assert inertia == min(seen)


def test_empty_cluster_takes_the_farthest_point():
    g = torch.Generator().manual_seed(0)
    a = 0.1 * torch.randn(50, 2, generator=g)                       # blob at (0, 0)
    b = 0.1 * torch.randn(50, 2, generator=g) + torch.tensor([10.0, 0.0])
    outlier = torch.tensor([[0.0, 4.0]])                            # the point worst served by blob a
    x = torch.cat([a, outlier, b])
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1000.0, 1000.0]])  # centroid 2 is nearest to no point
    for max_iter in (1, 100):
        labels, centroids, _ = kmeans(x, 3, init=init, max_iter=max_iter)
        sizes = torch.bincount(labels, minlength=3)
        assert (sizes > 0).all(), sizes                             # without reseeding cluster 2 stays empty
        assert sizes[labels[50]] == 1                               # ... and it took the outlier
        assert torch.equal(centroids[labels[50]], outlier[0])


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError):
        kmeans(torch.zeros(3, 2), 4)

# ----------------------------------------------------------------------------- adjusted Rand index

def test_adjusted_rand_index_hand_computed():
    assert adjusted_rand_index([0, 0, 1, 1, 2], [0, 0, 1, 1, 2]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1, 2], [5, 5, 9, 9, 7]) == 1.0    # up to relabeling
    # [0,0,1,1] vs [0,0,1,2]: pairs together in both = 1, in a = 2, in b = 1, of C(4,2) = 6;
    # expected = 2*1/6 = 1/3, max = (2+1)/2 = 3/2 -> (1 - 1/3) / (3/2 - 1/3) = 4/7
    assert math.isclose(adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]), 4 / 7)
    # [0,0,1,1] vs [0,1,0,1]: no pair together in both; expected = 2*2/6 -> (0 - 2/3) / (2 - 2/3) = -1/2
    assert math.isclose(adjusted_rand_index([0, 0, 1, 1], ["a", "b", "a", "b"]), -0.5)
    assert adjusted_rand_index([0, 0, 0], [0, 1, 2]) == 0.0                 # one cluster vs singletons

# ----------------------------------------------------------------------------- user vectors

def test_tfidf_uses_training_pages_only_and_rows_are_unit(tmp_path):
    # the last two pages of a user with >= 3 are validation and test: x y, z w must not count
    d = dataset(tmp_path, ["u1: a a b x y", "u2: b a a z w", "u3: c c d a y", "u4: a d"])
    v = tfidf_vectors(d, dim=64)
    assert v.shape == (4, d.vocab_size - N_SPECIAL)                 # few pages: the full vectors
    assert torch.allclose(v.norm(dim=1), torch.ones(4))
    u1, u2, u3 = (d.user_index(u) for u in ("u1", "u2", "u3"))
    assert torch.allclose(v[u1], v[u2]) and not torch.allclose(v[u1], v[u3], atol=0.1)
    # by hand: u1 has a twice, b once; a is in the training pages of 3 of 4 users (u3's a is its
    # validation page), b in 2: tf-idf = (1 + ln count) * (1 + ln((1 + 4 users) / (1 + users with it)))
    col = lambda p: d.tokenizer.page_id(p) - N_SPECIAL
    a, b = (1 + math.log(2)) * (1 + math.log(5 / 4)), 1 * (1 + math.log(5 / 3))
    expected = torch.zeros(v.shape[1])
    expected[col("a")], expected[col("b")] = a, b
    assert torch.allclose(v[u1], expected / expected.norm(), atol=1e-6)
    # more pages than dim: truncated SVD, still unit rows, same users same vector, seeded
    r = tfidf_vectors(d, dim=2, seed=3)
    assert r.shape == (4, 2) and torch.allclose(r.norm(dim=1), torch.ones(4))
    assert torch.allclose(r[u1], r[u2], atol=1e-5)
    assert torch.equal(r, tfidf_vectors(d, dim=2, seed=3))


def test_model_vectors_equal_one_user_at_a_time(tmp_path):
    d = random_dataset(tmp_path)
    torch.manual_seed(0)
    block = 8
    model = GPT(GPTConfig(block_size=block, vocab_size=d.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    v = model_vectors(model, d, block, "cpu", batch_tokens=20)     # several batches per length
    lengths = d.train_end - d.offsets[:-1]
    assert (lengths > block).any() and (lengths < block).any()      # both cut and short histories
    for u in range(d.n_users):
        ids = d.tokens[max(d.offsets[u], d.train_end[u] - block):d.train_end[u]].astype(np.int64)
        with torch.no_grad():
            h = model.hidden_states(torch.from_numpy(ids)[None])[0]   # (L, C)
        assert torch.allclose(v[u], h.mean(0), atol=1e-5), u

# ----------------------------------------------------------------------------- command line

def test_cli_writes_clusters_and_rejects_bad_settings(tmp_path, capsys):
    d = random_dataset(tmp_path)
    cluster.main([f"--data_dir={d.data_dir}", "--k=3", "--n_init=2", "--top_pages=2"])
    labels = np.load(os.path.join(d.data_dir, "clusters.npy"))
    with open(os.path.join(d.data_dir, "clusters.json")) as f:
        info = json.load(f)
    assert labels.dtype == np.int64 and labels.shape == (d.n_users,) and set(labels) == {0, 1, 2}
    assert info["k"] == 3 and info["vectors"] == "tfidf" and info["sizes"] == np.bincount(labels).tolist()
    assert "cluster 2:" in capsys.readouterr().out
    for bad in ("--k=0", "--k=1000", "--vectors=bert", "--kk=3"):
        with pytest.raises(SystemExit) as e:
            cluster.main([f"--data_dir={d.data_dir}", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, (bad, err)


def test_refinement_reassigns_by_lowest_nll_and_never_raises_total_nll(tmp_path):
    import torch.nn.functional as F
    from shop import make_builtin
    from data import get_batch, load_data, train_windows
    from model import GPT, GPTConfig
    path = str(tmp_path / 'shop')
    make_builtin(path, n_users=80)
    data = load_data(path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=data.vocab_size, n_layer=1, n_head=1, n_embd=16, n_clusters=3))
    nll = cluster.per_set_nll(model, data, 16, 'cpu', batch_tokens=256)
    assert nll.shape == (data.n_users, 3)
    # one user by hand, under set 2: mean cross-entropy of their training page targets
    w = train_windows(data, 16)
    u = int(np.flatnonzero(~np.isnan(nll[:, 0]))[0])
    rows = np.flatnonzero((w[:, 0] >= data.offsets[u]) & (w[:, 0] < data.offsets[u + 1]))
    x, y = get_batch(data, w, rows)
    logits, _ = model(x, cluster_ids=torch.full((len(rows),), 2))
    keep = y >= 4
    expected = F.cross_entropy(logits[keep], y[keep]).item()
    assert nll[u, 2] == pytest.approx(expected, rel=1e-5)
    current = np.arange(data.n_users) % 3
    labels, moved = cluster.reassign(nll, current)
    known = ~np.isnan(nll).any(axis=1)
    assert np.array_equal(labels[known], nll[known].argmin(1)) and np.array_equal(labels[~known], current[~known])
    assert nll[known, labels[known]].sum() <= nll[known, current[known]].sum()
    assert moved == int((labels != current).sum())


def test_reassign_keeps_users_whose_set_ties_the_best():
    nll = np.array([[1.0, 1.0], [2.0, 1.0], [0.5, 0.7], [np.nan, np.nan]])
    labels, moved = cluster.reassign(nll, np.array([1, 0, 1, 1]))
    assert labels.tolist() == [1, 1, 0, 1] and moved == 2        # a tie stays; strictly better moves
