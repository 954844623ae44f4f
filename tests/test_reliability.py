"""Issue 21, "nothing lost in any folder a user touches": one row per failure class. Each row builds its
fixtures in a fresh folder, runs a script (in-process through its main, or as a process that is
killed), and asserts the exit code, ONE line on stderr without a traceback, and the state of the
disk afterwards. The rules under test (files.py): a script removes only what it marked as its own;
a replacement is swapped in only when complete; an out folder has one writer at a time, and a
killed writer leaves no lock and no temporary file behind."""

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
import configurator  # noqa: E402
import data  # noqa: E402
import shop  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import hetlm  # noqa: E402
import plot  # noqa: E402
import predict  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from test_errors import snapshot as full_snapshot  # noqa: E402

LOG = "".join(f"u{u} p{(u * 7 + i) % 9}\n" for u in range(30) for i in range(6))   # `user page` pairs


def snapshot(root):
    """Every file's hash under root, but the one-writer lock files of a process still running or
    killed (a normal end removes them: test_no_lock_file_is_left)."""
    return {k: v for k, v in full_snapshot(root).items() if not k.endswith(files.LOCK)}


def outside(t, name="out"):
    """snapshot(t) without the out folder a refused train.py may have made (empty of runs: checked)."""
    assert not any(n.endswith(".pt") for _, _, fs in os.walk(os.path.join(t, name)) for n in fs)
    return {k: v for k, v in snapshot(t).items() if not (k == name + "/" or k.startswith(name + "/"))}


def tiny(out_dir, data_dir, *extra):
    """train.py's flags for a run of a few seconds."""
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=6", "--eval_interval=3", "--log_interval=3",
            "--block_size=16", "--n_layer=1", "--n_embd=16", "--batch_tokens=256", "--eval_users=50", "--warmup_iters=1",
            "--time_budget=0", "--dtype=float32", "--final_eval=False", "--search=False", "--device=cpu", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small prepared dataset and a finished run on it (copied into each row that needs one)."""
    root = tmp_path_factory.mktemp("world")
    ds = str(root / "ds")
    shop.make_builtin(ds, n_users=80)
    train.main(tiny(str(root / "run"), ds))
    return {"ds": ds, "run": str(root / "run")}


def invoke(main, argv, capsys):
    """-> (exit code, stderr) of a script's main run in-process; a normal return is 0."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    return code, capsys.readouterr().err


def one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("note:", "\r"))]
    return len(lines) == 1 and "Traceback" not in err


def killed_process(script, t):
    """Run python -c script in t (cwd = the repository); it must die of SIGKILL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]


# --- the rows: each returns (exit code, stderr) after its own set-up, and checks the disk itself ------

def backup_folders_beside_a_dataset_are_kept(t, w, capsys):
    """Issue item 1: NAME.old<digits> / NAME.tmp<digits> folders that we did not mark are a user's."""
    os.makedirs(f"{t}/data/mysite.old20241130")
    os.makedirs(f"{t}/data/mysite.tmp999999")
    for d in ("mysite.old20241130", "mysite.tmp999999"):
        with open(f"{t}/data/{d}/notes.txt", "w") as f:
            f.write("my notes\n")
    with open(f"{t}/log.txt", "w") as f:
        f.write(LOG)
    before = snapshot(f"{t}/data")
    code, err = invoke(data.main, [f"{t}/log.txt", f"--out_dir={t}/data/mysite"], capsys)
    after = snapshot(f"{t}/data")
    assert {k: v for k, v in after.items() if not k.startswith("mysite/")} == before   # all of theirs, as it was
    return code, err


def prepare_into_a_raw_data_folder(t, w, capsys):
    """Item 4: a folder of the user's files that is not a dataset is never written into."""
    os.makedirs(f"{t}/raw")
    for name, text in (("log.txt", LOG), ("users.txt", "my own list\n")):
        with open(f"{t}/raw/{name}", "w") as f:
            f.write(text)
    before = snapshot(t)
    code, err = invoke(data.main, [f"{t}/raw/log.txt", f"--out_dir={t}/raw"], capsys)
    assert snapshot(t) == before
    return code, err


def users_dataset_in_data_builtin(t, w, capsys, monkeypatch):
    """Item 5: a plain train.py (default --data_dir) trains on the user's data/builtin, never replaces it."""
    with open(f"{t}/log.txt", "w") as f:
        f.write(LOG)
    monkeypatch.chdir(t)
    data.main([f"{t}/log.txt", "--out_dir=data/builtin"])
    before = snapshot(f"{t}/data")
    flags = [a for a in tiny(f"{t}/out", "x") if not a.startswith("--data_dir")]
    code, err = invoke(train.main, flags, capsys)
    assert snapshot(f"{t}/data") == before and os.path.isfile(f"{t}/out/stage1/best.pt")
    return code, "error: (none)\n" if code == 0 else err


