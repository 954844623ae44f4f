"""
Simple next-page baselines, every one fitted on TRAINING data only (each user's tokens before its
validation target, data.train_end). A scorer is fn(users, ctx_start, ctx_end) -> (B, V) float32
scores, higher = more likely (evaluate.rank_metrics ranks pages only, ids 0..3 never count), built
from the training statistics and from the context itself (the input: legal to use).

  most-popular  p_pop(x): add-one smoothed frequency of each page among training targets.
  markov        first-order Markov with back-off: (c(a, x) + beta p_pop(x)) / (c(a) + beta), a = the
                context's last token.
  sr            sequential rules (Ludewig & Jannach 2018; Ludewig, Mauro, Latifi & Jannach 2019): for
                the context's last page a, score(b) = sum over training sessions of 1/gap for every b
                that follows an a by gap = 1..steps (10) events inside one session.
  sknn          session-based kNN (Jannach & Ludewig 2017; Ludewig et al. 2019): the query is the
                context's current session (its last 10 events); the pool is the training sessions
                of OTHER users (a user's own would hold the query itself); candidates are the 500
                most recent pool sessions (in stream order) that share a page with the query, as
                session-rec samples them; the k most similar by cosine of binary page sets are the
                neighbours; score(b) = sum of the similarities of the neighbours that hold b.
  v-sknn        the same with the query's pages weighted by position, linearly: the most recent
                event 1, the one before 0.9, ..., the 10th most recent 0.1 (session-rec's 'linear');
                similarity = sum of the weights of the shared pages / |query| (session-rec's 'vec').
                For both, k and `remind` are chosen on validation (choose_knn): remind=False takes
                the query's own pages out of the kNN evidence, for logs whose sessions never revisit
                a page (BMS: every neighbour holds the query's pages, which would fill the top ranks).
  recency       a repeat baseline: the user's own pages in the context, score(b) = sum over its
                visits of decay^age (age = page events since that visit, most recent = 0); decay is
                chosen on validation (choose_decay; any decay < 0.5 ranks by the last visit alone).

Terms. A session is a run of events between <bos> and <eos>; an event is a page or <unk> (a page
too rare for the vocabulary: it takes its place in the order, so gaps and ages count it, but it is
never a query page nor a kNN candidate). Nothing is counted across a session boundary nor past a
user's training part. When the context ends with <bos> (the target opens a new session), "the last
page" and "the current session" are those of the previous session; with no page at all a baseline
falls back to popularity.

Ties and back-off. Ranks count ties in the target's favour, so equal scores must mean equal
evidence. SR and kNN score log e(b) where they have evidence e(b) > 0 (at least 1/steps for SR,
about 1/sqrt(10 |session|) >= 1e-3 for kNN) and log(1e-6 p_pop(b)) elsewhere: unscored pages fall
far below every scored one, in popularity order. Recency scores log r(b) on visited pages and
(lowest visited score of the row - 1) + log(p_pop(b) / max p_pop) elsewhere. Equal evidence is
broken by popularity, and scores are nudged by a few float32 steps where float32 rounding would
merge different (evidence, popularity) pairs (ordered32): kNN with small k gives the query's pages
exactly equal sums, which would otherwise all rank first.

Validation choices (k, remind, decay) are made on a fixed random subset of at most 5,000
validation users, also when test is scored, and cached on the data object with the fitted tables,
so the strong baselines cost one choosing pass per dataset (strong_baselines).
"""
import weakref
from types import SimpleNamespace

import numpy as np
import torch

from data import eval_examples
from tokenizer import BOS, EOS, N_SPECIAL, PAD, UNK  # ids 0..3 are <pad> <unk> <bos> <eos>; pages start at 4

STEPS = 10                      # SR: b counts when it follows a within this many events (weight 1/gap)
SAMPLE_SIZE = 500               # kNN: candidate sessions per query (most recent sharing a page)
QUERY_LEN = 10                  # kNN: the query is the last QUERY_LEN events of the current session
K_GRID = (10, 20, 50, 100, 200, 500)            # kNN: neighbours, chosen on validation
DECAY_GRID = (0.3, 0.6, 0.8, 0.9, 0.95, 0.99)   # recency: decay per event, chosen on validation
CHOOSE_USERS = 5000             # validation users the choices are made on (a fixed, seeded subset)
BACKOFF = 1e-6                  # SR / kNN: a page without evidence scores log(BACKOFF * p_pop)
CHUNK = 1 << 21                 # kNN: candidate entries handled at once (bounds memory)

