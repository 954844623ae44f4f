"""Behaviour is unchanged by a restructure: the same weights and the same printed lines, bit for bit.

    python tests/reference_runs.py /tmp/before.json        # on the commit before
    python tests/reference_runs.py /tmp/after.json         # on the commit after
    python tests/reference_runs.py --compare /tmp/before.json /tmp/after.json

Scenarios (a 300-user built-in dataset, one thread, fp32): stage 1 with settings derived from
the data; stage 2 with the KL term; a resume (20 iterations, then 10 more) against the straight
run; a clusterwise run (k-means clusters, warm start from stage 1 into 2 sets); a cooldown (an
early stop at a high learning rate); the settings search. Each scenario's digest: the SHA-256 of
every checkpoint tensor and of stdout with timings, paths and speeds blanked. Not a pytest file
(a few minutes); run it by hand around a restructure.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch  # noqa: E402

torch.set_num_threads(1)

VOLATILE = [(re.compile(r"\d+(\.\d+)?\s*(ms|s|min)\b"), "T"), (re.compile(r"\d+m\d+s"), "T"),
            (re.compile(r"[\d,]+ target tokens/s"), "R"), (re.compile(r"/tmp/\S+"), "P"),
            (re.compile(r"~?\d+(\.\d+)? (MB|GB)"), "M"), (re.compile(r"elapsed.*"), "E")]


def clean(text):
    for pattern, repl in VOLATILE:
        text = pattern.sub(repl, text)
    return text


def digest_dir(folder):
    out = {}
    for base, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith('.pt'):
                ck = torch.load(os.path.join(base, name), weights_only=True, map_location='cpu')
                h = hashlib.sha256()
                for k in sorted(ck['model']):
                    h.update(k.encode())
                    h.update(ck['model'][k].float().numpy().tobytes())
                out[os.path.relpath(os.path.join(base, name), folder)] = h.hexdigest()[:16]
    return out


def run(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args)
    return hashlib.sha256(clean(buf.getvalue()).encode()).hexdigest()[:16], clean(buf.getvalue())


def scenarios(root):
    import cluster
    import data
    import train
    ds = os.path.join(root, 'shop')
    try:                                   # the simulated shop: shop.py since the learner's-path layout
        from shop import make_builtin
    except ImportError:
        make_builtin = data.make_builtin
    make_builtin(ds, n_users=300)
    base = dict(train.DEFAULTS, data_dir=ds, dtype='float32', threads=1, time_budget=0.0, search=False,
                eval_users=200, batch_tokens=512)
    small = dict(base, max_iters=30, eval_interval=10, log_interval=10, block_size=32, n_layer=1, n_embd=32,
                 warmup_iters=5)
    out = {}
    o = os.path.join(root, 's1')
    out['stage 1, settings from the data'] = run(train.train, dict(base, out_dir=o, max_iters=60))
    out['stage 2 with KL'] = run(train.train, dict(base, out_dir=o, stage=2, kl_weight=0.5, stage2_iters=20))
    out['digests s1'] = digest_dir(o)
    straight, parts = os.path.join(root, 'straight'), os.path.join(root, 'parts')
    out['straight'] = run(train.train, dict(small, out_dir=straight, lr_decay_iters=30))
    out['part 1'] = run(train.train, dict(small, out_dir=parts, max_iters=20, lr_decay_iters=30))
    out['resume'] = run(train.train, dict(small, out_dir=parts, init_from='resume', lr_decay_iters=30))
    out['digests resume'] = [digest_dir(straight), digest_dir(parts)]
    out['clusters'] = run(cluster.main, [f'--data_dir={ds}', '--k=2', '--n_init=2'])
    c = os.path.join(root, 'c2')
    out['warm start into 2 sets'] = run(train.train, dict(small, out_dir=c, n_clusters=2,
                                                          init_from=os.path.join(straight, 'stage1', 'best.pt')))
    out['digests clusters'] = digest_dir(c)
    cool = os.path.join(root, 'cool')
    out['cooldown'] = run(train.train, dict(small, out_dir=cool, max_iters=200, patience=1, learning_rate=3e-2))
    out['digests cooldown'] = digest_dir(cool)
    srch = os.path.join(root, 'search')
    out['search'] = run(train.train, dict(base, out_dir=srch, search=True, time_budget=10.0, max_iters=60))
    out['digests search'] = digest_dir(srch)
    return out


def main(argv):
    if argv and argv[0] == '--compare':
        a, b = (json.load(open(p)) for p in argv[1:3])
        bad = [k for k in a if a[k] != b.get(k)]
        for k in bad:
            print(f"differs: {k}")
            if isinstance(a[k], list) and len(a[k]) == 2 and isinstance(a[k][1], str):
                import difflib
                print("\n".join(list(difflib.unified_diff(a[k][1].splitlines(), b[k][1].splitlines(), lineterm=''))[:40]))
        print("identical" if not bad else f"{len(bad)} of {len(a)} differ")
        sys.exit(1 if bad else 0)
    with tempfile.TemporaryDirectory() as root:
        out = scenarios(root)
    with open(argv[0], 'w') as f:
        json.dump(out, f, indent=1)
    print(f"wrote {argv[0]}: {len(out)} entries")


if __name__ == '__main__':
    main(sys.argv[1:])
