"""
HeTLM's own task: a user's earlier sessions are the prompt, the model generates the next session,
and the generation is scored against the real one, per user (Sundaresan et al., EMNLP 2025, Fig. 1).

    python data.py LOG --out_dir=D --time_col=time --split=session   # last session = test, one before = val
    python train.py --data_dir=D --out_dir=out_s                     # trains as usual
    python evaluate.py --ckpt=out_s/stage1/best.pt --split=test      # + these metrics on a session split
    python evaluate.py --ckpt=... --outcome=purchase                 # + P(the session holds `purchase`)

Next-page ranking scores one page per user; this task scores a whole session per user, so the
spread over users rests on many targets. Per user (the held-out session of the split):
  - nll/page, nll/session: NLL of the session's pages and its <eos> under teacher forcing (so a
    wrong length costs), softmax over pages and <eos>; <unk> targets (pages unseen in training)
    are skipped, and their rate is reported;
  - a generated session, from the context up to the session's <bos>, until <eos> or max_len pages,
    greedy and one seeded sample: precision / recall / F1 of its set of pages against the real
    session's set; ROUGE-L F1, the F-measure of their longest common subsequence: order-aware, yet
    an inserted or skipped page costs one page, not the rest of the session (as a position-by-
    position match would), the usual score of a generated sequence against one reference;
    length error (generated pages - real pages);
  - outcome (outcome=PAGE): P(the session holds PAGE), the share of outcome_samples sampled
    sessions that hold it, scored by AUC and by F1 at P >= 0.5 against what happened (per user
    one label, so these two are not spreads over users).
Every per-user figure is reported as mean, std and 10th percentile over users, overall and per
cluster. The baselines generate the same way: first-order Markov over pages and <eos> with back-off
to popularity, and most-popular: a unigram over pages and <eos> (its greedy session is the n most
popular pages, n = the median training session, since greedy unigram decoding repeats one page).
"""
import math

import numpy as np
import torch

from configurator import Progress
from data import DataError, pick_users
from baselines import bigram_logp, popularity
from tokenizer import BOS, EOS, PAD, UNK

MAX_LEN = 100            # generated pages per session at most (also capped by the training sessions' p99)
ROW_TOKENS = 1 << 14     # context tokens per model pass (as evaluate.EVAL_TOKENS)
ROW_LOGITS = 1 << 24     # scores per pass at most (64 MB in fp32)
STATS = ("mean", "std", "p10")

# -----------------------------------------------------------------------------
# the held-out sessions of a session split

def held_out(data, split):
    """(users, start, end) of every user with a held-out `split` session: its pages are
    tokens[start:end-1], its <eos> is tokens[end-1], its context tokens[offsets[u]:start] ends
    with its <bos>."""
    if data.split != "session":
        raise DataError(f"{data.data_dir}: prepared with --split={data.split}; the session task needs "
                        f"`python data.py LOG --split=session`")
    pos = {"val": data.val_pos, "test": data.test_pos}[split]
    users = np.flatnonzero(np.asarray(pos) >= 0).astype(np.int64)
    start = np.asarray(pos, dtype=np.int64)[users]
    end = (np.asarray(data.test_pos, dtype=np.int64)[users] - 1 if split == "val"
           else np.asarray(data.offsets, dtype=np.int64)[users + 1])
    return users, start, end


def train_session_lengths(data):
    """Pages per session of every session inside a user's training data."""
    tok = np.asarray(data.tokens)
    bos, eos = np.flatnonzero(tok == BOS), np.flatnonzero(tok == EOS)
    owner = np.searchsorted(np.asarray(data.offsets), bos, side="right") - 1
    keep = eos < np.asarray(data.train_end)[owner]
    return eos[keep] - bos[keep] - 1


def default_max_len(data):
    """Generation stops here at the latest: the 99th percentile of training sessions, in [10, MAX_LEN]."""
    lengths = train_session_lengths(data)
    return int(min(MAX_LEN, max(10, np.percentile(lengths, 99) if len(lengths) else 10)))