# -----------------------------------------------------------------------------
# most-popular and first-order Markov with back-off (moved from evaluate.py, unchanged)

def training_part(data):
    """(n_tokens,) bool: the token lies in its user's training part (before the validation target)."""
    n = len(data.tokens)
    offsets, train_end = np.asarray(data.offsets, dtype=np.int64), np.asarray(data.train_end, dtype=np.int64)
    delta = np.bincount(offsets[:-1], minlength=n + 1) - np.bincount(train_end, minlength=n + 1)
    return np.cumsum(delta[:n]) > 0                                      # +1 at starts, -1 at ends

def train_transitions(data, eos=False):
    """(prev, target) for every training target that is a page (or, eos=True, a page or <eos>, the
    session task's targets); prev may be <bos>."""
    n, offsets = len(data.tokens), np.asarray(data.offsets, dtype=np.int64)
    in_train = training_part(data)
    in_train[offsets[:-1][offsets[:-1] < n]] = False                     # a region's first token has no prev
    i = np.flatnonzero(in_train)
    tokens = np.asarray(data.tokens)
    nxt = tokens[i].astype(np.int64)
    keep = (nxt >= N_SPECIAL) | (eos & (nxt == EOS))
    return tokens[i[keep] - 1].astype(np.int64), nxt[keep]

def popularity(data, nxt=None, eos=False):
    """Add-one smoothed probability of each page (and, eos=True, of <eos>) among training targets;
    0 for the other specials. (V,)"""
    V = data.vocab_size
    if nxt is None:
        nxt = train_transitions(data, eos)[1]
    p = np.bincount(nxt, minlength=V).astype(np.float64) + 1.0
    p[[PAD, UNK, BOS] + ([] if eos else [EOS])] = 0.0
    return p / p.sum()

def bigram_counts(data, eos=False):
    """The training bigrams (train_transitions), counted: prev, next, count of each distinct pair,
    sorted by (prev, next); and every transition's target (for popularity)."""
    V = data.vocab_size
    prev, nxt = train_transitions(data, eos)
    codes, counts = np.unique(prev * V + nxt, return_counts=True)
    return codes // V, codes % V, counts, nxt

def bigram_logp(data, beta=1.0, eos=False):
    """First-order Markov with back-off: fn(prevs (B,)) -> (B, V) log of
    (c(prev, x) + beta * p_pop(x)) / (c(prev) + beta), x over pages (and <eos> when eos). The bigram
    table is CSR over prev (bigram_counts), dense only for the prevs of a batch."""
    V = data.vocab_size
    rows, cols, counts, nxt = bigram_counts(data, eos)
    p_pop = popularity(data, nxt, eos)
    indptr = np.searchsorted(rows, np.arange(V + 1))                     # row u = cols[indptr[u]:indptr[u+1]]
    cols = torch.from_numpy(cols)
    vals = torch.from_numpy(counts.astype(np.float32))
    row_total = np.bincount(rows, weights=counts, minlength=V)           # c(prev), (V,)
    beta_pop = torch.from_numpy(beta * p_pop).float()                    # (V,)

    def logp(prevs):
        uniq, inv = np.unique(prevs, return_inverse=True)                # (U,)
        lens = indptr[uniq + 1] - indptr[uniq]
        row = np.repeat(np.arange(len(uniq)), lens)                      # nnz of those rows only
        at = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(indptr[uniq], lens)
        dense = beta_pop.repeat(len(uniq), 1)                            # (U, V)
        dense[torch.from_numpy(row), cols[at]] += vals[at]
        dense /= torch.from_numpy(row_total[uniq] + beta).float().unsqueeze(1)
        return dense.log()[torch.from_numpy(inv.reshape(-1))]            # (B, V)
    return logp

def transition_table(data, width):
    """The model's transition term (model.GPT.transition_terms) from the counts Markov uses, with
    <eos> among the targets as in training: for each token a, its `width` most frequent successors
    (ties: lower id first) and their training counts. Returns nxt (V, width) int32, count (V, width)
    float32 (0 past a token's last successor) and p_pop (V,) float32 (popularity, eos=True)."""
    V = data.vocab_size
    rows, cols, counts, nxt = bigram_counts(data, eos=True)
    order = np.lexsort((cols, -counts, rows))                            # each row most frequent first
    rows, cols, counts = rows[order], cols[order], counts[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)            # place inside its row
    keep = rank < width
    table, count = np.zeros((V, width), np.int32), np.zeros((V, width), np.float32)
    table[rows[keep], rank[keep]] = cols[keep]
    count[rows[keep], rank[keep]] = counts[keep]
    return table, count, popularity(data, nxt, eos=True).astype(np.float32)

