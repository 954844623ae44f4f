"""
Top-k next pages for every user, with their probabilities, in a file another system can read.

    python predict.py                                       # every user of the model's dataset
    python predict.py --k=20 --exclude_seen=True --output=out/stage1/top20.jsonl
    python predict.py --histories=histories.txt             # every history in a file of your own

Output (by the file's extension): .csv has one row per prediction, `user,rank,page,prob`; .jsonl
one object per user, {"user": ..., "pages": [...], "probs": [...]}. prob is the model's
probability of that page as the next event (the rest goes to other pages and to the session
ending, `<eos>`). The file is written whole or not at all (a temporary file, renamed at the end).

A user's context is their whole stream in the dataset (validation and test events included: this
predicts what comes after everything known), the last session taken as still open, cut to the
model's block_size tokens. A histories file holds one history per line, `ID: a b c; d e` (or
without `ID:`, the line number is the id): pages separated by spaces or commas, ';' closes a
session, as in sample.py; pages the model never saw are read as <unk> and counted in a note.
A clusterwise checkpoint predicts each dataset user with their own parameter set, and a new
history with the set that gives it the lowest NLL (HeTLM's rule, as sample.py). exclude_seen
drops every page already in the user's history (the whole history, not only the window).

From Python (three lines):

    from predict import Predictor
    predictor = Predictor("out/stage1/best.pt")
    print(predictor.top_k(["home search deals", "home; cart checkout"], k=5))
"""
import os
import sys
import time

import numpy as np
import torch

import cluster
import sessions
from configurator import Progress
from tokenizer import EOS, N_SPECIAL

# -----------------------------------------------------------------------------
out_dir = 'out/stage1'   # folder of the checkpoint
ckpt_name = 'best.pt'
histories = ''           # a file of histories (one per line); empty: every user of the model's dataset
output = ''              # .csv or .jsonl; default: out_dir/predictions.csv
k = 10                   # pages per user
exclude_seen = False     # leave out pages already in the user's history
device = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = {key: v for key, v in dict(globals()).items()
            if not key.startswith('_') and not key.isupper() and isinstance(v, (int, float, bool, str))}
CHUNK = 1 << 16   # users ranked before their rows are written (sorted by length inside): bounds memory