# -----------------------------------------------------------------------------
# the scores of one generated session against the real one (pure functions, tested by hand)

def lcs_length(a, b):
    """Length of the longest common subsequence of two sequences (dynamic programming, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b):
            up = row[j + 1]
            row[j + 1] = diag + 1 if x == y else max(up, row[j])
            diag = up
    return row[-1]


def f_measure(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def session_scores(gen, real):
    """Scores of a generated page list against the real one (non-empty). An empty generation
    (the model ends the session at once) has precision 0. Real <unk> pages can never be matched."""
    g, r = set(gen), set(real)
    hit = len(g & r)
    p, rec = (hit / len(g) if g else 0.0), hit / len(r)
    lcs = lcs_length(gen, real)
    lp, lr = (lcs / len(gen) if gen else 0.0), lcs / len(real)
    return {"precision": p, "recall": rec, "f1": f_measure(p, rec), "rouge_l": f_measure(lp, lr),
            "len_err": len(gen) - len(real)}


def auc(p, y):
    """Area under the ROC curve of scores p for binary labels y: the chance that a random positive
    scores above a random negative, ties counting one half (Mann-Whitney U with mid-ranks)."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]               # ties share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spread(x):
    """{mean, std, p10} of per-user values (NaNs left out)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return dict.fromkeys(STATS, math.nan)
    return {"mean": float(x.mean()), "std": float(x.std()), "p10": float(np.percentile(x, 10))}

# -----------------------------------------------------------------------------
# three next-token models behind one interface: logp(contexts) -> (B, V) log-probs over pages and
# <eos> (-inf on <pad> <unk> <bos>), contexts = lists of token ids ending where the next token goes

def forbidden_mask(V, device="cpu"):
    """(V,) True at the tokens a session never holds (<pad> <unk> <bos>): their logits are -inf."""
    m = torch.zeros(V, dtype=torch.bool, device=device)
    m[[PAD, UNK, BOS]] = True
    return m


def model_logp(model, device, clusters=None):
    """The GPT: each context keeps its last block_size tokens, right-padded (as evaluate.model_scores).
    clusters: each user's parameter set (n_users,), or None."""
    block = model.config.block_size
    masked = forbidden_mask(model.config.vocab_size, device)

    @torch.inference_mode()
    def logp(contexts, rows=None, n_last=1):
        ctx = [c[-block:] for c in contexts]
        lengths = np.array([len(c) for c in ctx])
        x = np.full((len(ctx), int(lengths.max())), PAD, dtype=np.int64)
        for i, c in enumerate(ctx):
            x[i, :len(c)] = c
        idx = torch.from_numpy(x).to(device)
        cid = None if clusters is None else np.asarray(clusters)[rows]
        at = torch.as_tensor(np.maximum(lengths[:, None] - n_last + np.arange(n_last), 0), device=device)
        z = model.next_logits(idx, at, cid)                                # (B, n_last, V) the last positions
        return torch.log_softmax(z.masked_fill(masked, -math.inf), dim=-1)  # (B, n_last, V)
    logp.rows_per_pass = lambda T, n_last=1: max(1, min(ROW_TOKENS // max(T, 1),
                                                        ROW_LOGITS // (n_last * model.config.vocab_size)))
    logp.block = block
    logp.decoder = lambda contexts, rows: CachedLogp(model, [c[-block:] for c in contexts], device, masked,
                                                     None if clusters is None else np.asarray(clusters)[rows])
    return logp


class KVCache:
    """Generation with a key/value cache (sessions.generate, sample.py): the contexts run once, then
    each step adds one position per row instead of running the whole window again.
    idx (B, T) contexts right-padded with PAD, lengths (B,) their real tokens (T <= block_size);
    cluster_ids (B,) each row's parameter set: one set for the whole batch, or any mix with
    cluster_scope 'norms' (sessions.CachedLogp splits other mixes). Row b's generated tokens take positions
    lengths[b], lengths[b] + 1, ...; each row attends only its own real keys. A row whose window
    is full (its next position would pass block_size) is scored by next_logits on its last
    block_size tokens, as without a cache: the scores are next_logits' either way (to rounding)."""

    def __init__(self, model, idx, lengths, cluster_ids=None):
        self.model, self.block = model, model.config.block_size
        dev = idx.device
        self.len = torch.as_tensor(lengths, dtype=torch.long, device=dev)
        # the tokens, at least block_size columns wide (PAD after each row's), and the repeat term's
        # statistics over that window (model.GPT.repeat_stats), kept up to date by advance
        self.ids = torch.cat([idx, idx.new_full((len(idx), max(0, self.block - idx.size(1))), PAD)], dim=1)
        self.stats = None
        if model.repeat_w is not None:
            with torch.no_grad():
                self.stats = list(model.repeat_stats(self.ids[:, :self.block]))
                self.decay = None if model.repeat_d is None else model.decay_table(self.block)
        self.cid = None if cluster_ids is None else torch.as_tensor(cluster_ids, dtype=torch.long, device=dev)
        mixed = self.cid is not None and len(torch.unique(self.cid)) > 1
        if mixed and model.config.cluster_scope != 'norms':
            raise ValueError("KVCache: one parameter set per cache unless cluster_scope is 'norms' (CachedLogp splits)")
        self.k = self.cid if mixed else (0 if self.cid is None else int(self.cid[0]))
        self.valid = torch.arange(idx.size(1), device=dev)[None, :] < self.len[:, None]   # (B, S) keys seen
        self.caches = [{} for _ in model.transformer.h]
        was = model.training
        if was:                # switching walks every module: only when needed (as next_logits)
            model.eval()
        with torch.no_grad():
            h = model._trunk(idx, self.k, caches=self.caches)                        # (B, T, C)
        if was:
            model.train()
        self.h_last = h[torch.arange(len(idx), device=dev), self.len - 1]          # (B, C)

    @torch.no_grad()
    def logits(self):
        """(B, V) float scores of each row's next token, the sparse terms included."""
        model, dev = self.model, self.ids.device
        z = torch.empty(len(self.ids), model.config.vocab_size, device=dev)
        live = (self.len <= self.block).nonzero().flatten()                        # all their tokens cached
        if len(live):
            cid = None if self.cid is None else self.cid[live]
            zl = model.head(self.h_last[live, None], cid).float()                  # (n, 1, V)
            stats = None if self.stats is None else [None if x is None else x[live] for x in self.stats]
            rep = model.sparse_terms(self.ids[live, :self.block], (self.len[live] - 1)[:, None], stats=stats)
            if rep is not None:
                zl.scatter_add_(-1, rep[0], rep[1].float())
            z[live] = zl[:, 0]
        over = (self.len > self.block).nonzero().flatten()                         # full windows: uncached
        if len(over):
            cols = self.len[over, None] - self.block + torch.arange(self.block, device=z.device)[None, :]
            win = self.ids[over[:, None], cols]                                    # (n, block) the last tokens
            at = torch.full((len(over), 1), self.block - 1, dtype=torch.long, device=z.device)
            z[over] = model.next_logits(win, at, None if self.cid is None else self.cid[over], last=True)[:, 0]
        return z

    @torch.no_grad()
    def advance(self, keep, tokens):
        """Rows `keep` (indices of the current rows, in order) go on with their next tokens."""
        keep = torch.as_tensor(keep, dtype=torch.long, device=self.ids.device)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.ids.device)
        self.ids, self.len, self.valid = self.ids[keep], self.len[keep], self.valid[keep]
        if self.stats is not None:
            self.stats = [None if x is None else x[keep] for x in self.stats]
        if self.cid is not None:
            self.cid = self.cid[keep]
            self.k = self.cid if torch.is_tensor(self.k) else self.k
        for c in self.caches:
            c['k'], c['v'] = c['k'][keep], c['v'][keep]
        B = len(keep)
        if int(self.len.max()) >= self.ids.size(1):                                # room for one more token
            self.ids = torch.cat([self.ids, self.ids.new_full((B, 16), PAD)], dim=1)
        rows = torch.arange(B, device=self.ids.device)
        self.ids[rows, self.len] = tokens
        if self.stats is not None:
            self._count(tokens)
        pos = self.len.clamp(max=self.block - 1)     # full windows' positions are not used (logits)
        self.len = self.len + 1
        self.valid = torch.cat([self.valid, self.valid.new_ones(B, 1)], dim=1)
        for c in self.caches:
            c['mask'] = self.valid[:, None, None, :]
        was = self.model.training
        if was:
            self.model.eval()
        self.h_last = self.model._trunk(tokens[:, None], self.k, pos=pos[:, None], caches=self.caches)[:, 0]
        if was:
            self.model.train()

    def _count(self, tokens):
        """The repeat term's statistics after each row's new token (at position len): what
        repeat_stats would compute over the window, for the rows whose window is not full (the
        others are scored without them). The stats are advance's fresh copies: updated in place."""
        t = self.len.clamp(max=self.block - 1)                                     # (B,) the new positions
        rows = torch.arange(len(t), device=t.device)
        eq = self.ids[:, :self.block] == tokens[:, None]                           # (B, block) the page's visits
        before = eq & (torch.arange(self.block, device=t.device)[None, :] < t[:, None])
        nxt, visits, R = self.stats
        nxt = torch.where(before & (nxt == self.block), t[:, None], nxt)           # earlier visits' next one
        nxt[rows, t] = self.block
        visits[rows, t] = before.sum(1) + 1
        if R is not None:
            R[rows, t] = (eq.float() * self.decay[t]).sum(1)
        self.stats = [nxt, visits, R]


class CachedLogp:
    """model_logp's next-token log-probabilities for generation, from key/value caches
    (KVCache, above): one per parameter set among the rows (one for all rows where the sets share
    every weight but the norms). Call it for (B, V); advance(keep, tokens) adds a token per row kept."""

    def __init__(self, model, contexts, device, masked, cids=None):
        self.masked, self.V, self.B, self.device = masked, model.config.vocab_size, len(contexts), device
        if cids is None or model.config.n_clusters == 1 or model.config.cluster_scope == 'norms':
            parts = [np.arange(self.B)]
        else:
            parts = [np.flatnonzero(cids == k) for k in np.unique(cids)]
        self.parts = []
        for p in parts:
            lengths = [len(contexts[i]) for i in p]
            x = np.full((len(p), max(lengths)), PAD, dtype=np.int64)
            for j, i in enumerate(p):
                x[j, :lengths[j]] = contexts[i]
            cache = KVCache(model, torch.from_numpy(x).to(device), lengths, None if cids is None else cids[p])
            self.parts.append((p, cache))

    @torch.inference_mode()
    def __call__(self):
        z = torch.empty(self.B, self.V, device=self.device)
        for p, cache in self.parts:
            z[torch.from_numpy(p).to(self.device)] = cache.logits()
        return torch.log_softmax(z.masked_fill(self.masked, -math.inf), dim=-1)

    @torch.inference_mode()
    def advance(self, keep, tokens):
        keep, tokens = np.asarray(keep, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
        new = np.full(self.B, -1)
        new[keep] = np.arange(len(keep))              # each kept row's index among the rows that go on
        parts = []
        for p, cache in self.parts:
            on = new[p] >= 0
            if on.any():
                cache.advance(np.flatnonzero(on), tokens[new[p][on]])
                parts.append((new[p][on], cache))
        self.parts, self.B = parts, len(keep)


def markov_logp(data, beta=1.0):
    """First-order Markov over pages and <eos> (baselines.bigram_logp), on each context's last token."""
    bigram = bigram_logp(data, beta, eos=True)
    logp = lambda contexts, rows=None, n_last=1: bigram(np.array([c[-1] for c in contexts], dtype=np.int64)).unsqueeze(1)
    logp.rows_per_pass = lambda T, n_last=1: max(1, ROW_LOGITS // data.vocab_size)
    logp.block = 1                                                      # (B, 1, V): a bigram's context is one token
    return logp


def popular_logp(data):
    lp = torch.from_numpy(popularity(data, eos=True)).float().log()[None]  # (1, V): a unigram over pages and <eos>
    fn = lambda contexts, rows=None, n_last=1: lp.expand(len(contexts), -1).unsqueeze(1)  # (B, 1, V)
    fn.rows_per_pass = lambda T, n_last=1: max(1, ROW_LOGITS // data.vocab_size)
    fn.block = 1
    return fn

# -----------------------------------------------------------------------------
# teacher-forced NLL and batched generation, for any of the three

def session_nll(logp, data, users, start, end):
    """Per user: (summed NLL of the session's known targets, their count, <unk> targets). Targets
    are scored in windows of up to block_size tokens, each window scoring its last block/2 targets,
    so every target sees at least block/2 tokens before it (or the user's whole history)."""
    block = logp.block
    c = max(1, block // 2)                                                 # targets per window
    offsets = np.asarray(data.offsets, dtype=np.int64)
    n_w = -(-(end - start) // c)                                           # (B,) windows per session
    owner = np.repeat(np.arange(len(users)), n_w)
    a = np.repeat(start, n_w) + c * (np.arange(int(n_w.sum())) - np.repeat(np.cumsum(n_w) - n_w, n_w))
    b = np.minimum(a + c, np.repeat(end, n_w))                             # window scores tokens[a:b]
    lo = np.maximum(offsets[users][owner], b - 1 - block)                  # from context tokens[lo:b-1]
    nll_w, unk_w, known_w = np.zeros(len(a)), np.zeros(len(a)), np.zeros(len(a))
    order = np.argsort(b - lo, kind="stable")
    rows = logp.rows_per_pass(block, c)
    tokens = data.tokens
    for s in range(0, len(order), rows):
        r = order[s:s + rows]
        n_last = int((b[r] - a[r]).max())
        lp = logp([np.asarray(tokens[x:y - 1], dtype=np.int64) for x, y in zip(lo[r], b[r])], users[owner[r]], n_last)
        at = np.minimum(b[r, None] - n_last + np.arange(n_last), b[r, None] - 1)   # (R, n_last) target positions
        tgt = torch.from_numpy(np.asarray(tokens[at], dtype=np.int64))
        use = torch.from_numpy(at >= a[r, None]) & (tgt != UNK)            # the window's own known targets
        nll = -lp.gather(2, tgt.unsqueeze(2)).squeeze(2).double()
        nll_w[r] = torch.where(use, nll, 0.0).sum(1).numpy()
        known_w[r] = use.sum(1).numpy()
        unk_w[r] = (torch.from_numpy(at >= a[r, None]) & (tgt == UNK)).sum(1).numpy()
    n = len(users)
    return (np.bincount(owner, nll_w, n), np.bincount(owner, known_w, n), np.bincount(owner, unk_w, n))


def mean_session_nll(model, data, split, device, max_users=None, seed=1337, clusters=None):
    """NLL per target (pages and <eos>) over the held-out sessions of `split` (a fixed random
    subset of max_users users): train.py picks best.pt by it on a session split."""
    users, start, end = held_out(data, split)
    keep = pick_users(users, max_users, seed)
    total, known, _ = session_nll(model_logp(model, device, clusters), data, users[keep], start[keep], end[keep])
    return float(total.sum() / max(known.sum(), 1))


def pick_next(lp, generator, temperature=1.0, top_k=0):
    """The next token of each row of lp (B, V) log-probabilities: the most likely at temperature 0,
    else drawn from softmax(lp / temperature), among the top_k most likely where top_k > 0."""
    if temperature == 0:
        return lp.argmax(1)
    if temperature != 1 or top_k > 0:
        lp = lp / temperature
        if top_k > 0:
            kth = torch.topk(lp, min(top_k, lp.size(1)), dim=1).values[:, -1:]
            lp = lp.masked_fill(lp < kth, -math.inf)
        lp = torch.log_softmax(lp, dim=1)
    return torch.multinomial(lp.exp().cpu(), 1, generator=generator).squeeze(1)   # a CPU generator


def generate(logp, contexts, rows, max_len, generator, temperature=1.0, top_k=0):
    """Continue every context (token ids ending inside an open session) until <eos> or max_len
    pages, in batches of similar context length: the one generation loop (the session task,
    sample.py). rows: each context's user (for clusterwise models); temperature 0 is greedy.
    Returns a list of page-id lists."""
    out = [[] for _ in contexts]
    order = np.argsort([len(c) for c in contexts], kind="stable")
    per_pass = logp.rows_per_pass(min(max(len(c) for c in contexts) + max_len, getattr(logp, "block", 1)))
    for s in range(0, len(order), per_pass):
        batch = order[s:s + per_pass]
        seqs = {int(i): list(contexts[i][-logp.block:]) for i in batch}
        active = [int(i) for i in batch]
        cached = logp.decoder([seqs[i] for i in active], rows[active]) if hasattr(logp, "decoder") else None
        kept = []
        for step in range(max_len):
            if cached is not None and step:
                cached.advance(kept, [seqs[i][-1] for i in active])   # one new position per row
            lp = cached() if cached is not None else logp([seqs[i] for i in active], rows[active])[:, -1]
            nxt = pick_next(lp, generator, temperature, top_k).tolist()
            still, kept = [], []
            for j, (i, t) in enumerate(zip(active, nxt)):
                if t != EOS:
                    seqs[i].append(t)
                    out[i].append(t)
                    still.append(i)
                    kept.append(j)
            active = still
            if not active:
                break
    return out


def popular_greedy(data, n_sessions):
    """Most-popular's greedy session: the n most popular pages, n = the median training session."""
    p = popularity(data)
    n = max(1, int(np.median(train_session_lengths(data))))
    top = np.argsort(-p, kind="stable")[:n].tolist()
    return [list(top) for _ in range(n_sessions)]

# -----------------------------------------------------------------------------
# the whole evaluation

def evaluate_sessions(data, split, methods, max_users=None, seed=1337, max_len=None, outcome=None,
                      outcome_samples=10, progress=print):
    """methods: {name: logp function} (model_logp / markov_logp / popular_logp). Returns
    {name: {"users": (n,), per-user arrays..., "outcome": {...}}} and prints progress lines."""
    users, start, end = held_out(data, split)
    if not len(users):
        raise DataError(f"{data.data_dir}: no user has a held-out {split} session (each needs 3 sessions)")
    keep = pick_users(users, max_users, seed)
    users, start, end = users[keep], start[keep], end[keep]
    max_len = max_len or default_max_len(data)
    offsets = np.asarray(data.offsets, dtype=np.int64)
    tokens = data.tokens
    real = [np.asarray(tokens[a:b - 1], dtype=np.int64).tolist() for a, b in zip(start, end)]
    outcome_id = None
    if outcome:
        outcome_id = data.tokenizer.page_id(outcome)
        if outcome_id == UNK:
            raise DataError(f"--outcome={outcome}: no such page in the vocabulary of {data.data_dir}")
    results = {}
    for name, logp in Progress(methods.items(), desc=f"{split} sessions", unit="method", leave=False):
        block = getattr(logp, "block", 1)
        ctx = [np.asarray(tokens[max(o, a - block):a], dtype=np.int64) for o, a in zip(offsets[users], start)]
        total, known, unk = session_nll(logp, data, users, start, end)
        r = {"users": users, "nll_page": np.where(known > 0, total / np.maximum(known, 1), math.nan),
             "nll_session": np.where(unk == 0, total, math.nan), "unk_targets": float(unk.sum() / (end - start).sum()),
             "real_len": np.array([len(x) for x in real])}
        g = torch.Generator().manual_seed(seed)
        samples = []
        for mode in ("greedy", "sampled"):
            if mode == "greedy" and name == "most-popular":
                gen = popular_greedy(data, len(users))
            else:
                gen = generate(logp, ctx, users, max_len, g, temperature=0.0 if mode == "greedy" else 1.0)
            if mode == "sampled":
                samples.append(gen)
            sc = [session_scores(a, b) for a, b in zip(gen, real)]
            for k in ("precision", "recall", "f1", "rouge_l", "len_err"):
                r[f"{mode}_{k}"] = np.array([s[k] for s in sc], dtype=np.float64)
            r[f"{mode}_len"] = np.array([len(x) for x in gen])
        if outcome_id is not None:
            for _ in range(outcome_samples - 1):
                samples.append(generate(logp, ctx, users, max_len, g))
            p = np.mean([[outcome_id in s for s in gen] for gen in samples], axis=0)
            y = np.array([outcome_id in x for x in real])
            pred = p >= 0.5
            prec = (pred & y).sum() / max(pred.sum(), 1)
            r["outcome"] = {"page": outcome, "samples": outcome_samples, "base_rate": float(y.mean()),
                            "auc": auc(p, y), "f1": f_measure(prec, (pred & y).sum() / max(y.sum(), 1)),
                            "p": p, "y": y}
        results[name] = r
        progress(f"  {name}: {len(users):,} users scored")
    return results


PER_USER = ("nll_page", "nll_session", "greedy_f1", "greedy_rouge_l", "greedy_len_err", "sampled_f1",
            "sampled_rouge_l", "sampled_len_err")


def session_table(results, clusters=None):
    """The per-user figures of every method as text: one line per method and statistic
    (mean, std, p10), overall, then per cluster of `clusters` (n_users,) when given."""
    names = {"nll_page": "nll/page", "nll_session": "nll/sess", "greedy_f1": "F1 greedy",
             "greedy_rouge_l": "ROUGE-L gr", "greedy_len_err": "len err gr", "sampled_f1": "F1 sampled",
             "sampled_rouge_l": "ROUGE-L sa", "sampled_len_err": "len err sa"}
    w = max(len("method"), *(len(n) for n in results)) + 5
    head = f"{'method':<{w}}" + "".join(f"{names[k]:>11}" for k in PER_USER)
    groups = [("all users", None)]
    if clusters is not None:
        groups += [(f"cluster {c}", c) for c in range(int(clusters.max()) + 1)]
    lines = []
    for title, c in groups:
        block = []
        for name, r in results.items():
            sel = np.ones(len(r["users"]), bool) if c is None else clusters[r["users"]] == c
            if not sel.any():
                continue
            for stat in STATS:
                vals = [spread(r[k][sel])[stat] for k in PER_USER]
                block.append(f"{name + ' ' + stat:<{w}}" + "".join(f"{v:>11.4f}" for v in vals))
        if block:
            n = int(sel.sum())
            lines += [f"{title} ({n:,} users)", head] + block
    r0 = next(iter(results.values()))
    lines.append(f"held-out sessions: median {np.median(r0['real_len']):g} pages; <unk> targets "
                 f"{r0['unk_targets']:.2%} (left out of the NLL; nll/sess only for users without one); "
                 "len err = generated - real pages")
    for name, r in results.items():
        if "outcome" in r:
            o = r["outcome"]
            lines.append(f"outcome {o['page']!r} ({o['samples']} sampled sessions per user; happened in "
                         f"{o['base_rate']:.1%}): {name}: AUC {o['auc']:.4f}, F1 {o['f1']:.4f}")
    return "\n".join(lines)


def summary(results):
    """{name: {metric: {mean, std, p10}}, ...} for JSON (hetlm.json, results.json)."""
    out = {}
    for name, r in results.items():
        out[name] = {k: spread(r[k]) for k in PER_USER}
        out[name]["users"] = int(len(r["users"]))
        if "outcome" in r:
            out[name]["outcome"] = {k: v for k, v in r["outcome"].items() if k not in ("p", "y")}
    return out
