"""Reading a config: YAML layers (`extends:`), `key=value` overrides, validation with one-line errors, hashing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from neu_det_pipeline.config.base import COMMAND_LINE
from neu_det_pipeline.config.pipeline import PipelineConfig
from neu_det_pipeline.errors import ConfigError


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass an existing YAML file with --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], origins: dict[str, str], source: str, prefix: str = "") -> None:
    """Deep-merge `update` into `base` (lists are replaced), remembering where each key came from."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                base[key] = {}  # recurse even into a new section, so every leaf key records its own source
            _merge(base[key], value, origins, source, f"{dotted}.")
        else:
            base[key] = value
        origins[dotted] = source


def _load_layers(path: Path, origins: dict[str, str], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself through {' -> '.join(map(str, seen))}")
    data = _read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        _merge(merged, _load_layers(path.parent / parent, origins, (*seen, path)), {}, "")
    _merge(merged, data, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with value parsed as YAML (`3`, `true`, `[a, b]`, `null`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' on {COMMAND_LINE} must look like key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_override(data: dict[str, Any], key: str, value: Any, origins: dict[str, str]) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}' on {COMMAND_LINE}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value
    origins[key] = COMMAND_LINE


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            break
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _explain(error: dict[str, Any], origins: dict[str, str]) -> str:
    loc = tuple(p for p in error["loc"] if not isinstance(p, int)) or ("<root>",)
    key = ".".join(str(p) for p in error["loc"])
    dotted_loc = ".".join(str(p) for p in loc)
    source = "the defaults"
    if any(name.startswith(f"{dotted_loc}.") and origin == COMMAND_LINE for name, origin in origins.items()):
        source = COMMAND_LINE  # a section-level check that a key below it, set on the command line, failed
    else:
        for i in range(len(loc), 0, -1):
            found = origins.get(".".join(str(p) for p in loc[:i]))
            if found:
                source = found
                break
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = ".".join(str(p) for p in loc[:-1]) or "the top level"
        allowed = ", ".join(_allowed_keys(loc[:-1]))
        return f"unknown config key '{key}' in {source}; allowed keys under {parent}: {allowed}"
    if kind == "value_error":  # the project's validators name the key and the value themselves
        return f"{error['ctx']['error']} (set in {source})"
    got = error.get("input")
    if kind in ("literal_error", "enum"):
        return f"invalid value {got!r} for '{key}' in {source}; allowed values: {error['ctx']['expected']}"
    return f"invalid value {got!r} for '{key}' in {source}: {error['msg']}"


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a config file (following `extends:`; None: the defaults), apply `key=value` overrides and validate."""
    origins: dict[str, str] = {}
    data = _load_layers(Path(path), origins) if path is not None else {}
    for text in overrides:
        _apply_override(data, *parse_override(text), origins)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc.errors()[0], origins)) from None


def config_hash(payload: Any) -> str:
    """Short stable hash of any JSON-able payload (configs, fingerprints)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_config(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
