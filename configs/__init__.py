"""Typed configuration: dataclass schema <- YAML files (left to right) <- `key=value` overrides.

Every schema is a plain dataclass (documented field by field beside the module it configures).
OmegaConf structured configs make a misspelled key or a wrong type an error that names the key
and, where one is close, suggests it. The resolved config is written into the run folder by the
entry points (`save_config`).

    cfg = load_config(RunConfig, ["configs/tiny.yaml"], ["trainer.max_steps=10"])
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")
log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class MissingSetting(ValueError):
    """A schema check found `key` empty where it needs a value (raised by a schema's `validate`); the
    loader adds which environment variable the value would have come from, when that is why."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


def env_variables(layer, prefix: str = "") -> dict[str, str]:
    """{dotted key: VAR} for every value of a config layer written as ${oc.env:VAR,...}."""
    out = {}
    items = layer.items() if isinstance(layer, dict) else enumerate(layer) if isinstance(layer, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, str):
            out.update({key: m.group(1) for m in _ENV.finditer(v)})
        else:
            out.update(env_variables(v, f"{key}."))
    return out


def _suggest(schema, dotted: str) -> str:
    """ " (did you mean 'x.y'?)" for the closest existing key, or ""."""
    node, parts = schema, dotted.split(".")
    for i, part in enumerate(parts):
        if not is_dataclass(node):
            return ""
        hints = typing.get_type_hints(node)  # resolves `from __future__ import annotations` strings
        names = [f.name for f in fields(node)]
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            return f" (did you mean '{'.'.join(parts[:i] + close)}'?)" if close else ""
        node = hints.get(part)
    return ""


def resolve_path(path: str | Path) -> Path:
    """A config file path as given, or relative to the shipped `configs/` folder."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file {path} not found (also looked in {CONFIG_DIR})")


def read_yaml(path: str | Path):
    """One config file (`resolve_path`) parsed; a YAML error names the file, line and column."""
    path = resolve_path(path)
    try:
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:  # marks are 0-based
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        opened = f" ({e.context} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}{opened}") from None
    except (yaml.YAMLError, OmegaConfBaseException, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {e}") from None


def config_system(files: list[str | Path] = (), overrides: list[str] = (), default: str = "blip2") -> str:
    """The `system` key of the merged files and overrides (last wins): which schema they are written for."""
    system = default
    for f in files:
        layer = read_yaml(f)
        if isinstance(layer, DictConfig) and "system" in layer:
            system = str(layer.system)
    for item in overrides:
        if item.startswith("system="):
            system = item.split("=", 1)[1]
    return system


def load_config(schema: type[T], files: list[str | Path] = (), overrides: list[str] = ()) -> T:
    """Merge `files` then `overrides` onto `schema`'s defaults; return a typed dataclass instance."""
    base = OmegaConf.structured(schema)
    from_env: dict[str, str] = {}  # key -> the environment variable its value comes from (last file wins)
    for f in files:
        path = resolve_path(f)
        layer = read_yaml(path)
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: a config file holds keys (`key: value` lines), not a "
                              f"{type(layer).__name__.removesuffix('Config').lower()}")
        layer.pop("defaults", None)
        _check_sections(schema, OmegaConf.to_container(layer, resolve=False), where=str(path))
        from_env.update(env_variables(OmegaConf.to_container(layer, resolve=False)))
        migrate = getattr(schema, "migrate", None)
        if callable(migrate):
            for note in migrate(layer):
                log.warning("%s: old key migrated: %s", path, note)
        base = _merge(base, layer, schema, where=str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        layer = OmegaConf.from_dotlist([item])
        _check_sections(schema, OmegaConf.to_container(layer, resolve=False), where=f"override {item!r}")
        base = _merge(base, layer, schema, where=f"override {item!r}")
    try:
        obj = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        raise ConfigError(f"incomplete config: {e.msg if hasattr(e, 'msg') else e}") from None
    for item in overrides:  # a key set on the command line no longer comes from its file's variable
        from_env.pop(item.split("=", 1)[0], None)
    _check_env_names(obj)
    post = getattr(obj, "validate", None)
    if callable(post):
        try:
            post()
        except MissingSetting as e:
            var = from_env.get(e.key)
            hint = f" ({e.key} comes from ${{{var}}}, and environment variable {var} is not set)" \
                if var and not os.environ.get(var) else ""
            raise ConfigError(f"{e.key}: {e}{hint}") from None
        except ValueError as e:  # the schema's own checks refuse a value: a config error like a bad key
            raise ConfigError(str(e)) from None
    return obj


def _check_sections(schema, layer: dict, *, where: str, prefix: str = "") -> None:
    """A section of the schema (a field that is itself a dataclass) must be given as keys under it.
    OmegaConf would refuse `stage1: 5` too, but with a TypeError or a message that names no key."""
    if not is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for key, value in layer.items():
        section = hints.get(key)
        if not is_dataclass(section) or (isinstance(value, str) and value.startswith("${")):
            continue
        if not isinstance(value, dict):
            example = fields(section)[0].name if fields(section) else "key"
            raise ConfigError(f"{where}: '{prefix}{key}' is a section: give its keys under it (e.g. "
                              f"{prefix}{key}.{example}), not {value!r}")
        _check_sections(section, value, where=where, prefix=f"{prefix}{key}.")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _looks_like_a_secret(value: str) -> bool:
    """Not a variable name at all (`sk-...`), or a long one with digits that is not written as variable names
    are (lower case, or no underscore): `hf_...` tokens, AWS access key ids."""
    if not _ENV_NAME.fullmatch(value):
        return True
    return len(value) >= 20 and any(c.isdigit() for c in value) and (not value.isupper() or "_" not in value)


def _check_env_names(obj, prefix: str = "") -> None:
    """Fields named `*_env` hold the NAME of an environment variable (the API key's); one holding what looks
    like the key itself is refused before anything prints or saves the config, and the message does not
    repeat it."""
    if not is_dataclass(obj):
        return
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name.endswith("_env") and isinstance(value, str) and value and _looks_like_a_secret(value):
            raise ConfigError(f"{prefix}{f.name} names the environment variable that holds the key (e.g. "
                              "OPENAI_API_KEY), but its value looks like a key itself (not repeated here), which "
                              "would be shown in messages and saved in config.yaml: put the key in the "
                              "environment and the variable's name here")
        _check_env_names(value, f"{prefix}{f.name}.")


def _merge(base: DictConfig, layer, schema, *, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"{where}: unknown key '{key}'{_suggest(schema, key)}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "")
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: bad value for '{key}': {msg}") from None


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config (the exact values a run used) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
