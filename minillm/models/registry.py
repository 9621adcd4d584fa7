"""The model zoo by name: build any architecture's config or model from a preset.

Each architecture is a package `minillm.models.<name>` exporting:
- `CONFIG_CLASS`, `MODEL_CLASS`: the `PretrainedConfig` and `<Arch>ForCausalLM` classes;
- `PRESETS`: preset name -> config kwargs (`tiny`: under 5M parameters with the 32k vocabulary, for CPU and tests;
  `small`: hidden 256, 6 layers, 13-22M parameters, for CPU training on real text; `base`: hidden 768,
  12 layers, 12 heads, 100-200M parameters);
- `to_reference(model)` / `from_reference(ref_model)`: conversion to and from the transformers reference class.

Packages are found by name (`importlib`), so this module needs no import of any architecture; `import minillm`
then imports all three once, to register them with the transformers Auto classes.

    >>> from minillm.models.registry import build_model
    >>> model = build_model("mini_llama3", "tiny", num_hidden_layers=2)
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from types import ModuleType
from typing import Any

from minillm.errors import UserError

MODEL_NAMES = ("mini_llama3", "mini_deepseekv3", "mini_qwen3_next")


def model_package(name: str) -> ModuleType:
    """The package `minillm.models.<name>`; `UserError` listing the known names for anything else."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return importlib.import_module(f"minillm.models.{name}")


def known_presets(name: str) -> tuple[str, ...]:
    """The preset names of a model, e.g. ('tiny', 'small', 'base')."""
    return tuple(model_package(name).PRESETS)


def build_config(name: str, preset: str = "tiny", **overrides: Any):
    """The config of model `name` from `preset`, with `overrides` applied (validated by the config class).

    An override the config class does not know is a `UserError` naming the closest field: transformers configs
    keep any unknown keyword as a stray attribute, so `num_hiden_layers=2` would otherwise train the preset's
    depth without a word. (Legacy keywords the class converts, such as `rope_theta`, are accepted.)
    """
    package = model_package(name)
    if preset not in package.PRESETS:
        raise UserError(f"unknown preset {preset!r} for {name}; known presets: {', '.join(package.PRESETS)}")
    kwargs = {**package.PRESETS[preset], **overrides}
    config = package.CONFIG_CLASS(**kwargs)
    known = config_fields(package.CONFIG_CLASS)
    for key in overrides:
        if key not in known and key in vars(config):  # kept verbatim: nothing read it
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown config field {key!r} for {name}{hint}")
    return config


@functools.cache
def config_fields(config_class: type) -> frozenset[str]:
    """The fields a config class takes: its constructor's keywords, its attribute aliases and its defaults."""
    params = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return frozenset(params | set(getattr(config_class, "attribute_map", {})) | set(config_class().to_dict()))


def build_model(name: str, preset: str = "tiny", **overrides: Any):
    """A freshly initialised model of `name` from `preset` (see `build_config`)."""
    config = build_config(name, preset, **overrides)
    return model_package(name).MODEL_CLASS(config)
