"""Named configs shipped in ``launch/configs/`` and the ``model:`` section read out of them."""

from __future__ import annotations

from pathlib import Path

from ..models.config import ModelConfig
from ..runtime.config import ConfigError, from_dict, load_yaml

__all__ = ["CONFIG_DIR", "preset_path", "list_presets", "load_model_config"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "launch" / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r} in {CONFIG_DIR}; choose one of {list_presets()}")
    return path


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """The ``model:`` section of a preset name (``"smoke"``) or a YAML file path (not yet validated)."""
    path = Path(name_or_path)
    data = load_yaml(path if path.suffix in (".yaml", ".yml") else preset_path(str(name_or_path)))
    if "model" not in data:
        raise ConfigError(f"config {str(path)!r} has no top-level `model:` section")
    return from_dict(ModelConfig, data["model"], "model")