def markov_scorer(data, beta=1.0):
    """The next page after each context's last token (bigram_logp over pages)."""
    logp, tokens = bigram_logp(data, beta), data.tokens
    return lambda users, ctx_start, ctx_end: logp(np.asarray(tokens[ctx_end - 1], dtype=np.int64))

def popularity_scorer(data):
    logp = torch.from_numpy(popularity(data)).float().log()[None]        # (1, V) -inf on specials
    return lambda users, ctx_start, ctx_end: logp                        # one row shared by all

# -----------------------------------------------------------------------------
# shared pieces: a per-dataset cache, training sessions, the context's last event

_CACHE = weakref.WeakKeyDictionary()   # data object -> {key: fitted table or validation choice}

def cached(data, key, make):
    """make() once per (data, key); objects that take no weak reference (SimpleNamespace) are not cached."""
    try:
        store = _CACHE.setdefault(data, {})
    except TypeError:
        return make()
    if key not in store:
        store[key] = make()
    return store[key]

def pop(data):
    return cached(data, "popularity", lambda: popularity(data))

def span(starts, lens):
    """Flat indices starts[i] + 0..lens[i]-1, row after row."""
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())

def group_rank(g):
    """For a sorted array: each element's index inside its run of equal values (0, 1, ...)."""
    i = np.arange(len(g))
    new = np.r_[True, g[1:] != g[:-1]] if len(g) else np.zeros(0, bool)
    return i - np.maximum.accumulate(np.where(new, i, 0))

def is_event(tok):
    return (tok == UNK) | (tok >= N_SPECIAL)

def session_index(data):
    """Every training event in stream order: pos, page (int64; <unk> kept), sess = index of its
    session (its <bos> in the stream, so larger = more recent); bos (n_sessions,) the positions of
    every <bos>; user_sess (U+1,): user u owns sessions user_sess[u]..user_sess[u+1]-1."""
    tok, offsets = np.asarray(data.tokens), np.asarray(data.offsets, dtype=np.int64)
    in_train = training_part(data)
    is_bos = tok == BOS
    pos = np.flatnonzero(in_train & is_event(tok))
    sess = (np.cumsum(is_bos) - 1)[pos]                                  # -1 before any <bos>: never a session
    bos = np.flatnonzero(is_bos)
    return SimpleNamespace(pos=pos, page=tok[pos].astype(np.int64), sess=sess, bos=bos, n_sess=len(bos),
                           user_sess=np.searchsorted(bos, offsets))

def last_event(tokens, ctx_start, ctx_end):
    """Position of each context's last event (page or <unk>), skipping a trailing <eos> <bos>;
    ctx_start - 1 where the context holds none."""
    pos = np.asarray(ctx_end, dtype=np.int64) - 1
    ctx_start = np.asarray(ctx_start, dtype=np.int64)
    todo = np.flatnonzero(pos >= ctx_start)
    while len(todo):                                                     # <= 2 steps back in practice
        todo = todo[~is_event(np.asarray(tokens[pos[todo]]))]
        pos[todo] -= 1
        todo = todo[pos[todo] >= ctx_start[todo]]
    return pos

def ordered32(row, val, tie):
    """float32 values for entries (row, val, tie) that keep, within each row, the order of (val, tie)
    read lexicographically, equal only where both are: float32 rounding merges close values and
    evaluate ranks ties in the target's favour. Each is val rounded, nudged up by a few float32
    steps where needed (order-preserving integer view of the floats, a running max per row)."""
    order = np.lexsort((tie, val, row))
    r, v, t = row[order], val[order], tie[order]
    up = np.zeros(len(r), dtype=np.int64)                                # 1 where (val, tie) rises in the row
    up[1:] = (r[1:] == r[:-1]) & ((v[1:] > v[:-1]) | ((v[1:] == v[:-1]) & (t[1:] > t[:-1])))
    bits = v.astype(np.float32).view(np.int32).astype(np.int64)
    key = np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))               # monotone in the float's value
    c = np.cumsum(up)
    shift = r.astype(np.int64) << 34                                     # rows apart: the running max restarts
    key = c + np.maximum.accumulate(key - c + shift) - shift             # >= key, +1 at least at every rise
    out = np.empty(len(r), dtype=np.float32)
    out[order] = np.where(key >= 0, key, -key + (1 << 31)).astype(np.uint32).view(np.float32)
    return out

