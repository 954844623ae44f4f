"""Issue 13, "loses nothing, explains every failure": every bad input or setting a hostile or unlucky
user can hand a script stops it with ONE line naming the file (or setting) and what is wrong, a
non-zero exit, no traceback, and nothing changed on disk. A table: (case, script, the one line's
fragment, exit code: 2 for every script). Plus: a prepare killed in its write phase leaves the old folder loadable,
and a re-prepare drops the old dataset's derived files. Scripts run in-process (main(argv))."""

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import cluster  # noqa: E402
import data  # noqa: E402
import shop  # noqa: E402
import evaluate  # noqa: E402
import hetlm  # noqa: E402
import sample  # noqa: E402
from model import GPT, GPTConfig, check_gpt_config  # noqa: E402
from runtime import CheckpointError  # noqa: E402


class Evil:
    """An object a checkpoint must never bring in (weights_only refuses to unpickle it)."""


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A tiny built-in dataset (60 simulated users) and a valid checkpoint for it."""
    root = tmp_path_factory.mktemp("shared")
    path = str(root / "ds")
    shop.make_builtin(path, n_users=60)
    d = data.load_data(path)
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=d.vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=False,
                n_clusters=1, cluster_scope='all')
    ck = {'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'iter_num': 0,
          'config': {'data_dir': path}, 'clusters': None,
          'tokenizer': {'pages': list(d.tokenizer.pages), 'counts': d.tokenizer.counts.tolist()}}
    torch.save(ck, root / "good.pt")
    return {"dir": path, "ckpt": ck, "good": str(root / "good.pt")}


def snapshot(root):
    """{relative path: sha1} of every file and folder under root: 'nothing changed on disk'."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), root) + "/"] = "dir"
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                out[os.path.relpath(os.path.join(base, name), root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def run_cli(main, argv, capsys):
    """-> (exit code, the error text) of a script's main; SystemExit('msg') (evaluate.py) is code 1."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    return code, err


# --- inputs: each builder writes into the case folder t and returns (script main, argv) -------------

def write(t, name, content, gz=False):
    path = os.path.join(t, name)
    raw = content if isinstance(content, bytes) else content.encode()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return path


def prep(t, name, content, *flags, gz=False, out="out"):
    return data.main, [write(t, name, content, gz), f"--out_dir={os.path.join(t, out)}", *flags]


GOOD_LOG = "".join(f"u{u} p{(u * 7 + i) % 5}\n" for u in range(6) for i in range(4))   # 6 users x 4 events


def cut_gzip(t):
    path = write(t, "log.csv.gz", "user,page\n" + "".join(f"u{i % 50},p{i % 97}\n" for i in range(20000)), gz=True)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return data.main, [path, f"--out_dir={t}/out"]


def reprepare_bad(t, ds):
    out = os.path.join(t, "ds")
    shutil.copytree(ds["dir"], out)
    return data.main, [write(t, "log.txt", GOOD_LOG.replace("u3 p3\n", "u3 p3 extra\n", 1)), f"--out_dir={out}"]


def full_disk(t, ds, monkeypatch):
    """ulimit -f / a full disk: the third file written fails with EFBIG, into an existing dataset."""
    out = os.path.join(t, "ds")
    shutil.copytree(ds["dir"], out)
    calls, real = [], data.write_atomic
    def write_atomic(path, obj):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(27, "File too large", path)
        real(path, obj)
    monkeypatch.setattr(data, "write_atomic", write_atomic)
    return data.main, [write(t, "log.txt", GOOD_LOG), f"--out_dir={out}"]


def broken_ds(t, ds, how):
    """A copy of the prepared folder, damaged by how(folder)."""
    out = os.path.join(t, "ds")
    shutil.copytree(ds["dir"], out)
    how(out)
    return out


def truncate(name, cut):
    def how(d):
        path = os.path.join(d, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - cut)
    return how


def append(name, raw):
    def how(d):
        with open(os.path.join(d, name), "ab") as f:
            f.write(raw)
    return how


def replace(name, raw):
    def how(d):
        with open(os.path.join(d, name), "wb") as f:
            f.write(raw)
    return how


def poke_token(d):
    tokens = np.memmap(os.path.join(d, "tokens.bin"), dtype=np.uint32, mode="r+")
    tokens[5] = 4_000_000_000   # an id far beyond the vocabulary (once: an attempt to allocate 32 GiB)
    tokens.flush()
    del tokens


def poke_val(d):
    path = os.path.join(d, "val_pos.npy")
    v = np.load(path)
    v[v >= 0] += 10 ** 6
    np.save(path, v)


def on_ds(how, script="evaluate"):
    def build(t, ds):
        d = broken_ds(t, ds, how)
        if script == "evaluate":
            return evaluate.main, ["--baselines_only", f"--data_dir={d}"]
        return cluster.main, [f"--data_dir={d}", "--k=2", "--n_init=1"]
    return build


def ckpt_file(t, obj=None, raw=None, name="bad.pt"):
    path = os.path.join(t, name)
    if raw is not None:
        with open(path, "wb") as f:
            f.write(raw)
    else:
        torch.save(obj, path)
    return path


def with_args(ds, **change):
    ck = dict(ds["ckpt"])
    ck["model_args"] = {**ck["model_args"], **change}
    return ck


def with_table(ds, top):
    """ds's checkpoint with a transition table of 4 successors per token, the largest page id `top`."""
    ck = with_args(ds, transitions=4)
    V = ck["model_args"]["vocab_size"]
    nxt = torch.full((V, 4), 4, dtype=torch.int32)
    nxt[5, 2] = top
    state = {**GPT(GPTConfig(**ck["model_args"])).state_dict(), **ck["model"], "trans_next": nxt}
    return {**ck, "model": state}


def on_ckpt(make, script="evaluate"):
    """make(t, ds) -> checkpoint path; given to evaluate.py --ckpt, sample.py or cluster.py --vectors=model."""
    def build(t, ds):
        path = make(t, ds)
        if script == "evaluate":
            return evaluate.main, [f"--ckpt={path}", f"--data_dir={ds['dir']}", "--device=cpu"]
        if script == "sample":
            return sample.main, [f"--out_dir={os.path.dirname(path)}", f"--ckpt_name={os.path.basename(path)}",
                                 "--device=cpu"]
        return cluster.main, [f"--data_dir={ds['dir']}", "--vectors=model", f"--ckpt={path}", "--device=cpu"]
    return build


def good_bytes(ds):
    with open(ds["good"], "rb") as f:
        return f.read()


def history(t, ds):
    path = write(t, "history.txt", b"home search\nhome \xff\xfe deals\n")
    return sample.main, [f"--out_dir={os.path.dirname(ds['good'])}", "--ckpt_name=good.pt",
                         f"--history_file={path}", "--device=cpu"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# (case, build(t, ds[, monkeypatch]) -> (main, argv), fragment of the one error line, exit code)
CASES = [
    # logs given to data.py
    ("nul byte in a page", lambda t, ds: prep(t, "log.csv", "user,page\nu1,a\nu1,b\x00c\n"), "log.csv:3: NUL byte", 2),
    ("pair file, one bad line", lambda t, ds: prep(t, "log.txt", GOOD_LOG.replace("u2 p4\n", "u2 p4 p0\n", 1)),
     "log.txt:9: malformed line", 2),
    ("non-UTF-8 line", lambda t, ds: prep(t, "log.csv", b"user,page\nu1,a\nu1,caf\xe9\n"), "log.csv:3: not UTF-8", 2),
    ("gzip cut short", lambda t, ds: cut_gzip(t), "gzip data cut short", 2),
    ("min_count leaves no page", lambda t, ds: prep(t, "log.txt", GOOD_LOG, "--min_count=1000"),
     "no page is left in the vocabulary", 2),
    ("no user has 3 events", lambda t, ds: prep(t, "log.txt", "u1 a\nu1 b\nu2 a\nu3 c\n"), "no user has 3 or more", 2),
    ("negative session_gap", lambda t, ds: prep(t, "log.txt", GOOD_LOG, "--session_gap=-5"), "--session_gap=-5", 2),
    ("anchor_mass over 1", lambda t, ds: prep(t, "log.txt", GOOD_LOG, "--anchor_mass=2"), "--anchor_mass=2", 2),
    ("out_dir is a file", lambda t, ds: prep(t, "log.txt", GOOD_LOG, out="log.txt"), "exists and is not a folder", 2),
    ("bad line into an existing dataset", reprepare_bad, "log.txt:15: malformed line", 2),
    ("full disk while writing", full_disk, "cannot write the dataset (File too large", 2),
    # prepared folders given to evaluate.py / cluster.py
    ("not a prepared folder", lambda t, ds: (evaluate.main, ["--baselines_only", f"--data_dir={t}/none"]),
     "not a prepared dataset", 2),
    ("tokens.bin not a multiple of 4", on_ds(append("tokens.bin", b"\0\0")), "tokens.bin:", 2),
    ("tokens.bin shorter than meta.json", on_ds(truncate("tokens.bin", 40), "cluster"), "tokens.bin:", 2),
    ("offsets.npy cut", on_ds(truncate("offsets.npy", 16)), "offsets.npy: not a readable .npy", 2),
    ("meta.json not JSON", on_ds(replace("meta.json", b"{\"n_users\": 6"), "cluster"), "meta.json: not JSON", 2),
    ("tokenizer.json not JSON", on_ds(replace("tokenizer.json", b"\x00\x01")), "tokenizer.json: not a tokenizer", 2),
    ("token id outside the vocabulary", on_ds(poke_token, "cluster"), "token id 4,000,000,000 outside", 2),
    ("val positions out of range", on_ds(poke_val), "val_pos.npy: positions outside", 2),
    # checkpoints given to evaluate.py --ckpt, sample.py, cluster.py --vectors=model
    ("checkpoint cut short", on_ckpt(lambda t, ds: ckpt_file(t, raw=good_bytes(ds)[:3000])),
     "bad.pt: not a readable checkpoint", 2),
    ("checkpoint of random bytes", on_ckpt(lambda t, ds: ckpt_file(t, raw=os.urandom(5000)), "sample"),
     "bad.pt: not a readable checkpoint", 2),
    ("empty checkpoint", on_ckpt(lambda t, ds: ckpt_file(t, raw=b""), "cluster"), "bad.pt: empty file", 2),
    ("checkpoint is a folder", on_ckpt(lambda t, ds: os.makedirs(f"{t}/dir.pt") or f"{t}/dir.pt"),
     "dir.pt: no checkpoint there (a folder)", 2),
    ("checkpoint with objects", on_ckpt(lambda t, ds: ckpt_file(t, {**ds["ckpt"], "x": Evil()})),
     "bad.pt: holds a Python object (test_errors.Evil), refused", 2),
    ("checkpoint of wrong keys", on_ckpt(lambda t, ds: ckpt_file(t, {"weights": torch.zeros(3)}), "sample"),
     "bad.pt: no 'model'", 2),
    ("checkpoint not a dict", on_ckpt(lambda t, ds: ckpt_file(t, [1, 2, 3])), "bad.pt: holds a list", 2),
    ("negative n_layer", on_ckpt(lambda t, ds: ckpt_file(t, with_args(ds, n_layer=-2)), "cluster"),
     "bad.pt: bad model_args: n_layer=-2: must be >= 1", 2),
    ("terabyte model_args", on_ckpt(lambda t, ds: ckpt_file(t, with_args(ds, n_embd=1 << 20, n_layer=1000))),
     "over the limit", 2),
    ("n_head not dividing n_embd", on_ckpt(lambda t, ds: ckpt_file(t, with_args(ds, n_head=3)), "sample"),
     "n_embd=16 is not a multiple of n_head=3", 2),
    ("model_args of a wrong type", on_ckpt(lambda t, ds: ckpt_file(t, with_args(ds, n_embd="16"))),
     "n_embd='16': should be a int", 2),
    ("weights that do not fit", on_ckpt(lambda t, ds: ckpt_file(t, with_args(ds, n_embd=32, n_head=2)), "sample"),
     "model_args ask for", 2),
    ("transition table outside the pages", on_ckpt(lambda t, ds: ckpt_file(t, with_table(ds, 10 ** 6)), "sample"),
     "transition table holds page ids outside", 2),
    ("transition table of floats", on_ckpt(lambda t, ds: ckpt_file(t, {**with_table(ds, 5), "model": {
        **with_table(ds, 5)["model"], "trans_next": torch.zeros(ds["ckpt"]["model_args"]["vocab_size"], 4)}})),
     "of integers", 2),
    ("clusters outside the sets", on_ckpt(lambda t, ds: ckpt_file(t, {**ds["ckpt"], "clusters": torch.full((60,), 3)})),
     "user -> cluster assignment", 2),
    # settings
    ("--device=cuda without CUDA", lambda t, ds: (evaluate.main, [f"--ckpt={ds['good']}", "--device=cuda"]),
     "CUDA is not available", 2),
    ("--device=gpu", lambda t, ds: (sample.main, [f"--out_dir={os.path.dirname(ds['good'])}", "--ckpt_name=good.pt",
                                                  "--device=gpu"]), "--device=gpu: not a device", 2),
    ("negative --max_users", lambda t, ds: (evaluate.main, [f"--ckpt={ds['good']}", "--max_users=-1"]),
     "--max_users=-1", 2),
    ("negative --top_k", lambda t, ds: (sample.main, [f"--out_dir={os.path.dirname(ds['good'])}",
                                                      "--ckpt_name=good.pt", "--top_k=-1"]), "--top_k=-1", 2),
    ("negative --eval_users (hetlm)", lambda t, ds: (hetlm.main, ["--eval_users=-5", f"--out_dir={t}/h"]),
     "--eval_users=-5", 2),
    ("negative --eval_users (bench)", lambda t, ds: (bench.main, ["--eval_users=-5", f"--out={t}/b.json"]),
     "--eval_users=-5", 2),
    ("negative --top_pages", lambda t, ds: (cluster.main, [f"--data_dir={ds['dir']}", "--top_pages=-1"]),
     "--top_pages=-1", 2),
    ("non-UTF-8 history file", history, "history.txt:2: not UTF-8", 2),
]


@pytest.mark.parametrize("case, build, fragment, code", CASES, ids=[c[0] for c in CASES])
def test_one_line_error_and_nothing_changed(case, build, fragment, code, ds, tmp_path, capsys, monkeypatch):
    if "cuda" in case:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    t = str(tmp_path)
    main, argv = build(t, ds, monkeypatch) if build is full_disk else build(t, ds)
    before, shared = snapshot(t), snapshot(os.path.dirname(ds["dir"]))
    got, err = run_cli(main, argv, capsys)
    assert (got, "Traceback" not in err) == (code, True), err
    line = err.strip().splitlines()[-1] if err.strip() else ""
    assert err.strip().count("\n") == 0 and line.startswith("error: ") and fragment in line, err
    assert snapshot(t) == before and snapshot(os.path.dirname(ds["dir"])) == shared


def test_gpt_config_checks_are_one_line_config_errors():
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="n_embd=64 is not a multiple of n_head=3"):
        GPT(GPTConfig(n_head=3, n_embd=64))
    with pytest.raises(ConfigError, match="over the limit"):
        check_gpt_config(GPTConfig(vocab_size=10 ** 7, n_embd=4096))
    assert issubclass(CheckpointError, ConfigError)   # so every script's run_main prints it as one line


def test_bom_csv_is_read(tmp_path, capsys):
    path = write(str(tmp_path), "log.csv", "\ufeffuser,page\nu1,a\nu1,b\nu1,c\nu2,a\n")
    data.main([path, f"--out_dir={tmp_path}/out"])
    d = data.load_data(f"{tmp_path}/out")
    assert d.user_ids() == ["u1", "u2"] and d.tokenizer.pages[4:] == ["a"]


def test_reprepare_drops_derived_files_keeps_others_and_reports_sessions(ds, tmp_path, capsys):
    out = str(tmp_path / "ds")
    shutil.copytree(ds["dir"], out)
    np.save(os.path.join(out, "clusters.npy"), np.zeros(60, dtype=np.int64))
    write(out, "notes.txt", "mine")
    # a rating log: a day between events, so 30-minute sessions would hold one event each
    log = write(str(tmp_path), "ratings.csv", "user,item,time\n" + "".join(
        f"u{u},m{(u + i) % 7},{86400 * i}\n" for u in range(5) for i in range(4)))
    data.main([log, f"--out_dir={out}", "--page_col=item", "--time_col=time", "--session_gap=1800"])
    text = capsys.readouterr().out
    assert "100% hold a single event" in text and "--session_gap=inf" in text
    assert sorted(os.listdir(out)) == sorted(["meta.json", "tokens.bin", "offsets.npy", "val_pos.npy", "test_pos.npy",
                                              "users.txt", "tokenizer.json", "events.csv.gz", "notes.txt"])
    assert data.load_data(out).n_users == 5 and not [n for n in os.listdir(tmp_path) if ".tmp" in n or ".old" in n]
    data.main([log, f"--out_dir={out}", "--page_col=item", "--time_col=time"])   # by default: one session each
    meta = data.load_data(out).meta
    assert meta["n_sessions"] == 5 and meta["session_events_median"] == 4
    assert "100% of 30-minute sessions would hold a single event" in capsys.readouterr().out


def test_prepare_killed_while_writing_leaves_the_old_folder(ds, tmp_path):
    out = str(tmp_path / "ds")
    shutil.copytree(ds["dir"], out)
    before = snapshot(out)
    log = write(str(tmp_path), "log.txt", GOOD_LOG)
    script = ("import os, signal, sys, data\n"
              "real, n = data.write_atomic, []\n"
              "def write_atomic(path, obj):\n"
              "    real(path, obj); n.append(path)\n"
              "    if len(n) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
              "data.write_atomic = write_atomic\n"
              f"data.main([{log!r}, '--out_dir={out}'])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert snapshot(out) == before and data.load_data(out).n_users == 60
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n]                      # the killed build's leftover ...
    data.main([log, f"--out_dir={out}"])
    assert data.load_data(out).n_users == 6
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n or ".old" in n]   # ... removed by the next prepare
