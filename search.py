"""
Settings chosen on validation within the time budget: successive halving over the settings the
rules cannot know.

recipe.py derives the model and schedule from the data's statistics. Regularization it cannot
derive: on a log where nine events in ten revisit a page the user has seen, dropout 0.1 over-fits
within a few epochs, while on a long-session log it is right; whether a context longer than the
rules' pays where histories are long is the same kind of question. So where the time budget has
room, stage 1 trains a few candidates and keeps the one that validates best:

  candidates  the rules' settings first; then, for each setting left "from the data" that the rules
              cannot pin down, the alternatives: dropout 0.1 / 0.25 / 0.5, and where one user in ten
              has a longer history than the rules' context, twice that context.
  schedule    successive halving (Jamieson & Talwalkar 2016, the inner loop of Hyperband): every
              candidate trains on its own full schedule (the one it would follow alone) up to
              rung 0's iteration b; the best third go on to 3b (with the rules' settings, so the
              last rung can weigh the best against them), and so on until one is left. The
              winner is not retrained: it trains on to the end of its schedule as the run. So the
              candidates are compared on the schedule they would be trained on, nothing is trained
              twice, and there is no model of the response surface to fit (a handful of candidates).
  budget      the rules' candidate trains first, in the run's own folder, to 1/8 of its
              iterations; its speed then tells what the run costs alone (C). The losing candidates
              may spend what the budget leaves beside C, and at most 2C (a run takes at most three
              times as long as without a search, and never longer than the budget): b is the
              largest of 1/2, 1/4, 1/8 of the schedule whose losers fit in that (3 candidates: b is
              half the schedule wherever the budget allows; 6 candidates: 1/8, then 3/8). Where nothing fits (a log that fills the budget with one run), the rules'
              candidate trains on as the run: the rules alone, and no time was lost.
  selection   by the run's best_metric at each candidate's best validation so far (the same
              validation users for all). The best of several noisy validations is optimistic, and on
              a small log most of a gap between candidates is noise, so at the last rung a
              candidate replaces the rules' settings only where its per-user gain over them exceeds
              one standard error, widened for the number of challengers (one_se_winner); the test
              split is never looked at. A candidate that could not fit in the budget, or whose
              loss diverged, loses.

Every candidate, its iterations and validation score are printed, written to search.json in the
stage folder (a killed run resumes the search from there: `--init_from=resume`), stored in the
run's ckpt.pt and in results.json. The candidates' folders are stage1/search/c1, c2, ... (c1: the
rules' settings; their best.pt stay, their optimizer states go). --search=False turns it off; a
setting given explicitly is never searched. A seed reproduces a search wherever the rules'
candidate runs at about the same speed (the plan reads its speed only to pick b from the ladder;
with --time_budget=0 it does not read it at all).
"""
import json
import math
import os
import shutil
from statistics import NormalDist

import numpy as np

from configurator import ConfigError
from files import write_atomic
from evaluate import LOWER_IS_BETTER
from recipe import AUTO, data_stats, derive

ETA = 3                        # successive halving keeps the best third at each rung
LADDER = (1 / 2, 1 / 4, 1 / 8)  # rung 0 at this fraction of the schedule, the largest that fits
DROPOUTS = (0.1, 0.25, 0.5)    # the rules' 0.1; 0.2-0.5 won by hand on repeat-heavy and small logs


def applies(cfg):
    """A search runs in stage 1, from scratch or resuming one, on one process, when asked
    (search=True) and some searched setting is left "from the data"."""
    return (cfg.get('search', False) and cfg['stage'] == 1 and cfg['init_from'] in ('scratch', 'resume')
            and 'RANK' not in os.environ                  # not under torchrun: one process trains the candidates
            and (cfg['dropout'] == AUTO['dropout'] or cfg['block_size'] == AUTO['block_size']))


