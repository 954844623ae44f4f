"""
Predict what a user does next with a trained checkpoint: the top-k next pages with their
probabilities, and a few generated continuations of the current session.

    python sample.py                                   # a few users of the dataset the model saw
    python sample.py --user=u42                        # one user of that dataset, by original id
    python sample.py --history="home search item_17"   # a history of your own (see below)
    python sample.py --history_file=history.txt        # one session per line
    python sample.py --temperature=0 --num_samples=1   # greedy continuation
    python sample.py --out_dir=out/session/stage1      # a --split=session dataset: the real next session
                                                       # beside a greedy and sampled ones, with their scores

A history is pages separated by spaces or commas; ';' (or a new line in a file) closes a session
and starts the next. The last session is taken as still open: the model predicts its next page,
and continuations stop when it predicts the end of the session (<eos>). Everything needed (model,
tokenizer, config) is in the checkpoint; the dataset folder is read only to look up --user.
"""

import os
import sys

import numpy as np
import torch

# -----------------------------------------------------------------------------
out_dir = 'out/stage1'   # folder of the checkpoint
ckpt_name = 'best.pt'    # best.pt (best validation) or ckpt.pt (latest)
user = ''                # a user id of the checkpoint's dataset
history = ''             # or a history on the command line
history_file = ''        # or a history in a file
num_users = 3            # with no user and no history: show this many users of the dataset
top_k = 10               # next pages to list
num_samples = 3          # generated continuations per user
max_new_tokens = 20      # longest continuation
temperature = 1.0        # 0 = greedy
sample_top_k = 0         # sample only among the k most likely tokens (0 = all)
seed = 1337
device = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

from tokenizer import BOS, EOS, N_SPECIAL, UNK  # noqa: E402


def parse_history(text):
    """'a b, c; d e' -> [['a', 'b', 'c'], ['d', 'e']] (sessions of pages)."""
    sessions = []
    for chunk in text.replace('\n', ';').split(';'):
        pages = chunk.replace(',', ' ').split()
        if pages:
            sessions.append(pages)
    return sessions


def encode_history(sessions, tokenizer):
    """Sessions of page strings -> token ids, the last session left open (no <eos>)."""
    ids = []
    for i, pages in enumerate(sessions):
        ids += [BOS] + [int(t) for t in tokenizer.encode(pages)]
        if i < len(sessions) - 1:
            ids.append(EOS)
    unknown = sorted({p for s in sessions for p in s if tokenizer.page_id(p) == UNK})
    return ids, unknown


def next_page_probs(model, ids, device, cluster=0):
    """Probability of every token as the next one, given the last block_size ids of a history
    (read by parameter set `cluster` of a clusterwise model): model.GPT.next_logits, softmaxed."""
    ids = ids[-model.config.block_size:]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    logits = model.next_logits(idx, torch.tensor([[len(ids) - 1]], device=device), [cluster])
    return torch.softmax(logits[0, 0], dim=-1)                        # (V,)


@torch.no_grad()
def assign_cluster(model, ids, device):
    """HeTLM's rule for a new user: the parameter set with the lowest NLL on the user's pages
    (cluster.set_nll, as predict.py). Returns (cluster, NLL of each set)."""
    from cluster import pick_set, set_nll
    nll = set_nll(model, device, [ids])
    return int(pick_set(nll)[0]), nll[:, 0].tolist()


def generate(model, ids, max_new_tokens, temperature, sample_top_k, generator, device, cluster=0):
    """Continue the open session until <eos> or max_new_tokens pages (never <pad>, <unk> or
    <bos>): the session task's generation loop (sessions.generate) on this one history."""
    from sessions import generate, model_logp
    logp = model_logp(model, device, np.array([cluster]))
    return generate(logp, [list(ids)], np.array([0]), max_new_tokens, generator, temperature, sample_top_k)[0]


def read_history_file(path):
    """The text of a history file, or a one-line ConfigError naming the line that is not UTF-8."""
    from configurator import ConfigError
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        raise ConfigError(f"--history_file={path}:{line}: not UTF-8 text ({e.reason}); save it as UTF-8") from None


def show(model, tokenizer, ids, cfg, generator, device, title, cluster=0, real=None):
    """Print a history's last pages, its top-k next pages and num_samples continuations; given the
    real next session (page ids, a session split's held-out one), it is printed first and every
    continuation is scored against it (sessions.session_scores), a greedy one included."""
    pages = [p for p in tokenizer.decode(ids) if not p.startswith('<') or p == '<unk>']
    tail = ' '.join(pages[-12:])
    print(f"\n{title}: {len(pages)} pages, last: {'... ' if len(pages) > 12 else ''}{tail}")
    probs = next_page_probs(model, ids, device, cluster)
    page_probs = probs[N_SPECIAL:]
    k = min(cfg['top_k'], page_probs.numel())
    top_p, top_i = torch.topk(page_probs, k)
    print(f"  next page (P(session ends) = {probs[EOS]:.3f}):")
    for rank, (p, i) in enumerate(zip(top_p.tolist(), top_i.tolist()), 1):
        print(f"    {rank:2d}. {tokenizer.pages[i + N_SPECIAL]:<30s} {p:.3f}")
    runs = [(f"continuation {s + 1}", cfg['temperature']) for s in range(cfg['num_samples'])]
    if real is not None:
        from sessions import session_scores
        print(f"  real next session ({len(real)} pages): {' '.join(tokenizer.decode(real))}")
        if cfg['temperature'] > 0:
            runs = [("greedy", 0.0)] + runs
    for name, temperature in runs:
        cont = generate(model, ids, cfg['max_new_tokens'], temperature, cfg['sample_top_k'], generator, device, cluster)
        score = ''
        if real is not None:
            sc = session_scores(cont, real)
            score = f"  [F1 {sc['f1']:.2f}, ROUGE-L {sc['rouge_l']:.2f}, length {sc['len_err']:+d}]"
        print(f"  {name}: {' '.join(tokenizer.decode(cont)) or '(session ends)'}{score}")


