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
              rung 0's iteration b; the best third go on to 3b, and so on until one is left. The
              winner is not retrained: it trains on to the end of its schedule as the run. So the
              candidates are compared on the schedule they would be trained on, nothing is trained
              twice, and there is no model of the response surface to fit (a handful of candidates).
  budget      the rules' candidate trains first, in the run's own folder, to 1/8 of its
              iterations; its speed then tells what the run costs alone (C). The losing candidates
              may spend what the budget leaves beside C, and at most 2C (a run takes at most three
              times as long as without a search, and never longer than the budget): b is the
              largest of 1/2, 1/4, 1/8 of the schedule whose losers fit in that (3 candidates: b is
              half the schedule wherever the budget allows; 6 candidates: a quarter, then 3/4). Where nothing fits (a log that fills the budget with one run), the rules'
              candidate trains on as the run: the rules alone, and no time was lost.
  selection   by the run's best_metric at each candidate's best validation so far (the same
              validation users for all). The best of several noisy validations is optimistic, and on
              a small log most of a gap between candidates is noise, so a candidate replaces the
              rules' settings only where its per-user gain over them exceeds one standard error
              (the one-standard-error rule); the test split is never looked at.

Every candidate, its iterations and validation score are printed, written to search.json in the
stage folder (a killed run resumes the search from there: `--init_from=resume`) and stored in the
checkpoints. --search=False turns it off; a setting given explicitly is never searched.
"""
import json
import math
import os

import numpy as np

from recipe import AUTO, data_stats, derive

ETA = 3                        # successive halving keeps the best third at each rung
LADDER = (1 / 2, 1 / 4, 1 / 8)  # rung 0 at this fraction of the schedule, the largest that fits
DROPOUTS = (0.1, 0.25, 0.5)    # the rules' 0.1; 0.2-0.5 won by hand on repeat-heavy and small logs


def applies(cfg):
    """A search runs in stage 1, from scratch or resuming one, on one process, when asked
    (search=True) and some searched setting is left "from the data"."""
    return (cfg.get('search', False) and cfg['stage'] == 1 and cfg['init_from'] in ('scratch', 'resume')
            and int(os.environ.get('WORLD_SIZE', 1)) == 1
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
    """[(iteration, survivors)] of successive halving over n candidates with rung 0 at iteration b."""
    out, alive, t = [], n, b
    while alive > 1:
        alive = max(1, math.ceil(alive / eta))
        out.append((min(t, max_iters), alive))
        t *= eta
    return out


def loser_iters(n, b, max_iters, eta=ETA):
    """Iterations trained by the candidates that lose (the winner's are the run's own)."""
    total, alive = 0, n
    for t, keep in rungs(n, b, max_iters, eta):
        total += (alive - keep) * t
        alive = keep
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


def one_se_winner(scores, users, metric_lower_is_better, default=0):
    """The index with the best score, except that the default (the rules' settings) stays unless the
    best beats it by more than one standard error of their per-user difference (where per-user
    values exist). Returns (index, reason)."""
    order = sorted(scores, key=lambda i: scores[i], reverse=not metric_lower_is_better)
    best = order[0]
    if best == default or default not in scores:
        return best, "best validation"
    a, b = users.get(best), users.get(default)
    if a is None or b is None or len(a) != len(b):
        return best, "best validation (no per-user scores to compare)"
    d = np.asarray(a) - np.asarray(b)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    if d.mean() > se:
        return best, f"beats the rules' settings by {d.mean():+.4f} > one standard error ({se:.4f})"
    return default, (f"the best candidate's gain over the rules' settings ({d.mean():+.4f}) is within one "
                     f"standard error ({se:.4f}): kept the rules' settings")


def write_state(path, state):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def record(trial, run, stop):
    """What the search keeps of a candidate after it trained: iterations, best validation, time."""
    trial.update(iters=run.iter_num, best=run.best_val, best_iter=run.best_iter, elapsed=round(run.elapsed(), 1),
                 finished=trial.get('finished') or stop or (run.iter_num >= run.cfg['max_iters'] and 'done') or None)


def summary(state):
    """The search in a few lines (printed at its end and in the final report)."""
    lines = [f"settings search (successive halving, rung 0 at iteration {state['b']:,} of {state['max_iters']:,}; "
             f"{state['metric']} on validation):"]
    for i, t in enumerate(state['trials']):
        mark = " <- chosen" if i == state.get('winner') else ("" if t['alive'] else " (stopped)")
        best = 'n/a' if t['best'] is None else f"{t['best']:.4f}"
        lines.append(f"  {i}: {t['name']:<28} {best} at iteration {t['best_iter']:,} of {t['iters']:,} trained, "
                     f"{t['elapsed']:.0f} s{mark}")
    if state.get('why'):
        lines.append(f"  chosen: {state['why']}")
    return "\n".join(lines)


def run(cfg, Run):
    """Stage 1 with the search; returns (the run, why it stopped) for Run.finish. Run: train.Run."""
    stage_dir = os.path.join(cfg['out_dir'], 'stage1')
    path = os.path.join(stage_dir, 'search.json')
    resume = cfg['init_from'] == 'resume'
    state = None
    if resume and os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            state = json.load(f)
    if resume and (state is None or state['phase'] == 'final'):   # a run without a search, or its winner
        r = Run(dict(cfg, time_budget=time_left(cfg, state)))
        return r, (state or {}).get('stopped') or r.fit()
    if not resume and os.path.isfile(path) and cfg['overwrite']:
        os.remove(path)                                  # the old run's search: written by this module
    first = Run(cfg)                                     # the rules' candidate, in the run's own folder
    cands = candidates(cfg, data_stats(first.data))
    lower = first.cfg['best_metric'] in ('nll', 'session_nll')
    if len(cands) == 1:
        return first, first.fit()
    if state is None:
        n_iters, ei = first.cfg['max_iters'], first.cfg['eval_interval']
        b0 = aligned(LADDER[-1] * n_iters, ei)
        print(f"search: {len(cands)} candidates ({'; '.join(n for n, _ in cands)}); the rules' settings train "
              f"first to iteration {b0:,}, then their speed says whether the budget has room for the others")
        stop = first.fit(pause_at=b0)
        budget = cfg['time_budget'] * 60
        b = None if first.cfg['max_iters'] < n_iters else plan(len(cands), n_iters, ei, first.elapsed() / max(1, first.iter_num), budget)
        if b is None:
            print(f"search: no room in the time budget for other candidates (the run alone takes about "
                  f"{n_iters * first.elapsed() / max(1, first.iter_num) / 60:.1f} min): the rules' settings train on")
            return first, stop or first.fit()
        state = {'phase': 'search', 'b': b, 'max_iters': n_iters, 'metric': first.cfg['best_metric'],
                 'dtype': first.cfg['dtype'], 'seed': cfg['seed'],
                 'trials': [{'name': n, 'settings': s, 'alive': True, 'iters': 0, 'best': None, 'best_iter': 0,
                             'elapsed': 0.0, 'finished': stop if i == 0 else None}
                            for i, (n, s) in enumerate(cands)]}
        record(state['trials'][0], first, stop)
        write_state(path, state)
        print(f"search: rung 0 at iteration {b:,} of {n_iters:,}, then the best third on to {ETA}x that")
    runs, users = {0: first}, {}

    def trial_run(i):
        if i not in runs:
            t = state['trials'][i]
            folder = os.path.join(stage_dir, 'search', f"c{i}")
            has = os.path.isfile(os.path.join(folder, 'stage1', 'ckpt.pt'))
            runs[i] = Run(dict(cfg, **t['settings'], out_dir=folder, time_budget=0.0, dtype=state['dtype'],
                               init_from='resume' if has else 'scratch', overwrite=cfg['overwrite']))
        return runs[i]

    for t_rung, keep in rungs(len(cands), state['b'], state['max_iters']):
        alive = [i for i, t in enumerate(state['trials']) if t['alive']]
        if len(alive) <= keep:
            continue                                     # a rung a resumed search had finished
        for i in alive:
            t = state['trials'][i]
            if t['finished'] or t['iters'] >= t_rung:
                if i in runs or t['finished']:
                    users[i] = trial_run(i).best_users
                continue
            r = trial_run(i)
            print(f"search: candidate {i} of {len(cands) - 1} ({t['name']}): iterations {r.iter_num:,} -> {t_rung:,}")
            stop = r.fit(pause_at=t_rung)
            record(t, r, stop)
            users[i] = r.best_users
            write_state(path, state)
        scores = {i: state['trials'][i]['best'] for i in alive if state['trials'][i]['best'] is not None}
        ranked = sorted(scores, key=lambda i: scores[i], reverse=not lower)
        if keep == 1:
            for i in alive:
                users.setdefault(i, trial_run(i).best_users)
            winner, why = one_se_winner(scores, users, lower)
            survivors, state['why'] = [winner], why
        else:
            survivors = ranked[:keep]
        for i in alive:
            if i not in survivors:
                state['trials'][i]['alive'] = False
                runs.pop(i, None)
        write_state(path, state)
    winner = next(i for i, t in enumerate(state['trials']) if t['alive'])
    state['winner'] = winner
    w = trial_run(winner)
    if winner != 0:   # the winner's files take the run's folder; the rules' candidate's go to search/c0
        swap(w, stage_dir, os.path.join(stage_dir, 'search', 'c0', 'stage1'))
    for i in list(runs):
        if i != winner:
            runs.pop(i)
    state['phase'] = 'final'
    state['stopped'] = state['trials'][winner]['finished'] if state['trials'][winner]['finished'] != 'done' else None
    print(summary(state))
    w.cfg.update(out_dir=cfg['out_dir'], time_budget=time_left(cfg, state), init_from=cfg['init_from'])
    w.search = {k: v for k, v in state.items()}
    write_state(path, state)
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


def swap(winner, stage_dir, rules_dir):
    """Move the rules' candidate's files out of the run's folder and the winner's in; the winner
    writes to the run's folder from then on."""
    os.makedirs(rules_dir, exist_ok=True)
    names = ('ckpt.pt', 'best.pt', 'metrics.jsonl')
    for f in names:
        if os.path.isfile(os.path.join(stage_dir, f)):
            os.replace(os.path.join(stage_dir, f), os.path.join(rules_dir, f))
    for f in names:
        if os.path.isfile(os.path.join(winner.stage_dir, f)):
            os.replace(os.path.join(winner.stage_dir, f), os.path.join(stage_dir, f))
    winner.stage_dir = stage_dir
    winner.ckpt_path, winner.best_path = os.path.join(stage_dir, 'ckpt.pt'), os.path.join(stage_dir, 'best.pt')