def candidates(cfg, stats):
    """[(name, settings)]: the rules' settings first ({}: nothing overridden), then the
    alternatives for the searched settings the user left "from the data"."""
    rules, _ = derive(cfg, stats)
    drops = [rules['dropout']]
    if cfg['dropout'] == AUTO['dropout']:
        drops += [d for d in DROPOUTS if d != rules['dropout']]
    blocks = [rules['block_size']]
    if cfg['block_size'] == AUTO['block_size'] and stats['len_p90'] > rules['block_size']:
        blocks.append(2 * rules['block_size'])
    out = []
    for block in blocks:
        for drop in drops:
            s = {k: v for k, v in (('dropout', drop), ('block_size', block)) if v != rules[k]}
            out.append((", ".join(f"{k} {v:g}" for k, v in (('dropout', drop), ('block_size', block))), s))
    return out


def rungs(n, b, max_iters, eta=ETA):
    """[(iteration, best kept, going on at worst)] of successive halving over n candidates with rung 0
    at iteration b. Before the last rung the rules' settings go on too, best or not (the last rung
    weighs every challenger against them: one_se_winner), so at worst one more goes on."""
    out, alive, t = [], n, b
    while alive > 1:
        keep = max(1, math.ceil(alive / eta))
        going_on = keep + (keep > 1 and keep < alive)
        out.append((min(t, max_iters), keep, going_on))
        alive, t = going_on, t * eta
    return out


def loser_iters(n, b, max_iters, eta=ETA):
    """Iterations trained by the candidates that lose (the winner's are the run's own), at worst."""
    total, alive = 0, n
    for t, _, going_on in rungs(n, b, max_iters, eta):
        total += (alive - going_on) * t
        alive = going_on
    return total


def aligned(x, eval_interval):
    """x rounded to a multiple of eval_interval (a rung ends on a validation), at least one."""
    return max(eval_interval, int(round(x / eval_interval)) * eval_interval)


def plan(n, max_iters, eval_interval, sec_per_iter, budget_sec):
    """Rung 0's iteration b, or None where no rung fits: the losers' time at most what the budget
    leaves beside the run alone (cost = max_iters * sec_per_iter) and at most twice that cost."""
    cost = max_iters * sec_per_iter
    room = min(2 * cost, budget_sec - cost) if budget_sec > 0 else 2 * cost
    for f in LADDER:
        b = aligned(f * max_iters, eval_interval)
        if b < max_iters and loser_iters(n, b, max_iters) * sec_per_iter <= room:
            return b
    return None


def one_se_winner(scores, users, lower_is_better, default=0):
    """The index with the best score, except that the default (the rules' settings) stays unless the
    best beats it, user by user, by more than z standard errors of the mean difference, z the
    one-sided 84% point (one standard error) corrected for the number of challengers (Bonferroni:
    the best of m noisy challengers is optimistic). Users without a value (NaN) are left out.
    Returns (index, reason)."""
    order = sorted(scores, key=lambda i: scores[i], reverse=not lower_is_better)
    best = order[0]
    if best == default or default not in scores:
        return best, "best validation"
    a, b = users.get(best), users.get(default)
    if a is None or b is None or len(a) != len(b):
        return best, "best validation (no per-user scores to compare)"
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)] * (-1 if lower_is_better else 1)            # > 0: the challenger is better
    z = NormalDist().inv_cdf(1 - 0.1587 / max(1, len(scores) - 1))     # 1.0 for one challenger
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    if d.mean() > z * se:
        return best, f"beats the rules' settings by {d.mean():.4f} per user > {z:.2f} standard errors ({se:.4f})"
    return default, (f"the best candidate's gain over the rules' settings ({d.mean():+.4f} per user) is within "
                     f"{z:.2f} standard errors ({se:.4f}): kept the rules' settings")


def read_state(path):
    try:
        with open(path, encoding='utf-8') as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get('phase') not in ('probe', 'search', 'swap', 'final'):
            raise ValueError('not a search state')
        return state
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable settings search ({e}); start afresh with --overwrite=True") from None


def write_state(path, state):
    try:
        write_atomic(path, state)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the settings search ({e})") from None


