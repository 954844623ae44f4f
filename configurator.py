"""
Command-line and config-file overrides for the globals block of a script (nanoGPT style, but parsed,
not exec'd, so typos and wrong types are caught with a one-line message).

    python train.py config/bms.py --batch_tokens=8192 --learning_rate=1e-3

A config file holds plain `key = value` lines (Python literals, comments allowed). Every key must
already exist in the script's defaults, in files too; a value must have the default's type, except
that an int is accepted for a float (`--learning_rate=1`) and 0/1/true/false for a bool.

Used by train.py, sample.py, cluster.py:
    config = parse_config(defaults, sys.argv[1:])

Also the scripts' progress reports (`Progress`): a tqdm bar on a terminal, plain lines elsewhere;
and, for every script's main, glibc's malloc set to keep freed memory (`keep_freed_memory`).
"""

import ast
import os
import platform
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm


class ConfigError(ValueError):
    """A bad key or value; the message is one line naming the setting (and file:line)."""


class DataError(ValueError):
    """Bad input or a missing dataset; the message is one line naming the file (and line)."""


def one_line(e):
    """An exception's message as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _coerce(key, value, default, where):
    """Cast `value` (already a Python object or a raw string) to the type of `default`."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no'):
            return value.lower() in ('true', 'yes')
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # --max_iters=1e4
            return int(value)
    elif kind is str:
        return value if isinstance(value, str) else str(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{where}: {key}={value!r} should be a {kind.__name__} (default {default!r})")


def _literal(text):
    """Parse a command-line value: a Python literal if it is one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_config_file(path):
    """Yield (key, value, line) from a file of `key = value` literal assignments."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    with open(path, encoding='utf-8') as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed in a config file")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: the value of {node.targets[0].id} is not a literal") from None
        yield node.targets[0].id, value, node.lineno


def parse_config(defaults, argv):
    """Return a copy of `defaults` updated by config files and --key=value arguments, in order."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith('--'):
            for key, value, line in read_config_file(arg):
                where = f"{arg}:{line}"
                if key not in config:
                    raise ConfigError(f"{where}: unknown setting '{key}'")
                config[key] = _coerce(key, value, defaults[key], where)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:
            raise ConfigError(f"argument {arg}: expected --key=value")
        if key not in config:
            raise ConfigError(f"argument {arg}: unknown setting '{key}'")
        value = text if isinstance(defaults[key], str) else _literal(text)  # strings stay verbatim
        config[key] = _coerce(key, value, defaults[key], f"argument {arg}")
    return config


MMAP_THRESHOLD = 32 << 20    # bytes: glibc's largest; blocks above it still go straight back to the kernel
TRIM_THRESHOLD = 1 << 30     # bytes of free memory at the heap's top kept for reuse
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt's parameters (malloc.h)
MALLOC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')


def glibc_malloc():
    """glibc's (mallopt, malloc_trim), or None: not Linux with glibc, or the user set malloc's
    thresholds in the environment (MALLOC_ENV: theirs win)."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc' or any(k in os.environ for k in MALLOC_ENV):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


