"""minillm: train small reproductions of leading open LLM architectures end to end.

Importing the package registers the three architectures (`mini_llama3`, `mini_deepseekv3`, `mini_qwen3_next`) with
transformers' `AutoConfig` and `AutoModelForCausalLM`.
"""

__version__ = "0.1.0"

from minillm import models as _models  # noqa: E402,F401  (registers the Auto classes)
