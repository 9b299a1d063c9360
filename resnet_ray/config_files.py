"""Configs in and out: nested dicts <-> the dataclass tree (type checks that name the field), YAML files (with
``base:``), Ray Serve config files, dotted ``--section.field VALUE`` overrides."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import yaml

from resnet_ray.config import Config
from resnet_ray.config_checks import ConfigError, check


def _is_optional(tp) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, name: str) -> Any:
    optional, tp = _is_optional(tp)
    if value is None:
        check(optional, name, "must not be null")
        return None
    if tp is bool:
        check(isinstance(value, bool), name, f"expected true/false, got {value!r}")
    elif tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
    elif tp is float:
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool), name, f"expected a number, got {value!r}"
        )
        value = float(value)
    elif tp is str:
        check(isinstance(value, str), name, f"expected a string, got {value!r}")
    elif tp is tuple:
        check(isinstance(value, (list, tuple)), name, f"expected a list, got {value!r}")
        value = tuple(value)
    elif tp is dict:
        check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
    return value


def _build(cls, values: Mapping[str, Any], prefix: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key; allowed: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values.get(f.name) or {}, name)
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], hints[f.name], name)
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as saved in run folders and checkpoints)."""
    return _build(Config, values, "")


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of builtins (tuples become lists) that round-trips through from_dict."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, creating sub-dicts. search_space keys stay whole."""
    parts = key.split(".")
    check(len(parts) >= 2 and all(parts), key, "overrides look like section.field, e.g. optim.lr")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        check(isinstance(node, dict), key, "cannot set a field below a value")
        if part == "search_space":  # its keys are themselves dotted config paths
            node[".".join(parts[parts.index(part) + 1 :])] = value
            return
    node[parts[-1]] = value


def parse_overrides(args: Sequence[str]) -> dict:
    """``["--optim.lr", "0.01", "--train.amp=false"]`` -> ``{"optim.lr": 0.01, "train.amp": False}``.

    Values are parsed as YAML scalars, so numbers, booleans, null and lists work.
    """
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        check(arg.startswith("--") and len(arg) > 2, arg, "expected --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            check(i + 1 < len(args), arg, "is missing its value")
            value = args[i + 1]
            i += 1
        out[key] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def _read_yaml(path: str, including: tuple = ()) -> dict:
    """A YAML config as a nested dict. ``base: FILE`` (relative to this file) is read first and this file's
    sections are merged over it, field by field: a search YAML builds on the recipe it searches."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path}: not found" + (f" (the base of {including[-1]})" if including else ""))
    with open(path) as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    if "applications" in loaded:  # a Ray Serve config file (configs/serve.yaml)
        return serve_file_tree(loaded, path)
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must be a file name, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
    if base_path in including:
        raise ConfigError(f"config file {path}: base {base} includes itself")
    tree = _read_yaml(base_path, (*including, os.path.normpath(path)))
    for section, values in loaded.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section] = {**tree[section], **values}
        else:
            tree[section] = values
    return tree


def serve_args(args: Mapping, parse_strings: bool = False, prefix: str = "") -> dict:
    """A Ray Serve application's ``args`` as dotted overrides, ``model`` (what it serves) left out:
    ``{"serve": {"port": 8000}, "serve.top_k": 3}`` -> ``{"serve.port": 8000, "serve.top_k": 3}``. With
    ``parse_strings``, strings are read as YAML scalars (``serve run``'s command line, as the jobs' overrides)."""
    out = {}
    for key, value in args.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if name == "model":
            continue
        if isinstance(value, Mapping) and "." not in name:
            out.update(serve_args(value, parse_strings, name))
        else:
            out[name] = yaml.safe_load(value) if parse_strings and isinstance(value, str) and value else value
    return out


def serve_file_tree(loaded: dict, path: str) -> dict:
    """A Ray Serve config file (top-level ``applications``, for `serve run` / `serve deploy`) as a config tree: the
    ``args`` of its one application (``serve_args``), with ``http_options`` host and port as serve.host /
    serve.port."""
    apps = loaded["applications"]
    if not (isinstance(apps, list) and len(apps) == 1 and isinstance(apps[0], dict)):
        raise ConfigError(f"config file {path}: a Ray Serve config file must hold exactly one application")
    args = apps[0].get("args") or {}
    check(isinstance(args, dict), f"{path}: applications[0].args", f"expected a mapping, got {args!r}")
    tree: dict = {}
    for key, value in serve_args(args).items():
        set_dotted(tree, key, value)
    http = loaded.get("http_options") or {}
    for key in ("host", "port"):
        if key in http:
            tree.setdefault("serve", {})[key] = http[key]
    return tree


def load_config(path: Optional[str] = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Defaults <- YAML file (and its base) <- dotted overrides, validated. Raises ConfigError naming the field."""
    tree = _read_yaml(path) if path else {}
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return from_dict(tree)


def replace(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of cfg with dotted overrides applied and validated (used by Tune trials)."""
    tree = to_dict(cfg)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return from_dict(tree)
