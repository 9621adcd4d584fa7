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
import types
import typing
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
    depth without a word. (Legacy keywords the class converts, such as `rope_theta`, are accepted.) An override of
    the wrong type for its field is a `ValueError` (`checked_override`).
    """
    package = model_package(name)
    if preset not in package.PRESETS:
        raise UserError(f"unknown preset {preset!r} for {name}; known presets: {', '.join(package.PRESETS)}")
    hints = field_types(package.CONFIG_CLASS)
    overrides = {key: checked_override(name, key, value, hints.get(key)) for key, value in overrides.items()}
    kwargs = {**package.PRESETS[preset], **overrides}
    config = package.CONFIG_CLASS(**kwargs)
    known = config_fields(package.CONFIG_CLASS)
    for key in overrides:
        if key not in known and key in vars(config):  # kept verbatim: nothing read it
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown config field {key!r} for {name}{hint}")
    return config


# Fields that a value of the right type can still make unusable: a norm that divides by zero or less (NaN from the
# first step), a negative initialisation spread (the weights' normal init fails).
POSITIVE_FIELDS = ("rms_norm_eps",)
NON_NEGATIVE_FIELDS = ("initializer_range",)


@functools.cache
def field_types(config_class: type) -> dict[str, Any]:
    """The annotated type of each field of a config class (`rms_norm_eps` -> float, `mlp_only_layers` -> list[int]
    | None); {} when the annotations cannot be resolved."""
    import torch

    try:
        return typing.get_type_hints(config_class, localns={"torch": torch})
    except Exception:  # noqa: BLE001  (an annotation this version cannot evaluate: no checks, as before)
        return {}


def _type_text(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _conform(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(whether `value` fits `annotation`, the value to use). YAML reads `1e-5` as a string (its floats need a dot):
    a float field takes such a string as the number it spells, and an int for a float field becomes a float."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or origin is typing.ClassVar:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in sorted(args, key=lambda a: a is float):  # an int stays an int where `int | float` is allowed
            fits, conformed = _conform(value, option)
            if fits:
                return True, conformed
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, value
        return True, float(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is typing.Literal:
        return value in args, value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            return False, value
        if not args:
            return True, value
        conformed = [_conform(item, args[0]) for item in value]
        return all(fits for fits, _ in conformed), [item for _, item in conformed]
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value  # an annotation this check does not model


def checked_override(name: str, key: str, value: Any, annotation: Any) -> Any:
    """`value` for config field `key` of model `name`, conformed to the field's annotated type (None: unchecked).

    Raises ValueError naming the field and the type it takes: such a value used to pass the config and fail later
    inside the model, with a traceback (`rms_norm_eps=abc` in the first forward, after the run directory was made).
    """
    if annotation is not None:
        fits, value = _conform(value, annotation)
        if not fits:
            raise ValueError(f"{name}: {key} takes {_type_text(annotation)}, got {value!r}")
    if key == "dtype" and isinstance(value, str) and value != "auto":
        import torch

        if not isinstance(getattr(torch, value, None), torch.dtype):
            raise ValueError(f"{name}: dtype takes a torch dtype name such as 'float32' or 'bfloat16', got {value!r}")
    if key in POSITIVE_FIELDS and isinstance(value, float) and not value > 0:
        raise ValueError(f"{name}: {key} must be > 0, got {value!r}")
    if key in NON_NEGATIVE_FIELDS and isinstance(value, float) and not value >= 0:
        raise ValueError(f"{name}: {key} must be >= 0, got {value!r}")
    return value


@functools.cache
def config_fields(config_class: type) -> frozenset[str]:
    """The fields a config class takes: its constructor's keywords, its attribute aliases and its defaults."""
    params = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return frozenset(params | set(getattr(config_class, "attribute_map", {})) | set(config_class().to_dict()))


def build_model(name: str, preset: str = "tiny", **overrides: Any):
    """A freshly initialised model of `name` from `preset` (see `build_config`)."""
    config = build_config(name, preset, **overrides)
    return model_package(name).MODEL_CLASS(config)
