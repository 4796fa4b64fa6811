"""A run as a file: `--config run.yaml` fills the same fields as the flags (as `trl dpo --config`,
axolotl and LLaMA-Factory do), and `--print-config` writes the effective configuration of a
command line, so a run can be checked into git and repeated.

A config file is a YAML mapping: keys are option names (`max_new_tokens` or `max-new-tokens`,
`no_lock` for `--no-lock`), plus the command's own arguments (`prompts`, `output`); values are
what the flag takes (`base_url` and `principle` may be lists). An unknown key, a wrong type or a
value that is not one of an option's choices is an InputError naming `run.yaml:LINE: key`."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from cai.declare import flag_of
from cai.errors import InputError, OptionError

MAX_BYTES = 1 << 20


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if flag_of(f) is not None}


def _value(node: yaml.Node, path: str, key: str, in_list: bool = False) -> Any:
    """A scalar, or a list of scalars, as YAML constructs it."""
    from cai.constitution.validate import GuardedLoader

    if isinstance(node, yaml.MappingNode):
        raise InputError(path, f"{key}: expected a value or a list, got a mapping", line=node.start_mark.line + 1)
    if isinstance(node, yaml.SequenceNode):
        if in_list:
            raise InputError(path, f"{key}: expected a value or a list of values, got a list of lists",
                             line=node.start_mark.line + 1)
        return [_value(item, path, key, in_list=True) for item in node.value]
    try:
        return GuardedLoader("").construct_object(node)
    except (yaml.YAMLError, ValueError) as exc:
        raise InputError(path, f"{key}: {getattr(exc, 'problem', None) or exc}", line=node.start_mark.line + 1) from None


def read_config(path: str, cls, own: tuple[str, ...] = (), names=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the options of `cls` (those in `names`, if given) that the file `path` sets, the
    command's own arguments `own` it sets), each value checked against its field's type and
    choices."""
    from cai.constitution.validate import GuardedLoader
    from cai.options import conform

    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise InputError(path, "file is larger than 1 MiB; a run's configuration is a few lines")
    try:
        root = yaml.compose(raw.decode("utf-8"), Loader=GuardedLoader)
    except UnicodeDecodeError:
        raise InputError(path, "file is not valid UTF-8") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise InputError(path, f"YAML syntax error: {(exc.problem or exc.context or 'invalid YAML').strip()}",
                         line=mark.line + 1 if mark else None) from None
    except Exception as exc:                         # nested past the guard's depth
        raise InputError(path, f"YAML could not be read: {exc}") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise InputError(path, "expected a mapping of option: value", line=root.start_mark.line + 1)
    fields = {name: f for name, f in _fields(cls).items() if names is None or name in names}
    inverted = {"no_" + name: name for name, f in fields.items() if flag_of(f).invert}
    hints = typing.get_type_hints(cls)
    found, arguments, seen = {}, {}, {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        key = str(key_node.value).replace("-", "_")
        if key in seen:
            raise InputError(path, f"{key_node.value}: given twice (first at line {seen[key]})", line=line)
        seen[key] = line
        value = _value(value_node, path, str(key_node.value))
        if key in own:
            if not isinstance(value, str):
                raise InputError(path, f"{key}: expected a path (a string)", line=line)
            arguments[key] = value
            continue
        name = inverted.get(key, key)
        if name not in fields:
            known = sorted([*fields, *inverted, *own])
            close = difflib.get_close_matches(key, known, n=1)
            raise InputError(path, f"{key_node.value}: unknown option" + (f"; did you mean '{close[0]}'?" if close else ""),
                             line=line)
        try:
            if name != key:                             # no_lock: true is lock: false
                value = not conform(key, value, bool)
            if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
                value = tuple(value)
            value = conform(name, value, hints[name])
        except OptionError as exc:
            raise InputError(path, f"{key_node.value}: {exc.detail.replace(chr(96), '')}", line=line) from None
        meta = flag_of(fields[name])
        if meta.choices and value not in meta.choices and not (value is None and fields[name].default is None):
            raise InputError(path, f"{key_node.value}: unknown value '{value}'; choose from {', '.join(meta.choices)}",
                             line=line)
        found[name] = value
    return found, arguments


def effective(options, own: dict[str, Any], names=None) -> dict[str, Any]:
    """The configuration `options` and the command's own arguments `own` make, as a config file
    holds it: every command-line option (those in `names`, if given), in the dataclass's order,
    values as YAML writes them."""
    config = {name: value for name, value in own.items()}
    for name, f in _fields(type(options)).items():
        if names is not None and name not in names:
            continue
        value = getattr(options, name)
        if hasattr(value, "ref"):                      # a Constitution object (the Python API)
            value = value.ref
        if isinstance(value, tuple):
            value = list(value)
        config[name] = value
    return config


def render(config: dict[str, Any], command: str) -> str:
    """`config` as a commented YAML file `--config` reads back."""
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return (f"# cai {command}: the effective configuration (cai {command} --config FILE repeats it;\n"
            f"# flags given with it win)\n" + body)


def config_hash(fingerprint: dict) -> str:
    """A short hash of what decides a run's records (its fingerprint: model, constitution,
    templates, seed, sampling and curation parameters): records with the same hash come from the
    same configuration however the run was cut (batch sizes, shards, resumes, output paths)."""
    text = json.dumps(fingerprint, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
