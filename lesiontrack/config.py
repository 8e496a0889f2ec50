"""Pipeline configuration: TOML files in ``pipelines/``; the default ships in the package."""
from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path

__all__ = ["load_config", "default_config_path", "config_hash", "ConfigError"]


class ConfigError(ValueError):
    """A pipeline configuration file is unreadable or names unknown settings."""


def default_config_path() -> Path:
    return Path(str(resources.files("lesiontrack") / "data" / "pipelines" / "default.toml"))


# settings that were replaced: the message says by what
REPLACED = {
    "segment.blackhole_t1_max": "segment.blackhole_gm_z (black holes are now T1w-darker than the "
                                "subject's grey matter by that many of its half-widths, not below a "
                                "fixed fraction of white matter)",
}


def _merge(base: dict, over: dict, where: str, source) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if f"{where}{key}" in REPLACED:
            raise ConfigError(f"{source}: setting '{where}{key}' was replaced by "
                              f"{REPLACED[where + key]}")
        if key not in base:
            raise ConfigError(f"{source}: unknown setting '{where}{key}'; allowed: "
                              f"{', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(val, dict):
                raise ConfigError(f"{source}: '{where}{key}' must be a table")
            out[key] = _merge(base[key], val, f"{where}{key}.", source)
        else:
            out[key] = val
    return out


def _read(path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline config does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def load_config(path=None, overrides: dict | None = None) -> dict:
    """The default configuration, updated with the TOML file ``path`` (if given).

    A name in ``pipelines/`` (e.g. ``"default"``) may be given instead of a path.
    Unknown keys are errors, so a typo never silently falls back to a default.
    """
    cfg = _read(default_config_path())
    if path is not None:
        p = Path(path)
        if not p.exists() and not p.suffix:
            cand = default_config_path().parent / f"{path}.toml"
            p = cand if cand.exists() else p
        cfg = _merge(cfg, _read(p), "", p)
    if overrides:
        cfg = _merge(cfg, overrides, "", "overrides")
    return cfg


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