class Predictor:
    """A trained checkpoint, ready to rank the next page of any history. State: the model and its
    vocabulary, hence a class."""

    def __init__(self, path, device='auto'):
        from runtime import load_checkpoint, resolve_device
        from tokenizer import PageTokenizer
        self.device = resolve_device(device)
        self.model, self.ckpt = load_checkpoint(path, self.device)
        self.tokenizer = PageTokenizer(self.ckpt['tokenizer']['pages'], self.ckpt['tokenizer']['counts'])
        self.clusters = None if self.ckpt.get('clusters') is None else self.ckpt['clusters'].numpy()
        self.block = self.model.config.block_size
        self.logp = sessions.model_logp(self.model, self.device, self.clusters)
        self.unknown = set()             # pages of the given histories not in the vocabulary

    def encode(self, history):
        """'a b; c d' or [['a', 'b'], ['c', 'd']] -> token ids, the last session left open."""
        from sample import encode_history, parse_history
        ids, unknown = encode_history(parse_history(history) if isinstance(history, str) else history, self.tokenizer)
        self.unknown.update(unknown)
        return ids

    def cluster_of(self, contexts):
        """HeTLM's rule for new histories: per row, the parameter set with the lowest NLL of its pages
        (cluster.set_nll, as sample.py)."""
        if self.model.config.n_clusters == 1:
            return np.zeros(len(contexts), dtype=np.int64)
        return cluster.pick_set(cluster.set_nll(self.model, self.device, contexts))

    def rank(self, contexts, k=10, exclude_seen=False, rows=None, progress=False):
        """contexts: lists of token ids; rows: each one's user index into self.clusters (dataset
        users of a clusterwise model), or None (sets assigned by cluster_of). Yields (i, page ids (k,),
        probs (k,)) in input order; the model sees batches of similar length."""
        if rows is None and self.clusters is not None:
            sets = self.cluster_of(contexts)
            logp = sessions.model_logp(self.model, self.device, sets)
            rows = np.arange(len(contexts))
        else:
            logp = self.logp
            rows = np.zeros(len(contexts), dtype=np.int64) if rows is None else np.asarray(rows)
        length = np.minimum(contexts.lengths if hasattr(contexts, 'lengths') else [len(c) for c in contexts], self.block)
        k = min(k, self.model.config.vocab_size - N_SPECIAL)
        bar = Progress(total=len(contexts), desc='predicting', unit='user', disable=not progress, mininterval=5.0)
        for c0 in range(0, len(contexts), CHUNK):   # results come out in input order, CHUNK users at a time
            part = np.arange(c0, min(c0 + CHUNK, len(contexts)))
            order = part[np.argsort(length[part], kind='stable')]
            top_ids, top_p = np.zeros((len(part), k), dtype=np.int64), np.zeros((len(part), k), dtype=np.float32)
            s = 0
            while s < len(order):   # batches of similar length, as many rows as the longest allows
                guess = logp.rows_per_pass(length[order[s]])
                batch = order[s:s + logp.rows_per_pass(length[order[min(s + guess, len(order)) - 1]])]
                s += len(batch)
                with torch.inference_mode():
                    lp = logp([contexts[i][-self.block:] for i in batch], rows[batch])[:, -1]  # (B, V) pages + <eos>
                    lp[:, :N_SPECIAL] = -float('inf')                                          # pages only
                    if exclude_seen:
                        seen = [np.asarray(contexts[i], dtype=np.int64) for i in batch]
                        r = np.repeat(np.arange(len(batch)), [len(x) for x in seen])
                        lp[torch.from_numpy(r), torch.from_numpy(np.concatenate(seen))] = -float('inf')
                    p, ids = torch.topk(lp, k, dim=1)
                top_ids[batch - c0], top_p[batch - c0] = ids.numpy(), p.exp().numpy()
                bar.update(len(batch))
            for j in range(len(part)):
                yield c0 + j, top_ids[j], top_p[j]
        bar.close()

    def top_k(self, histories, k=10, exclude_seen=False):
        """histories (strings like 'a b; c d', or lists of sessions) -> for each, [(page, prob), ...]."""
        contexts = [self.encode(h) for h in histories]
        if any(len(c) == 0 for c in contexts):
            raise ValueError("a history holds no pages")
        out = [None] * len(contexts)
        for i, ids, probs in self.rank(contexts, k, exclude_seen):
            out[i] = [(self.tokenizer.pages[t], float(p)) for t, p in zip(ids, probs) if p > 0]
        return out


class UserStreams:
    """Every user's whole stream, read on demand from the memory-mapped dataset, the last session
    left open (its <eos> dropped): a sequence of token-id arrays that holds no copy of its own."""

    def __init__(self, data):
        self.tokens, self.offsets = data.tokens, np.asarray(data.offsets, dtype=np.int64)
        ends = self.offsets[1:]
        self.ends = ends - (np.asarray(self.tokens[ends - 1]) == EOS)
        self.lengths = self.ends - self.offsets[:-1]

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, u):
        return np.asarray(self.tokens[self.offsets[u]:self.ends[u]], dtype=np.int64)