def evidence_scores(e, logback, tie):
    """(B, V) float64 evidence >= 0 -> (B, V) float32 torch: log e where e > 0 (ties broken by
    `tie`, popularity), logback (V,) = log(1e-6 p_pop) elsewhere, far below (e >= 1e-3)."""
    out = np.tile(logback.astype(np.float32), (len(e), 1))
    r, c = np.nonzero(e)
    out[r, c] = ordered32(r, np.log(e[r, c]), tie[c])
    return torch.from_numpy(out)

def log_backoff(data):
    with np.errstate(divide="ignore"):
        return np.log(BACKOFF * pop(data))                               # -inf on specials

# -----------------------------------------------------------------------------
# SR: sequential rules

def sr_rules(data, steps=STEPS):
    """CSR table over a: (indptr (V+1,), cols, vals), vals of a -> b = sum over training sessions of
    1/gap for each b that follows an a by gap = 1..steps events of the same session. Built with one
    vectorized pass per gap (a session's events are contiguous in session_index)."""
    ix = session_index(data)
    V = data.vocab_size
    page, sess = ix.page, ix.sess
    dense = np.zeros(V * V) if V * V <= 1 << 22 else None                # small vocabularies: a dense table
    codes, weights = [], []
    for gap in range(1, steps + 1):
        same = (sess[:-gap] == sess[gap:]) & (sess[gap:] >= 0)           # a, then b `gap` events later, one session
        pair = page[:-gap][same] * V + page[gap:][same]
        if dense is not None:
            dense += np.bincount(pair, minlength=V * V) / gap
        else:
            u, c = np.unique(pair, return_counts=True)
            codes.append(u), weights.append(c / gap)
    if dense is not None:
        code = np.flatnonzero(dense)
        vals = dense[code]
    else:
        code, inv = np.unique(np.concatenate(codes), return_inverse=True)
        vals = np.bincount(inv.reshape(-1), weights=np.concatenate(weights), minlength=len(code))
    return np.searchsorted(code // V, np.arange(V + 1)), code % V, vals

def csr_rows(indptr, cols, vals, rows, base):
    """(len(rows), V) float64: base plus the CSR rows `rows` (-1: base alone)."""
    r = np.maximum(rows, 0)
    lens = np.where(rows >= 0, indptr[r + 1] - indptr[r], 0)
    at = span(indptr[r], lens)
    dense = np.tile(base, (len(rows), 1))
    dense[np.repeat(np.arange(len(rows)), lens), cols[at]] += vals[at]  # (row, col) pairs are distinct
    return dense

def sr_scorer(data, steps=STEPS):
    """Sequential rules on the context's last page (of the previous session when it ends with <bos>)."""
    indptr, cols, vals = cached(data, ("sr", steps), lambda: sr_rules(data, steps))
    logback, tie, tokens = log_backoff(data), pop(data), data.tokens
    zero = np.zeros(data.vocab_size)

    def score(users, ctx_start, ctx_end):
        le = last_event(tokens, ctx_start, ctx_end)
        a = np.where(le >= ctx_start, np.asarray(tokens[np.maximum(le, 0)], dtype=np.int64), -1)
        uniq, inv = np.unique(a, return_inverse=True)                    # dense only for distinct pages
        e = csr_rows(indptr, cols, vals, uniq, zero)
        return evidence_scores(e, logback, tie)[torch.from_numpy(inv.reshape(-1))]
    return score

# -----------------------------------------------------------------------------
# SKNN / V-SKNN: session-based k nearest neighbours

def knn_index(data):
    """The neighbour pool, every user's training sessions: a session's distinct pages (CSR sess_ptr,
    sess_pages; slen = their number) and, per page, the sessions holding it, most recent first
    (CSR inv_ptr over key = page * S + (S - 1 - session), sorted)."""
    ix = session_index(data)
    V, S = data.vocab_size, ix.n_sess
    m = (ix.page >= N_SPECIAL) & (ix.sess >= 0)                          # <unk> is no page to share
    sp = np.unique(ix.sess[m] * V + ix.page[m])                          # distinct (session, page)
    s_of, p_of = sp // V, sp % V
    sess_ptr = np.searchsorted(s_of, np.arange(S + 1))
    key = np.sort(p_of * S + (S - 1 - s_of))
    return SimpleNamespace(V=V, S=S, bos=ix.bos, user_sess=ix.user_sess, sess_ptr=sess_ptr, sess_pages=p_of,
                           slen=np.diff(sess_ptr), key=key, inv_ptr=np.searchsorted(key // S, np.arange(V + 1)),
                           inv_sess=S - 1 - key % S)

def session_queries(tokens, bos, ctx_start, ctx_end, V, qlen=QUERY_LEN):
    """Each row's query: the distinct pages among the last qlen events of the context's current
    session (the previous one when the context ends with <bos>) -> (row, page, age) sorted by
    (row, page), age = events since the page's most recent visit (0 = the last event)."""
    le = last_event(tokens, ctx_start, ctx_end)
    first = bos[np.maximum(np.searchsorted(bos, le, side="right") - 1, 0)] + 1   # the session's first event
    n = np.where(le >= ctx_start, le - np.maximum(np.maximum(first, le - qlen + 1), ctx_start) + 1, 0)
    row = np.repeat(np.arange(len(le)), n)
    age = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)            # 0, 1, ... back from le
    page = np.asarray(tokens[le[row] - age], dtype=np.int64)
    keep = page >= N_SPECIAL
    code, first_at = np.unique(row[keep] * V + page[keep], return_index=True)   # first = most recent visit
    return code // V, code % V, age[keep][first_at]

def knn_chunk(kx, qrow, qpage, qw, nq, own, B, ks, sample_size, cosine):
    """Scores of B queries given as entries (row, page, weight), nq (B,) distinct query pages, own
    (B, 2) a session range [own0, own1) each row may not use -> ([(B, V) float64 per k in ks],
    oldest sampled session per row (S if none))."""
    S, V = kx.S, kx.V
    kp = qpage * S
    n_own = (np.searchsorted(kx.key, kp + S - 1 - own[qrow, 0], side="right")   # own sessions in each list
             - np.searchsorted(kx.key, kp + S - own[qrow, 1], side="left"))
    start = kx.inv_ptr[qpage]
    take = np.minimum(kx.inv_ptr[qpage + 1] - start, sample_size + n_own)  # the head of each page's list holds
    erow = np.repeat(qrow, take)                                           # the sample_size most recent of the union
    sess = kx.inv_sess[span(start, take)]
    keep = (sess < own[erow, 0]) | (sess >= own[erow, 1])
    code = erow[keep] * S + (S - 1 - sess[keep])
    order = np.argsort(code, kind="stable")                              # by row, recent first (merges sorted runs)
    code = code[order]
    new = np.r_[True, code[1:] != code[:-1]] if len(code) else np.zeros(0, bool)
    num = np.bincount(np.cumsum(new) - 1, weights=np.repeat(qw, take)[keep][order])   # shared query weight
    code = code[new]
    r, s = code // S, S - 1 - code % S
    m = group_rank(r) < sample_size                                      # the sample: most recent sample_size
    r, s, num = r[m], s[m], num[m]
    oldest = np.full(B, S)
    last = np.r_[r[1:] != r[:-1], True] if len(r) else np.zeros(0, bool)
    oldest[r[last]] = s[last]
    sim = num / np.sqrt(nq[r] * kx.slen[s]) if cosine else num / nq[r]
    order = np.lexsort((-sim, r))                                        # stable: equal sims, recent first
    r, s, sim = r[order], s[order], sim[order]
    rank = group_rank(r)
    out = []
    for k in ks:                                                         # score(b) = sum of sims holding b
        m = rank < k
        L = kx.slen[s[m]]
        cell = np.repeat(r[m], L) * V + kx.sess_pages[span(kx.sess_ptr[s[m]], L)]
        out.append(np.bincount(cell, weights=np.repeat(sim[m], L), minlength=B * V).reshape(B, V))
    return out, oldest

def knn_rows(kx, entries, rows, own, ks, sample_size, cosine):
    """knn_chunk over the queries of `rows` (indices into the batch), in chunks of ~CHUNK candidate
    entries -> [(len(rows), V) per k], oldest (len(rows),)."""
    qrow, qpage, qw, nq = entries
    B = len(nq)
    local = np.full(B, -1)
    local[rows] = np.arange(len(rows))
    sel = local[qrow] >= 0
    er = local[qrow[sel]]
    o = np.argsort(er, kind="stable")                                    # entries of these rows, by local row
    er, ep, ew = er[o], qpage[sel][o], qw[sel][o]
    cost = np.bincount(er, weights=np.minimum(np.diff(kx.inv_ptr)[ep], sample_size) + 1.0, minlength=len(rows))
    bounds = np.searchsorted(np.cumsum(cost), np.arange(CHUNK, cost.sum() + CHUNK, CHUNK), side="right")
    bounds = np.unique(np.r_[0, np.minimum(bounds, len(rows)), len(rows)])
    outs, oldest = [[] for _ in ks], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo, hi = np.searchsorted(er, [a, b])                             # entries are sorted by row
        o, old = knn_chunk(kx, er[lo:hi] - a, ep[lo:hi], ew[lo:hi], nq[rows[a:b]], own[a:b], b - a,
                           ks, sample_size, cosine)
        for acc, x in zip(outs, o):
            acc.append(x)
        oldest.append(old)
    if not len(rows):
        return [np.zeros((0, kx.V)) for _ in ks], np.zeros(0, np.int64)
    return [np.concatenate(x) for x in outs], np.concatenate(oldest)

def knn_scores(kx, tokens, users, ctx_start, ctx_end, ks, weighted, sample_size=SAMPLE_SIZE, qlen=QUERY_LEN,
               reminds=(True,)):
    """[(B, V) float64 kNN evidence per (k, remind) for k in ks, remind in reminds] for a batch;
    remind=False takes the evidence of the query's own pages away (they fall to the back-off).
    Identical queries are searched once (MSNBC-like logs: 17 pages, 470k queries, ~6k distinct page
    sets): first without excluding anybody's sessions; a row keeps that result unless its own
    sessions may be in the sample (its last one is not older than the oldest sampled), else it is
    searched on its own, with its sessions excluded."""
    users = np.asarray(users, dtype=np.int64)
    B, V = len(users), kx.V
    if B == 0:
        return [np.zeros((0, V)) for _ in ks for _ in reminds]
    qrow, qpage, qage = session_queries(tokens, kx.bos, ctx_start, ctx_end, V, qlen)
    qw = 1.0 - qage / qlen if weighted else np.ones(len(qrow))           # linear: 1, 0.9, ..., 0.1
    nq = np.bincount(qrow, minlength=B).astype(np.float64)
    entries = (qrow, qpage, qw, np.maximum(nq, 1.0))
    own = np.stack([kx.user_sess[users], kx.user_sess[users + 1]], axis=1)
    keys = np.full((B, qlen), -1, dtype=np.int64)                        # a row's query, canonical
    keys[qrow, group_rank(qrow)] = qpage * (qlen + 1) + (qage if weighted else 0)
    _, rep, inv, cnt = np.unique(keys, axis=0, return_index=True, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    out = [np.empty((B, V)) for _ in ks]
    shared = np.flatnonzero(cnt > 1)                                     # queries asked more than once
    alone = cnt[inv] == 1
    if len(shared):
        res, oldest = knn_rows(kx, entries, rep[shared], np.zeros((len(shared), 2), np.int64), ks, sample_size,
                               not weighted)
        j = np.full(len(cnt), -1)
        j[shared] = np.arange(len(shared))
        ok = ~alone & (own[:, 1] - 1 < oldest[j[inv]])                   # own sessions all older than the sample
        for o, x in zip(out, res):
            o[ok] = x[j[inv[ok]]]
        alone |= ~ok
    rows = np.flatnonzero(alone)
    res, _ = knn_rows(kx, entries, rows, own[rows], ks, sample_size, not weighted)
    for o, x in zip(out, res):
        o[rows] = x
    result = []
    for o in out:
        for remind in reminds:
            x = o if remind else o.copy()
            if not remind:
                x[qrow, qpage] = 0.0                                     # the query's pages: no evidence
            result.append(x)
    return result

def knn_scorer(data, k=100, weighted=False, remind=True, sample_size=SAMPLE_SIZE, qlen=QUERY_LEN):
    """SKNN (weighted=False: cosine of binary page sets) or V-SKNN (weighted=True: linearly decaying
    query weights). remind=False: the query's own pages get no kNN evidence (a log whose sessions
    never revisit a page). Pages without evidence back off to popularity, far below."""
    kx = cached(data, "knn", lambda: knn_index(data))
    logback, tie, tokens = log_backoff(data), pop(data), data.tokens

    def score(users, ctx_start, ctx_end):
        x = knn_scores(kx, tokens, users, ctx_start, ctx_end, (k,), weighted, sample_size, qlen, (remind,))[0]
        return evidence_scores(x, logback, tie)
    return score

def sknn_scorer(data, k=100, remind=True, sample_size=SAMPLE_SIZE, qlen=QUERY_LEN):
    return knn_scorer(data, k, False, remind, sample_size, qlen)

def vsknn_scorer(data, k=100, remind=True, sample_size=SAMPLE_SIZE, qlen=QUERY_LEN):
    return knn_scorer(data, k, True, remind, sample_size, qlen)

# -----------------------------------------------------------------------------
# recency: the user's own pages, recent ones first

def recency_scores(tokens, ctx_start, ctx_end, V, decays, p_pop):
    """[(B, V) float32 torch scores per decay]: log sum over visits of decay^age for the context's
    pages (ties broken by popularity), (row's lowest such score - 1) + log(p_pop / max p_pop) for
    the others (-inf on specials)."""
    B = len(ctx_start)
    n = np.asarray(ctx_end - ctx_start, dtype=np.int64)
    row = np.repeat(np.arange(B), n)
    tok = np.asarray(tokens[span(np.asarray(ctx_start, dtype=np.int64), n)], dtype=np.int64)
    seen = np.cumsum(is_event(tok))                                      # events so far, running over rows
    age = seen[np.cumsum(n) - 1][row] - seen if len(tok) else seen       # events after this one in its context
    keep = tok >= N_SPECIAL
    code, age = row[keep] * V + tok[keep], age[keep]
    order = np.lexsort((age, code))                                      # by (row, page), youngest visit first
    code, age = code[order], age[order]
    new = np.r_[True, code[1:] != code[:-1]] if len(code) else np.zeros(0, bool)
    group = np.cumsum(new) - 1
    youngest, r, p = age[new], code[new] // V, code[new] % V
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]]) if len(r) else np.zeros(0, np.int64)
    with np.errstate(divide="ignore"):
        below = np.log(p_pop / p_pop[N_SPECIAL:].max())                  # <= 0 on pages
    out = []
    for decay in decays:
        total = np.bincount(group, weights=decay ** (age - youngest[group]).astype(np.float64), minlength=len(r))
        logr = youngest * np.log(decay) + np.log(total)                  # exact however old (no underflow)
        floor = np.ones(B)
        if len(r):
            floor[r[starts]] = np.minimum.reduceat(logr, starts)
        dense = ((floor - 1.0)[:, None] + below[None, :]).astype(np.float32)
        dense[r, p] = ordered32(r, logr, p_pop[p])
        out.append(torch.from_numpy(dense))
    return out

