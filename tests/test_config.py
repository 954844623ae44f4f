"""configurator.py: overrides, types, unknown keys, config files; the memory every script's main keeps."""
import os
import platform
import subprocess
import sys

import pytest

from configurator import parse_config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(learning_rate=3e-3, max_iters=100, compile=False, device='auto', history='')


def test_overrides_are_typed_like_the_defaults():
    cfg = parse_config(DEFAULTS, ['--learning_rate=1', '--max_iters=1e3', '--compile=True', '--device=cpu'])
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)
    assert cfg['max_iters'] == 1000 and isinstance(cfg['max_iters'], int)
    assert cfg['compile'] is True and cfg['device'] == 'cpu'
    assert DEFAULTS['learning_rate'] == 3e-3  # defaults untouched


def test_strings_stay_verbatim():
    assert parse_config(DEFAULTS, ['--history=1,2;3'])['history'] == '1,2;3'


@pytest.mark.parametrize('arg, words', [
    ('--learnig_rate=0.1', "unknown setting 'learnig_rate'"),
    ('--max_iters=abc', 'should be a int'),
    ('--max_iters=1.5', 'should be a int'),
    ('--compile=maybe', 'should be a bool'),
    ('--max_iters', 'expected --key=value'),
])
def test_bad_arguments_give_one_line_errors(arg, words):
    with pytest.raises(ConfigError) as e:
        parse_config(DEFAULTS, [arg])
    assert words in str(e.value) and '\n' not in str(e.value)


def test_config_file_applies_in_order_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text('"""a preset"""\n# comment\nmax_iters = 7\nlearning_rate = 2\n')
    cfg = parse_config(DEFAULTS, [str(good), '--max_iters=9'])
    assert cfg['max_iters'] == 9 and cfg['learning_rate'] == 2.0
    bad = tmp_path / 'bad.py'
    bad.write_text('max_iters = 7\nmax_itres = 8\n')
    with pytest.raises(ConfigError, match=r'bad\.py:2: unknown setting'):
        parse_config(DEFAULTS, [str(bad)])
    code = tmp_path / 'code.py'
    code.write_text('import os\n')
    with pytest.raises(ConfigError, match=r'code\.py:1'):
        parse_config(DEFAULTS, [str(code)])
    with pytest.raises(ConfigError, match='not found'):
        parse_config(DEFAULTS, [str(tmp_path / 'missing.py')])


def test_progress_prints_plain_lines_when_output_is_not_a_terminal():
    import io
    from configurator import Progress
    log = io.StringIO()                      # a file or a pipe: not a TTY
    for _ in Progress(range(4), desc='reading', unit='row', file=log, every=0.0):
        pass
    lines = log.getvalue().splitlines()
    assert '\r' not in log.getvalue()
    assert lines[0].startswith('reading: 25% (1/4), ') and 'elapsed, ~' in lines[0] and 'left' in lines[0]
    assert lines[-2].startswith('reading: 100% (4/4)') and lines[-1].startswith('reading: done')
    quick, silent = io.StringIO(), io.StringIO()
    for _ in Progress(range(4), desc='quick', file=quick):   # done within `every` seconds: nothing
        pass
    for _ in Progress(range(4), desc='off', file=silent, every=0.0, disable=True):
        pass
    assert quick.getvalue() == '' and silent.getvalue() == ''


def test_compact_heap_fixes_the_mmap_threshold_inside_and_restores_glibcs_ceiling(monkeypatch):
    import ctypes
    import configurator
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))

        def malloc_trim(self, pad):
            calls.append(('trim', pad))
    monkeypatch.setattr(ctypes, 'CDLL', lambda name: Libc())
    for key in configurator.MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    with configurator.compact_heap():
        assert calls == [(-3, 4 << 20)]              # M_MMAP_THRESHOLD, 4 MB while scoring
    assert calls[1:] == [(-3, 32 << 20), ('trim', 0)]
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '65536')
    with configurator.compact_heap():
        pass
    assert len(calls) == 3                           # the user's setting stands


@pytest.mark.parametrize('script', ['train', 'predict', 'sample', 'cluster'])
def test_help_prints_the_docstring_and_every_setting_with_its_comment(script, capsys):
    import importlib
    mod = importlib.import_module(script)
    mod.main(['--help'])
    out = capsys.readouterr().out
    assert out.startswith(mod.__doc__.strip().splitlines()[0])
    settings = out.split('settings (--key=value')[1].splitlines()[1:]
    names = [line.split(' = ')[0] for line in settings if not line.startswith(' ')]
    assert names == list(mod.DEFAULTS)                  # every setting, in order, nothing else


def test_progress_prints_at_most_one_line_per_interval_and_no_done_after_an_error():
    import io
    from configurator import Progress
    log = io.StringIO()
    bar = Progress(total=100, desc='scoring', file=log, every=3600.0)
    bar.last_line -= 3600.0                        # the first interval has passed
    for _ in range(5):
        bar.update(1)
        bar.set_postfix(k=1)                       # refreshes too: still one line per interval
    bar.close()                                    # stopped at 5 of 100: no "done"
    assert len(log.getvalue().splitlines()) == 1 and 'done' not in log.getvalue()


FREE_AND_ALLOCATE = """
import resource, sys
import numpy as np
import configurator
kept = configurator.keep_freed_memory() if sys.argv[1] == 'keep' else None
for i in range(20):
    if i == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(10 << 17) for _ in range(3)]   # three blocks of 10 MB, as a step's activations
    del blocks
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 15)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_freed_memory_is_kept_for_the_next_step():
    # glibc by default hands the freed blocks back to the kernel, so each round faults its pages in
    # again; with keep_freed_memory (every script's main) the rounds reuse them
    def faults(mode):
        out = subprocess.run([sys.executable, '-c', FREE_AND_ALLOCATE, mode], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], float(out[1])
    kept, per_round = faults('keep')
    assert kept == 'True' and per_round < 10
    assert faults('default')[1] > per_round   # the premise: without it the same rounds fault (1,000 here)


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_keep_freed_memory_sets_both_thresholds_unless_the_user_set_one(monkeypatch):
    import ctypes
    import configurator
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(('trim', pad))
    monkeypatch.setattr(ctypes, 'CDLL', lambda name: Libc())
    for key in configurator.MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    assert configurator.keep_freed_memory() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]     # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    for key in configurator.MALLOC_ENV:
        monkeypatch.setenv(key, '65536')
        assert configurator.keep_freed_memory() is False and len(calls) == 2   # the user's setting stands
        monkeypatch.delenv(key)