def run(cfg):
    from configurator import ConfigError
    from runtime import load_checkpoint, resolve_device
    from tokenizer import PageTokenizer

    path = os.path.join(cfg['out_dir'], cfg['ckpt_name'])
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}; train one first (python train.py --stage=1) or set --out_dir")
    if cfg['temperature'] < 0:
        raise ConfigError(f"--temperature={cfg['temperature']}: must be >= 0")
    for k in ('top_k', 'num_samples', 'max_new_tokens', 'num_users', 'sample_top_k'):
        if cfg[k] < 0:
            raise ConfigError(f"--{k}={cfg[k]}: must be >= 0")
    dev = resolve_device(cfg['device'])
    model, ckpt = load_checkpoint(path, dev)
    tokenizer = PageTokenizer(ckpt['tokenizer']['pages'], ckpt['tokenizer']['counts'])
    generator = torch.Generator().manual_seed(cfg['seed'])
    print(f"model: {path} (iteration {ckpt['iter_num']}, {model.get_num_params() / 1e6:.2f}M parameters, "
          f"{tokenizer.vocab_size - N_SPECIAL:,} pages)")

    text = cfg['history']
    if cfg['history_file']:
        if not os.path.isfile(cfg['history_file']):
            raise ConfigError(f"--history_file={cfg['history_file']}: file not found")
        text = read_history_file(cfg['history_file'])
    if text:
        show_history(model, tokenizer, text, cfg, generator, dev)
    else:
        show_users(model, ckpt, tokenizer, path, cfg, generator, dev)


def show_history(model, tokenizer, text, cfg, generator, dev):
    """A history of the user's own (placed in a parameter set by HeTLM's rule)."""
    from configurator import ConfigError
    sessions = parse_history(text)
    if not sessions:
        raise ConfigError("the history holds no pages")
    ids, unknown = encode_history(sessions, tokenizer)
    if unknown:
        print(f"note: {len(unknown)} page(s) not in the vocabulary, read as <unk>: {' '.join(unknown[:10])}")
    cluster = 0
    if model.config.n_clusters > 1:
        cluster, nll = assign_cluster(model, ids, dev)
        print(f"assigned to cluster {cluster} (lowest NLL of the history over the "
              f"{model.config.n_clusters} parameter sets: {' '.join(f'{v:.3f}' for v in nll)})")
    show(model, tokenizer, ids, cfg, generator, dev, "your history", cluster)


def show_users(model, ckpt, tokenizer, path, cfg, generator, dev):
    """--user, or a few users with the longest histories, of the dataset the model saw."""
    from configurator import ConfigError
    from data import load_data
    data = load_data(ckpt['config']['data_dir'])
    if list(data.tokenizer.pages) != tokenizer.pages:
        raise ConfigError(f"{path} was trained on another vocabulary than {data.data_dir} (prepared again since?)")
    if cfg['user']:
        try:
            users = [data.user_index(cfg['user'])]
        except KeyError:
            raise ConfigError(f"--user={cfg['user']}: no such user in {data.data_dir}") from None
    else:  # a few users with the longest histories among the first thousand (with a held-out session)
        n = min(1000, data.n_users)
        lengths = data.offsets[1:n + 1] - data.offsets[:n]
        if data.split == 'session':
            lengths = lengths * (data.test_pos[:n] >= 0)
        users = sorted(range(len(lengths)), key=lambda u: -int(lengths[u]))[:cfg['num_users']]
    names = data.user_ids()
    for u in users:
        real, end = None, data.offsets[u + 1]
        if data.split == 'session' and data.test_pos[u] >= 0:   # the context ends at the test session's <bos>
            end = data.test_pos[u]
            real = [int(t) for t in data.tokens[end:data.offsets[u + 1] - 1]]
        ids = [int(t) for t in data.tokens[data.offsets[u]:end]]
        if ids and ids[-1] == EOS:  # the last session is taken as still open
            ids = ids[:-1]
        cluster = 0 if ckpt.get('clusters') is None else int(ckpt['clusters'][u])
        show(model, tokenizer, ids, cfg, generator, dev,
             f"user {names[u]}" + (f" (cluster {cluster})" if model.config.n_clusters > 1 else "")
             + (", before their held-out test session" if real is not None else ""), cluster, real)


def main(argv):
    from configurator import run_main
    from data import DataError
    run_main(run, DEFAULTS, argv, (DataError,))


if __name__ == '__main__':
    main(sys.argv[1:])