def recency_scorer(data, decay=0.8):
    """Recency (repeat) baseline on the whole context; unvisited pages below, by popularity."""
    p_pop, V, tokens = pop(data), data.vocab_size, data.tokens
    return lambda users, ctx_start, ctx_end: recency_scores(tokens, ctx_start, ctx_end, V, (decay,), p_pop)[0]

# -----------------------------------------------------------------------------
# choices on validation

def ndcg10(scores, targets):
    """Per-row NDCG@10 as evaluate.rank_metrics + summarize count it: rank = pages (ids >= 4) scored
    strictly higher than the target (ties in its favour); special / <unk> / non-finite targets miss."""
    scores = torch.as_tensor(scores).float()
    t = torch.as_tensor(targets, dtype=torch.int64)
    known = t >= N_SPECIAL
    ts = scores.gather(1, t.clamp(min=N_SPECIAL).unsqueeze(1))           # (B, 1)
    rank = (scores[:, N_SPECIAL:] > ts).sum(1).double()
    known &= torch.isfinite(ts.squeeze(1))
    return torch.where(known & (rank < 10), 1.0 / torch.log2(rank + 2.0), 0.0).numpy()

def evidence_ndcg(e, targets, tie):
    """ndcg10 of evidence_scores(e, ., tie), counted on the float64 evidence itself (no (B, V) float32
    scores): rank = pages whose (evidence, popularity) is above the target's."""
    t = np.asarray(targets, dtype=np.int64)
    known = t >= N_SPECIAL
    tc = np.where(known, t, N_SPECIAL)
    et, pt = e[np.arange(len(e)), tc][:, None], tie[tc][:, None]
    pages = e[:, N_SPECIAL:]
    rank = np.count_nonzero((pages > et) | ((pages == et) & (tie[None, N_SPECIAL:] > pt)), axis=1)
    return np.where(known & (rank < 10), 1.0 / np.log2(rank + 2.0), 0.0)