def record(trial, run, stop):
    """What the search keeps of a candidate after it trained: iterations, best validation, time."""
    done = run.iter_num >= run.cfg['max_iters']
    trial.update(iters=run.iter_num, best=run.best_val, best_iter=run.best_iter, elapsed=round(run.elapsed(), 1),
                 finished=trial.get('finished') or stop or ('done' if done else None))


def summary(state):
    """The search in a few lines (printed at its end; stored in search.json and the checkpoints)."""
    lines = [f"settings search (successive halving, rung 0 at iteration {state['b']:,} of {state['max_iters']:,}; "
             f"{state['metric']} on validation):"]
    for i, t in enumerate(state['trials']):
        mark = " <- chosen" if i == state.get('winner') else ("" if t['alive'] else f" ({t.get('why', 'stopped')})")
        best = 'n/a' if t['best'] is None else f"{t['best']:.4f}"
        lines.append(f"  {i + 1}. {t['name']:<28} {best} at iteration {t['best_iter']:,} of {t['iters']:,} trained, "
                     f"{t['elapsed']:.0f} s{mark}")
    if state.get('why'):
        lines.append(f"  chosen: {state['why']}")
    return "\n".join(lines)


def run(cfg, Run):
    """Stage 1 with the search; returns (the run, why it stopped) for Run.finish. Run: train.Run.
    The search goes through phases recorded in search.json, so a kill at any point resumes:
    probe (the rules' candidate, in the run's folder, to 1/8 of its schedule), search (the rungs),
    swap (the winner's files move into the run's folder), final (the winner trains on as the run)."""
    stage_dir = os.path.join(cfg['out_dir'], 'stage1')
    path, trials_dir = os.path.join(stage_dir, 'search.json'), os.path.join(stage_dir, 'search')
    resume = cfg['init_from'] == 'resume'
    state = read_state(path) if resume and os.path.isfile(path) else None
    if state is not None and state['phase'] == 'swap':              # killed while the files moved
        swap(state['winner'], stage_dir, trials_dir)
        state['phase'] = 'final'
        write_state(path, state)
    if resume and (state is None or state['phase'] == 'final'):     # a run without a search, or its winner
        r = Run(dict(cfg, time_budget=time_left(cfg, state)))
        return r, (state or {}).get('stopped') or r.fit()
    first = Run(cfg)                      # the rules' candidate, in the run's own folder (claimed here)
    if state is None and os.path.isfile(path):   # a new run: the last search (ours: search.json says so) goes
        os.remove(path)
        shutil.rmtree(trials_dir, ignore_errors=True)
    cands = candidates(cfg, first.stats or data_stats(first.data))   # the stats the rules just read
    if len(cands) == 1:
        return first, first.fit()
    lower = first.cfg['best_metric'] in LOWER_IS_BETTER
    state = start_state(path, state, first, cands, cfg)
    if state['phase'] == 'probe':
        room, stop = probe(cfg, path, state, first, cands)
        if not room:
            return first, stop or first.fit()
    runs = Trials(cfg, Run, state, trials_dir, first)
    climb(cfg, path, state, runs, lower)
    return crown(cfg, path, state, runs, stage_dir, trials_dir)


def start_state(path, state, first, cands, cfg):
    """A new search's state (written to search.json), or a resumed one's, checked against cands."""
    if state is None:
        state = {'phase': 'probe', 'max_iters': first.cfg['max_iters'], 'metric': first.cfg['best_metric'],
                 'dtype': first.cfg['dtype'], 'seed': cfg['seed'], 'b': 0,
                 'trials': [{'name': n, 'settings': s, 'alive': True, 'iters': 0, 'best': None, 'best_iter': 0,
                             'elapsed': 0.0, 'finished': None} for n, s in cands]}
        write_state(path, state)
    elif [t['name'] for t in state['trials']] != [n for n, _ in cands]:
        raise ConfigError(f"{path}: the search was started with other settings ({'; '.join(t['name'] for t in state['trials'])}); "
                          "resume it with the same flags, or start afresh with --overwrite=True")
    return state