def overwrite_with_a_setting_that_fails(t, w, capsys):
    """Item 2: --overwrite=True with a setting that fails at start-up leaves the old run whole."""
    shutil.copytree(w["run"], f"{t}/run")
    before = snapshot(t)
    code, err = invoke(train.main, tiny(f"{t}/run", w["ds"], "--overwrite=True", "--n_head=3", "--n_embd=64"), capsys)
    assert snapshot(t) == before
    code2, err2 = invoke(train.main, tiny(f"{t}/run", w["ds"], "--overwrite=True", "--n_clusters=2"), capsys)
    assert code2 == 2 and one_line(err2) and snapshot(t) == before
    return code, err


def overwrite_its_own_starting_point(t, w, capsys):
    """Item 2: --overwrite=True --init_from= that run's own best.pt is refused, nothing deleted."""
    shutil.copytree(w["run"], f"{t}/run")
    before = snapshot(t)
    code, err = invoke(train.main, tiny(f"{t}/run", w["ds"], "--overwrite=True",
                                        f"--init_from={t}/run/stage1/best.pt"), capsys)
    assert snapshot(t) == before
    return code, err


def two_writers_in_one_out_folder(t, w, capsys):
    """Item 3: a second train.py in an out folder that another process writes is refused; once that
    process is killed (-9), the lock is gone with it and the run goes on."""
    shutil.copytree(w["run"], f"{t}/run")
    before = snapshot(t)
    holder = subprocess.Popen([sys.executable, "-c", f"import files, time; files.hold({t + '/run'!r}, 'train.py'); "
                               "print('held', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == b"held"
        code, err = invoke(train.main, tiny(f"{t}/run", w["ds"], "--init_from=resume", "--max_iters=9"), capsys)
        assert snapshot(t) == before and "pid" in err
    finally:
        holder.kill()
        holder.wait()
    code2, _ = invoke(train.main, tiny(f"{t}/run", w["ds"], "--init_from=resume", "--max_iters=9"), capsys)
    assert code2 == 0 and torch.load(f"{t}/run/stage1/ckpt.pt", weights_only=True)["iter_num"] == 9
    return code, err


def two_prepares_into_one_folder(t, w, capsys):
    """One writer per dataset folder too: a prepare while another runs into the same folder is refused."""
    shutil.copytree(w["ds"], f"{t}/ds")
    with open(f"{t}/log.txt", "w") as f:
        f.write(LOG)
    before = snapshot(t)
    holder = subprocess.Popen([sys.executable, "-c", f"import files, time; files.hold({t + '/ds'!r}, 'data.py', "
                               f"lock={t + '/.ds' + files.LOCK!r}); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == b"held"
        code, err = invoke(data.main, [f"{t}/log.txt", f"--out_dir={t}/ds"], capsys)
        assert snapshot(t) == before
    finally:
        holder.kill()
        holder.wait()
    return code, err


def resume_after_a_kill_in_the_report(t, w, capsys, monkeypatch):
    """Item 6: the time budget moved a run's end; it was killed (Ctrl-C) in its final report. A resume
    only finishes the report: no training, best.pt and ckpt.pt as they were."""
    real = runtime.replan
    monkeypatch.setattr(runtime, "replan", lambda cfg, it, *a: 6 if it < 6 else real(cfg, it, *a))   # the budget: end at 6
    monkeypatch.setattr(train, "final_report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    flags = tiny(f"{t}/run", w["ds"], "--max_iters=12", "--time_budget=60", "--final_eval=True")
    code, err = invoke(train.main, flags, capsys)
    assert code == 130 and one_line(err) and "Ctrl-C" in err
    ck = torch.load(f"{t}/run/stage1/ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 6 and ck["finished"] == "its end was moved to iteration 6"
    before = snapshot(t)
    monkeypatch.setattr(runtime, "replan", real)
    reports = []
    monkeypatch.setattr(train, "final_report", lambda *a, **k: reports.append(a) or {})
    code, err = invoke(train.main, [*flags, "--init_from=resume"], capsys)
    assert reports and {k: v for k, v in snapshot(t).items() if not k.endswith("metrics.jsonl")} == \
        {k: v for k, v in before.items() if not k.endswith("metrics.jsonl")}
    return code, "error: (none)\n" if code == 0 else err


def prepare_killed_between_its_renames(t, w, capsys):
    """Leftover 1: a kill between data.py's two renames leaves no dataset folder: train.py says where
    the data is, and the next prepare puts it back before replacing it."""
    shutil.copytree(w["ds"], f"{t}/ds")
    with open(f"{t}/log.txt", "w") as f:
        f.write(LOG)
    killed_process("import os, signal, data\n"
                   "real = os.rename\n"
                   "def rename(a, b):\n"
                   "    real(a, b)\n"
                   "    if '.old' in b: os.kill(os.getpid(), signal.SIGKILL)\n"
                   "os.rename = rename\n"
                   f"data.main([{t + '/log.txt'!r}, '--out_dir={t}/ds'])\n", t)
    assert not os.path.exists(f"{t}/ds")
    code, err = invoke(train.main, tiny(f"{t}/out", f"{t}/ds"), capsys)
    assert f"{t}/ds.old" in err and not os.path.exists(f"{t}/out/stage1/ckpt.pt")
    data.main([f"{t}/log.txt", f"--out_dir={t}/ds"])
    assert data.load_data(f"{t}/ds").n_users == 30 and sorted(os.listdir(t)) == ["ds", "log.txt", "out"]
    return code, err


def checkpoint_write_killed(t, w, capsys):
    """kill -9 in the middle of a checkpoint write: the previous ckpt.pt is whole, no temporary file is
    left, and the run resumes."""
    killed_process("import os, signal, torch, train\n"
                   "real, n = torch.save, []\n"
                   "def save(obj, f, *a, **k):\n"
                   "    n.append(1)\n"
                   "    if len(n) == 3:\n"
                   "        f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
                   "    real(obj, f, *a, **k)\n"
                   "torch.save = save\n"
                   f"train.main({tiny(t + '/run', w['ds'])!r})\n", t)
    assert sorted(os.listdir(f"{t}/run/stage1")) == ["best.pt", "ckpt.pt", "metrics.jsonl"]
    assert torch.load(f"{t}/run/stage1/ckpt.pt", weights_only=True)["iter_num"] == 3
    return invoke(train.main, tiny(f"{t}/run", w["ds"], "--init_from=resume"), capsys)[0], "error: (none)\n"


def predict_killed_while_writing(t, w, capsys):
    """Leftover 2: a killed predict.py leaves no file at all (the output is unnamed until complete)."""
    shutil.copytree(w["run"], f"{t}/run")
    before = snapshot(t)
    killed_process("import os, signal, predict\n"
                   "real = predict.Predictor.rank\n"
                   "def rank(self, *a, **k):\n"
                   "    for i, row in enumerate(real(self, *a, **k)):\n"
                   "        if i == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
                   "        yield row\n"
                   "predict.Predictor.rank = rank\n"
                   f"predict.main(['--out_dir={t}/run/stage1'])\n", t)
    assert snapshot(t) == before
    return 0, "error: (none)\n"


def predict_interrupted(t, w, capsys, monkeypatch):
    """Ctrl-C while predict.py writes: one line, exit 130, no file."""
    shutil.copytree(w["run"], f"{t}/run")
    before = snapshot(t)
    real = predict.Predictor.rank

    def rank(self, *a, **k):
        for i, row in enumerate(real(self, *a, **k)):
            if i == 5:
                raise KeyboardInterrupt
            yield row
    monkeypatch.setattr(predict.Predictor, "rank", rank)
    code, err = invoke(predict.main, [f"--out_dir={t}/run/stage1", "--output=" + f"{t}/run/top.jsonl"], capsys)
    assert snapshot(t) == before
    return code, err


def predict_output_is_a_folder(t, w, capsys):
    shutil.copytree(w["run"], f"{t}/run")
    os.makedirs(f"{t}/run/top.csv")
    before = snapshot(t)
    code, err = invoke(predict.main, [f"--out_dir={t}/run/stage1", f"--output={t}/run/top.csv"], capsys)
    assert snapshot(t) == before
    return code, err


def plot_log_with_a_binary_line(t, w, capsys):
    with open(f"{t}/metrics.jsonl", "wb") as f:
        f.write(b'{"kind": "train", "iter": 1, "train_nll": 3.0}\n\xff\xfe\x00\x81garbage\n')
    return invoke(lambda argv: configurator.run_main(lambda c: plot.read_log(f"{t}/metrics.jsonl"), {}, argv), [], capsys)


def plot_log_without_the_plotted_fields(t, w, capsys):
    with open(f"{t}/metrics.jsonl", "w") as f:
        f.write('{"kind": "val", "iter": 3, "hr@10": 0.5}\n')
    return invoke(lambda argv: configurator.run_main(lambda c: plot.read_log(f"{t}/metrics.jsonl"), {}, argv), [], capsys)


def train_on_a_vocabulary_without_pages(t, w, capsys):
    with open(f"{t}/log.txt", "w") as f:
        f.write(LOG)
    data.prepare(f"{t}/log.txt", f"{t}/ds")
    d = data.load_data(f"{t}/ds")                                      # every page made <unk>, by hand
    tokens = np.array(d.tokens)
    tokens[tokens >= 4] = 1
    tokens.astype(np.uint32).tofile(f"{t}/ds/tokens.bin")
    with open(f"{t}/ds/tokenizer.json", "w") as f:
        json.dump({"pages": d.tokenizer.pages[:4], "counts": [0, 0, 0, 0], "min_count": 1}, f)
    meta = json.load(open(f"{t}/ds/meta.json"))
    meta.update(vocab_size=4, n_pages=0)
    meta["anchor"].update(ids=[], n_anchors=0)
    with open(f"{t}/ds/meta.json", "w") as f:
        json.dump(meta, f)
    before = outside(t)
    code, err = invoke(train.main, tiny(f"{t}/out", f"{t}/ds"), capsys)
    assert outside(t) == before
    return code, err


def train_on_a_dataset_without_evaluable_users(t, w, capsys):
    with open(f"{t}/log.txt", "w") as f:
        f.write("".join(f"u{u} p{u % 5}\nu{u} p{(u + 1) % 5}\n" for u in range(40)))   # 2 events each
    data.prepare(f"{t}/log.txt", f"{t}/ds")                            # the Python API does not refuse it
    before = outside(t)
    code, err = invoke(train.main, tiny(f"{t}/out", f"{t}/ds"), capsys)
    assert outside(t) == before
    return code, err


def clusters_file_holding_a_pickle(t, w, capsys):
    np.save(f"{t}/clusters.npy", np.array([{"a": 1}] * 80, dtype=object), allow_pickle=True)
    before = outside(t)
    code, err = invoke(train.main, tiny(f"{t}/out", w["ds"], "--n_clusters=2", f"--clusters={t}/clusters.npy"), capsys)
    assert outside(t) == before
    return code, err


def evaluate_outcome_on_a_page_split(t, w, capsys):
    return invoke(evaluate.main, [f"--ckpt={w['run']}/stage1/best.pt", "--outcome=purchase", "--max_users=10"], capsys)


def pairs_file_with_malformed_lines(t, w, capsys):
    lines = LOG.splitlines()
    bad = "\n".join(ln + (" extra" if i % 3 == 0 else "") for i, ln in enumerate(lines)) + "\n"   # a third malformed
    with open(f"{t}/log.txt", "w") as f:
        f.write(bad)
    code, err = invoke(data.main, [f"{t}/log.txt", f"--out_dir={t}/ds"], capsys)
    assert not os.path.exists(f"{t}/ds")
    return code, err


def out_dir_is_a_file(t, w, capsys):
    with open(f"{t}/out", "w") as f:
        f.write("mine\n")
    before = snapshot(t)
    code, err = invoke(train.main, tiny(f"{t}/out", w["ds"]), capsys)
    assert snapshot(t) == before
    return code, err


ROWS = [   # (row, exit code, a fragment of the one line)
    (backup_folders_beside_a_dataset_are_kept, 0, ""),
    (prepare_into_a_raw_data_folder, 2, "is not a prepared dataset"),
    (users_dataset_in_data_builtin, 0, ""),
    (overwrite_with_a_setting_that_fails, 2, "n_embd=64"),
    (overwrite_its_own_starting_point, 2, "its own starting point"),
    (two_writers_in_one_out_folder, 2, "another process is writing there"),
    (two_prepares_into_one_folder, 2, "another process is writing there"),
    (resume_after_a_kill_in_the_report, 0, ""),
    (prepare_killed_between_its_renames, 2, "rename that back, or prepare again"),
    (checkpoint_write_killed, 0, ""),
    (predict_killed_while_writing, 0, ""),
    (predict_interrupted, 130, "interrupted (Ctrl-C)"),
    (predict_output_is_a_folder, 2, "is a folder"),
    (plot_log_with_a_binary_line, 2, "metrics.jsonl:2: not a metrics record"),
    (plot_log_without_the_plotted_fields, 2, "without nll, ndcg@10"),
    (train_on_a_vocabulary_without_pages, 2, "holds no page"),
    (train_on_a_dataset_without_evaluable_users, 2, "no user has a validation and a test target"),
    (clusters_file_holding_a_pickle, 2, "not a .npy array of cluster ids"),
    (evaluate_outcome_on_a_page_split, 2, "scored on the session task only"),
    (pairs_file_with_malformed_lines, 2, "--format=pairs"),
    (out_dir_is_a_file, 2, "exists and is not a folder"),
]


@pytest.mark.parametrize("row,code,fragment", ROWS, ids=[r[0].__name__ for r in ROWS])
def test_reliability(row, code, fragment, world, tmp_path, capsys, monkeypatch):
    kw = {"monkeypatch": monkeypatch} if "monkeypatch" in row.__code__.co_varnames[:row.__code__.co_argcount] else {}
    got, err = row(str(tmp_path), world, capsys, **kw)
    assert got == code, err
    if code:
        assert one_line(err), err
        assert fragment in err, err


def test_hetlm_reads_a_cut_short_done_json_as_not_done(tmp_path, capsys):
    path = tmp_path / "done.json"
    path.write_text('{"max_iters": 3, "da')
    assert hetlm.read_json(str(path)) is None and "trained again" in capsys.readouterr().out


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_output(str(target)) as f:
            f.write("new, half")
            raise RuntimeError
    assert os.listdir(tmp_path) == ["out.csv"] and target.read_text() == "old\n"
    with files.atomic_output(str(target)) as f:
        f.write("new\n")
    assert os.listdir(tmp_path) == ["out.csv"] and target.read_text() == "new\n"


def test_atomic_output_without_unnamed_files(tmp_path, monkeypatch):
    """Where O_TMPFILE is missing (macOS, Windows, no /proc): a named temporary file, removed on error."""
    monkeypatch.setattr(files, "unnamed_file", lambda folder: None)
    test_atomic_output_leaves_nothing_on_error(tmp_path)
    with files.atomic_output(str(tmp_path / "b.bin"), "wb") as f:
        f.write(b"a\nb")
    assert (tmp_path / "b.bin").read_bytes() == b"a\nb"


def test_no_lock_file_is_left_and_holds_nest(world, tmp_path, capsys):
    """A normal end removes the lock files; a folder held twice in one process stays held until the last release."""
    shutil.copytree(world["ds"], tmp_path / "ds")
    (tmp_path / "log.txt").write_text(LOG)
    data.main([str(tmp_path / "log.txt"), f"--out_dir={tmp_path / 'ds'}"])
    code, _ = invoke(train.main, tiny(str(tmp_path / "run"), str(tmp_path / "ds")), capsys)
    assert code == 0
    assert not [p for p in full_snapshot(str(tmp_path)) if p.endswith(files.LOCK)]
    files.hold(str(tmp_path / "x"))
    files.hold(str(tmp_path / "x"))
    files.release(str(tmp_path / "x"))
    assert (tmp_path / "x" / files.LOCK).exists()
    files.release(str(tmp_path / "x"))
    assert not (tmp_path / "x" / files.LOCK).exists()


def test_a_search_start_inside_the_cleared_folder_is_refused(world, tmp_path, capsys):
    """--overwrite=True with a starting checkpoint anywhere in the stage folder (its search/ too)."""
    shutil.copytree(world["run"], tmp_path / "run")
    os.makedirs(tmp_path / "run" / "stage1" / "search" / "c2" / "stage1")
    shutil.copy(tmp_path / "run" / "stage1" / "best.pt", tmp_path / "run" / "stage1" / "search" / "c2" / "stage1")
    before = snapshot(str(tmp_path))
    code, err = invoke(train.main, tiny(str(tmp_path / "run"), world["ds"], "--overwrite=True",
                                        f"--init_from={tmp_path}/run/stage1/search/c2/stage1/best.pt"), capsys)
    assert code == 2 and one_line(err) and "its own starting point" in err and snapshot(str(tmp_path)) == before


def test_a_resume_that_asks_for_more_trains_on(world, tmp_path, capsys):
    """A run that ran its plan, resumed with a larger --max_iters, trains on (the finished flag only
    stops a resume that asks for nothing new)."""
    shutil.copytree(world["run"], tmp_path / "run")
    code, _ = invoke(train.main, tiny(str(tmp_path / "run"), world["ds"], "--init_from=resume"), capsys)
    assert code == 0 and torch.load(tmp_path / "run" / "stage1" / "ckpt.pt", weights_only=True)["iter_num"] == 6
    code, _ = invoke(train.main, tiny(str(tmp_path / "run"), world["ds"], "--init_from=resume", "--max_iters=9"), capsys)
    assert code == 0 and torch.load(tmp_path / "run" / "stage1" / "ckpt.pt", weights_only=True)["iter_num"] == 9
