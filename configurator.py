"""
Command-line and config-file overrides for the globals block of a script (nanoGPT style, but parsed,
not exec'd, so typos and wrong types are caught with a one-line message).

    python train.py config/bms.py --batch_tokens=8192 --learning_rate=1e-3

A config file holds plain `key = value` lines (Python literals, comments allowed). Every key must
already exist in the script's defaults, in files too; a value must have the default's type, except
that an int is accepted for a float (`--learning_rate=1`) and 0/1/true/false for a bool.

Used by train.py, sample.py, cluster.py:
    config = parse_config(defaults, sys.argv[1:])
"""

import ast
import os
import sys


class ConfigError(ValueError):
    """A bad key or value; the message is one line naming the setting (and file:line)."""


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


def run_main(run, defaults, argv, errors=()):
    """A script's main: parse argv over `defaults`, call run(config). A ConfigError, or one of
    `errors` (e.g. data.DataError), is printed as one line and exits with status 2, no traceback."""
    try:
        return run(parse_config(defaults, argv))
    except (ConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