def probe(cfg, path, state, first, cands):
    """The rules' candidate trains to the probe rung; its speed says whether the budget has room
    for the others (then state gets rung 0 and the phase 'search'). Returns (room, why it stopped)."""
    trials, n_iters = state['trials'], state['max_iters']
    b0 = aligned(LADDER[-1] * n_iters, first.cfg['eval_interval'])
    print(f"search: {len(cands)} candidates ({'; '.join(n for n, _ in cands)}); the rules' settings train "
          f"first to iteration {b0:,}, then their speed says whether the budget has room for the others")
    stop = first.fit(pause_at=b0)
    record(trials[0], first, stop)
    sec = first.elapsed() / max(1, first.iter_num)
    fits = first.cfg['max_iters'] >= n_iters      # the time budget did not shorten the plan
    b = plan(len(cands), n_iters, first.cfg['eval_interval'], sec, cfg['time_budget'] * 60) if fits else None
    if b is None:
        print(f"search: no room in the time budget for other candidates (the run alone takes about "
              f"{n_iters * sec / 60:.1f} min): the rules' settings train on")
        os.remove(path)                              # nothing was searched: a plain run from here on
        return False, stop
    state.update(phase='search', b=b, sec_per_iter=sec)
    write_state(path, state)
    print(f"search: rung 0 at iteration {b:,} of {n_iters:,}, then the best third on to {ETA}x that")
    return True, stop


class Trials:
    """The candidates' runs, each built when first needed in its own folder search/c{i + 1} (a
    resumed search rebuilds them from their checkpoints); the rules' candidate is the run itself."""

    def __init__(self, cfg, Run, state, trials_dir, first):
        self.cfg, self.Run, self.state, self.trials_dir = cfg, Run, state, trials_dir
        self.runs = {0: first}

    def __call__(self, i):
        if i not in self.runs:
            folder = os.path.join(self.trials_dir, f"c{i + 1}")   # ours: a new run removes the last search's
            has = os.path.isfile(os.path.join(folder, 'stage1', 'ckpt.pt'))
            self.runs[i] = self.Run(dict(self.cfg, **self.state['trials'][i]['settings'], out_dir=folder,
                                         time_budget=0.0, dtype=self.state['dtype'],
                                         init_from='resume' if has else 'scratch', overwrite=True), verbose=False)
        return self.runs[i]

    def drop(self, i):
        self.runs.pop(i, None)

    def keep_only(self, i):
        self.runs = {i: self.runs[i]}


def climb(cfg, path, state, runs, lower):
    """Successive halving: at each rung the live candidates train on to it, then the best `keep`
    (and the rules' candidate) go on; at the last, the one-SE rule picks one (state['why'])."""
    trials, n_iters, users = state['trials'], state['max_iters'], {}
    budget = cfg['time_budget'] * 60
    for t_rung, keep, _ in rungs(len(trials), state['b'], n_iters):
        alive = [i for i, t in enumerate(trials) if t['alive']]
        if len(alive) <= keep:
            continue                                     # a rung a resumed search had finished
        for i in alive:
            t = trials[i]
            if t['finished'] or t['iters'] >= t_rung:
                continue
            spent = sum(x['elapsed'] for x in trials)    # and were this one to win, its whole schedule:
            if budget and i != 0 and spent + (n_iters - t['iters']) * state['sec_per_iter'] > budget:
                t.update(alive=False, why='no time left in the budget')   # the winner must still fit
                continue
            r = runs(i)
            print(f"search: candidate {i + 1} of {len(trials)} ({t['name']}): iterations {r.iter_num:,} -> {t_rung:,}")
            try:
                stop = r.fit(pause_at=t_rung)
            except ConfigError as e:                     # e.g. this candidate's loss diverged: it loses
                t.update(alive=False, why=f"failed: {e}")
                runs.drop(i)
                write_state(path, state)
                continue
            record(t, r, stop)
            write_state(path, state)
        alive = [i for i, t in enumerate(trials) if t['alive'] and t['best'] is not None]
        for i in alive:
            users[i] = runs(i).best_users
        scores = {i: trials[i]['best'] for i in alive}
        if keep == 1 or len(alive) <= 1:
            winner, why = one_se_winner(scores, users, lower)
            survivors, state['why'] = [winner], why
        else:   # the best `keep` go on, and the rules' settings with them (the last rung compares against them)
            survivors = sorted(scores, key=lambda i: scores[i], reverse=not lower)[:keep]
            survivors += [0] if 0 in scores and 0 not in survivors else []
        for i, t in enumerate(trials):
            if t['alive'] and i not in survivors:
                t.update(alive=False, why=t.get('why') or 'stopped')
                runs.drop(i)
        write_state(path, state)