@contextmanager
def compact_heap(threshold=4 << 20):
    """Scoring loops allocate (users x pages) blocks of a new size at every batch. glibc's malloc
    raises its mmap threshold to the size of each large block freed (up to 32 MB) and serves later
    ones from its heap, which then fragments and only grows: the final report's Markov baseline on
    a 19,576-page catalogue peaked at 1.8 GB that way, 0.3 GB with a fixed 4 MB threshold (blocks
    above it are mapped and given back when freed). A 4 MB threshold during training cost 20% of
    its speed (docs/performance.md), so on exit the threshold goes to 32 MB, where glibc's own
    rule ends up (fixed from then on: training after a validation ran at the same speed and peak
    as before) and the free heap is returned. Settings of the user's (glibc_malloc) win;
    elsewhere than glibc this does nothing."""
    mallopt, trim = glibc_malloc() or (None, None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            trim(0)


def usage(module, defaults):
    """--help: the script's docstring, then its settings as its globals block writes them (default
    and comment, continuation comments included)."""
    text = [(module.__doc__ or '').strip(), '', 'settings (--key=value, or a config file of `key = value` lines):']
    try:
        with open(module.__file__, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, TypeError, AttributeError):
        lines = []
    for key, value in defaults.items():
        at = next((i for i, line in enumerate(lines) if line.startswith(f"{key} = ")), None)
        if at is None:
            text.append(f"{key} = {value!r}")
            continue
        text.append(lines[at])
        at += 1
        while at < len(lines) and lines[at].startswith(' ') and lines[at].lstrip().startswith('#'):
            text.append(lines[at])
            at += 1
    return "\n".join(text)


def keep_freed_memory():
    """Have glibc's malloc keep the memory a training step frees for the next step, instead of
    handing it back to the kernel. By default glibc maps large blocks (from 128 KB, a threshold it
    raises as such blocks are freed) straight from the kernel and unmaps them when freed, and trims
    the heap once its free top passes twice that threshold, so a step's activations come back as
    fresh pages that the kernel maps and zeroes one fault at a time; the OpenMP
    threads that write them queue on the process's memory lock (gelu's backward ran at one
    thread's speed). Measured on a 2-core AMD EPYC (docs/performance.md): at the recipe's shapes,
    in one process, nanoGPT's training step 13-26% shorter with it and ours mostly 0-6% (the
    chunked loss allocates little); 300-iteration runs on the built-in data 2-6% shorter (their evaluations),
    the training loop itself unchanged. Numerics unchanged.
    Linux with glibc only, and not where the user set malloc's thresholds (glibc_malloc); returns
    whether it was set."""
    calls = glibc_malloc()
    if calls is None:
        return False
    mallopt = calls[0]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def run_main(run, defaults, argv, errors=()):
    """A script's main: parse argv over `defaults`, call run(config). A ConfigError, one of
    `errors` (e.g. data.DataError), or an OSError naming a path is printed as one line and exits
    with status 2, no traceback; Ctrl-C prints one line and exits with 130.
    -h / --help prints the script's docstring and settings. Freed memory is kept for reuse
    (keep_freed_memory)."""
    if any(a in ('-h', '--help') for a in argv):
        print(usage(sys.modules.get(run.__module__), defaults))
        return None
    keep_freed_memory()
    try:
        return run(parse_config(defaults, argv))
    except (ConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # files are written whole or not at all (files.py): say so, no traceback
        print("interrupted (Ctrl-C): stopped; every file is as it was or complete, none half-written", file=sys.stderr)
        sys.exit(130)
    except OSError as e:        # a path that cannot be read or written: one line naming it
        if not getattr(e, 'filename', None):
            raise
        print(f"error: {e.filename}: {e.strerror or type(e).__name__}", file=sys.stderr)
        sys.exit(2)


class Progress(tqdm):
    """tqdm's bar on a terminal. Where output goes to a file or a pipe (nohup, CI, a job log) a bar
    would be one long line of carriage returns, and tqdm's own rule (disable=None) shows nothing;
    there this prints a plain line at most every `every` seconds: what, how far, elapsed, time
    left, rate. Work that ends within `every` seconds prints nothing; longer work ends with a line
    saying it is done. Arguments as tqdm's; disable=True still silences it."""

    def __init__(self, iterable=None, *args, every=30.0, **kw):
        stream = kw.get('file') or sys.stderr
        self.plain = not (hasattr(stream, 'isatty') and stream.isatty()) and kw.get('disable') is not True
        if self.plain:
            kw.update(disable=False, leave=False, mininterval=every, file=stream)
            total = kw.get('total', len(iterable) if hasattr(iterable, '__len__') else None)
            kw['bar_format'] = ('{desc}: {percentage:.0f}% ({n_fmt}/{total_fmt}), {elapsed} elapsed, ~{remaining} left, '
                                '{rate_fmt}' if total else '{desc}: {n_fmt} in {elapsed}, {rate_fmt}')
        self.every, self.printed, self.last_line = every, False, time.time()
        super().__init__(iterable, *args, **kw)

    def display(self, msg=None, pos=None):
        if not self.plain:
            return super().display(msg, pos)
        now = time.time()   # tqdm also refreshes from its monitor thread and set_postfix: one line per `every`
        if msg is None and self.n > 0 and now - self.last_line >= self.every:
            print(self.__str__(), file=self.fp, flush=True)
            self.printed, self.last_line = True, now
        return False   # nothing to clear: tqdm then writes no carriage return

    def close(self):
        finished = self.total is None or self.n >= self.total   # not after an error part way
        if self.plain and self.printed and not self.disable and finished:
            print(f"{self.desc}: done, {self.format_interval(time.time() - self.start_t)}", file=self.fp, flush=True)
        self.printed = False
        super().close()
