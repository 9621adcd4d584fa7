"""The model zoo: mini_llama3, mini_deepseekv3, mini_qwen3_next (see `registry.py`).

Importing this package (which `import minillm` does) registers every architecture with transformers'
`AutoConfig` and `AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(run_dir)` loads our models.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from minillm.models.registry import MODEL_NAMES, build_config, build_model, known_presets, model_package

for _name in MODEL_NAMES:
    _package = model_package(_name)
    AutoConfig.register(_name, _package.CONFIG_CLASS, exist_ok=True)
    AutoModelForCausalLM.register(_package.CONFIG_CLASS, _package.MODEL_CLASS, exist_ok=True)

__all__ = ["MODEL_NAMES", "build_config", "build_model", "known_presets", "model_package"]