def crown(cfg, path, state, runs, stage_dir, trials_dir):
    """The winner becomes the run: its files move into the run's folder (phase swap, then final),
    the losers' optimizer states go, and it trains on with the budget the others left."""
    trials = state['trials']
    winner = next(i for i, t in enumerate(trials) if t['alive'])
    w = runs(winner)
    runs.keep_only(winner)
    state.update(winner=winner, phase='swap' if winner != 0 else 'final',
                 stopped=None if trials[winner]['finished'] in (None, 'done') else trials[winner]['finished'])
    write_state(path, state)
    if winner != 0:   # the winner's files take the run's folder; the rules' candidate's go to search/c1
        swap(winner, stage_dir, trials_dir)
        w.stage_dir, w.ckpt_path, w.best_path = stage_dir, *(os.path.join(stage_dir, f) for f in ('ckpt.pt', 'best.pt'))
        state['phase'] = 'final'
        write_state(path, state)
    for i, t in enumerate(trials):                       # the losers' optimizer states are not needed
        ckpt = os.path.join(trials_dir, f"c{i + 1}", 'stage1', 'ckpt.pt')
        if i != winner and os.path.isfile(ckpt):
            os.remove(ckpt)
    print(summary(state))
    w.cfg.update(out_dir=cfg['out_dir'], time_budget=time_left(cfg, state), init_from=cfg['init_from'])
    w.search = state
    w.save(w.ckpt_path)                                  # the run's checkpoint carries the search
    if state['stopped']:
        return w, state['stopped']
    return w, w.fit()


def time_left(cfg, state):
    """The time budget (minutes) left to the winner: the budget less the losing candidates' time."""
    if not cfg['time_budget'] or not state or 'winner' not in state:
        return cfg['time_budget']
    spent = sum(t['elapsed'] for i, t in enumerate(state['trials']) if i != state['winner'])
    return max(1e-3, cfg['time_budget'] - spent / 60)


def swap(winner, stage_dir, trials_dir):
    """Move the rules' candidate's files out of the run's folder (to search/c1) and the winner's in.
    Each move happens once (a file moves only where its source still exists and its place is free),
    so a swap killed half-way is finished by the next one."""
    rules_dir = os.path.join(trials_dir, 'c1', 'stage1')
    win_dir = os.path.join(trials_dir, f"c{winner + 1}", 'stage1')
    os.makedirs(rules_dir, exist_ok=True)
    names = ('ckpt.pt', 'best.pt', 'metrics.jsonl')
    try:
        for f in names:
            src, dst = os.path.join(stage_dir, f), os.path.join(rules_dir, f)
            if os.path.isfile(src) and not os.path.isfile(dst) and os.path.isfile(os.path.join(win_dir, f)):
                os.replace(src, dst)
        for f in names:
            src, dst = os.path.join(win_dir, f), os.path.join(stage_dir, f)
            if os.path.isfile(src) and not os.path.isfile(dst):
                os.replace(src, dst)
    except OSError as e:
        raise ConfigError(f"{stage_dir}: cannot move the search's winner into the run's folder ({e}); "
                          "resume with --init_from=resume once it is writable") from None