def read_histories(path):
    """(ids, texts) of a histories file: one per line, `ID: history` or a bare history (id = line number)."""
    from configurator import ConfigError
    from sample import read_history_file
    if not os.path.isfile(path):
        raise ConfigError(f"--histories={path}: file not found")
    ids, texts = [], []
    for n, line in enumerate(read_history_file(path).split('\n'), 1):
        if not line.strip():
            continue
        head, colon, rest = line.partition(':')
        uid, text = (head.strip(), rest) if colon and head.strip() and ' ' not in head.strip() else (str(n), line)
        if not text.replace(';', ' ').replace(',', ' ').split():
            raise ConfigError(f"{path}:{n}: a history with no pages")
        ids.append(uid)
        texts.append(text)
    if not texts:
        raise ConfigError(f"{path}: no history in the file")
    return ids, texts


def write_predictions(path, users, ranked, pages, n_rows):
    """Write (i, ids, probs) rows as CSV or JSONL to path, which appears only when complete (a kill or
    an error leaves no file: files.atomic_output); returns rows written."""
    import csv
    import json
    from files import atomic_output
    n = 0
    with atomic_output(path, newline='') as f:
        if path.endswith('.jsonl'):
            for i, ids, probs in ranked:
                f.write(json.dumps({'user': users[i], 'pages': [pages[t] for t in ids],
                                    'probs': [round(float(p), 6) for p in probs]}) + '\n')
                n += 1
        else:
            w = csv.writer(f)
            w.writerow(['user', 'rank', 'page', 'prob'])
            for i, ids, probs in ranked:
                w.writerows((users[i], r, pages[t], f"{p:.6g}") for r, (t, p) in enumerate(zip(ids, probs), 1))
                n += 1
    return n


def run(cfg):
    from configurator import ConfigError
    from data import load_data
    path = os.path.join(cfg['out_dir'], cfg['ckpt_name'])
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}; train one first (python train.py) or set --out_dir")
    if cfg['k'] < 1:
        raise ConfigError(f"--k={cfg['k']}: must be >= 1")
    target = cfg['output'] or os.path.join(cfg['out_dir'], 'predictions.csv')
    if not target.endswith(('.csv', '.jsonl')):
        raise ConfigError(f"--output={target}: expected a .csv or .jsonl file name")
    if os.path.dirname(target) and not os.path.isdir(os.path.dirname(target)):
        raise ConfigError(f"--output={target}: folder {os.path.dirname(target)} does not exist")
    if os.path.isdir(target):
        raise ConfigError(f"--output={target}: is a folder; name a .csv or .jsonl file")
    if not os.access(os.path.dirname(target) or '.', os.W_OK):
        raise ConfigError(f"--output={target}: cannot write in folder {os.path.dirname(target) or '.'}")
    t0 = time.time()
    p = Predictor(path, cfg['device'])
    if cfg['histories']:
        users, texts = read_histories(cfg['histories'])
        contexts = [p.encode(t) for t in texts]
        rows, where = None, cfg['histories']
        if p.unknown:
            print(f"note: {len(p.unknown):,} page(s) not in the vocabulary, read as <unk>: "
                  f"{' '.join(sorted(p.unknown)[:10])}")
    else:
        data = load_data(p.ckpt['config']['data_dir'])
        if list(data.tokenizer.pages) != p.tokenizer.pages:
            raise ConfigError(f"{path} was trained on another vocabulary than {data.data_dir} (prepared again since?)")
        users, contexts, where = data.user_ids(), UserStreams(data), data.data_dir
        rows = np.arange(data.n_users) if p.clusters is not None else None
    print(f"{len(contexts):,} users of {where}: top {cfg['k']} pages each"
          f"{', pages already visited left out' if cfg['exclude_seen'] else ''} -> {target}")
    t1 = time.time()
    ranked = p.rank(contexts, cfg['k'], cfg['exclude_seen'], rows, progress=True)
    n = write_predictions(target, users, ranked, p.tokenizer.pages, len(contexts))
    secs = time.time() - t1
    print(f"wrote {n:,} users in {secs:.1f} s ({n / max(secs, 1e-9):,.0f} users/s; {time.time() - t0:.1f} s in all)")
    return target


def main(argv):
    from configurator import run_main
    from data import DataError
    run_main(run, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