def grid_ndcg(data, grid, ndcg_fn, max_users=CHOOSE_USERS, seed=0):
    """{value: mean validation NDCG@10}, ndcg_fn(users, ctx_start, ctx_end, targets) -> [per-row
    NDCG@10 per grid value], over a fixed subset of validation users in batches of ~4M scores."""
    users, ctx_start, ctx_end, targets = eval_examples(data, "val", max_users, seed)
    rows = max(64, (1 << 22) // (data.vocab_size * len(grid)))
    total = np.zeros(len(grid))
    for i in range(0, len(users), rows):
        s = slice(i, i + rows)
        for j, nd in enumerate(ndcg_fn(users[s], ctx_start[s], ctx_end[s], targets[s])):
            total[j] += nd.sum()
    return {g: float(t / max(1, len(users))) for g, t in zip(grid, total)}

def best(table):
    """The value with the highest score; the first in grid order on a tie."""
    return max(table, key=lambda g: (table[g], -list(table).index(g)))

def choose_knn(data, weighted=False, grid=K_GRID, reminds=(True, False), max_users=CHOOSE_USERS, seed=0,
               sample_size=SAMPLE_SIZE, qlen=QUERY_LEN):
    """k and remind of SKNN (weighted=False) or V-SKNN (True) by validation NDCG@10 ->
    ((best_k, best_remind), {(k, remind): ndcg@10}). One neighbour search per batch serves them all."""
    kx, tie = cached(data, "knn", lambda: knn_index(data)), pop(data)
    fn = lambda u, a, b, t: [evidence_ndcg(x, t, tie) for x in knn_scores(kx, data.tokens, u, a, b, grid, weighted,
                                                                         sample_size, qlen, reminds)]
    table = grid_ndcg(data, tuple((k, r) for k in grid for r in reminds), fn, max_users, seed)
    return best(table), table

def choose_k(data, weighted=False, grid=K_GRID, max_users=CHOOSE_USERS, seed=0, sample_size=SAMPLE_SIZE,
             qlen=QUERY_LEN, remind=True):
    """k of SKNN (weighted=False) or V-SKNN (True) by validation NDCG@10 -> (best_k, {k: ndcg@10})."""
    (k, _), table = choose_knn(data, weighted, grid, (remind,), max_users, seed, sample_size, qlen)
    return k, {k: v for (k, _), v in table.items()}

def choose_decay(data, grid=DECAY_GRID, max_users=CHOOSE_USERS, seed=0):
    """decay of recency by validation NDCG@10 -> (best_decay, {decay: ndcg@10})."""
    p_pop, V = pop(data), data.vocab_size
    fn = lambda u, a, b, t: [ndcg10(x, t) for x in recency_scores(data.tokens, a, b, V, grid, p_pop)]
    table = grid_ndcg(data, tuple(grid), fn, max_users, seed)
    return best(table), table

def validation_choices(data, max_users=CHOOSE_USERS, seed=0):
    """{"sknn": ((k, remind), {(k, remind): ndcg@10}), "v-sknn": ..., "recency": (decay, {decay: ndcg@10})},
    made on the validation split once per data object (cached)."""
    def make():
        return {"sknn": choose_knn(data, False, max_users=max_users, seed=seed),
                "v-sknn": choose_knn(data, True, max_users=max_users, seed=seed),
                "recency": choose_decay(data, max_users=max_users, seed=seed)}
    return cached(data, ("choices", max_users, seed), make)

def strong_baselines(data, max_users=CHOOSE_USERS, seed=0):
    """{name: scorer} for most-popular, markov, sr, sknn, v-sknn, recency. The same scorers serve
    validation and test: k, remind and decay come from validation_choices (validation only)."""
    c = validation_choices(data, max_users, seed)
    (k, remind), (vk, vremind) = c["sknn"][0], c["v-sknn"][0]
    return {"most-popular": popularity_scorer(data), "markov": markov_scorer(data), "sr": sr_scorer(data),
            "sknn": sknn_scorer(data, k, remind), "v-sknn": vsknn_scorer(data, vk, vremind),
            "recency": recency_scorer(data, c["recency"][0])}
