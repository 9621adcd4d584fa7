"""minillm: train small reproductions of leading open LLM architectures end to end.

Importing the package registers the three architectures (`mini_llama3`, `mini_deepseekv3`, `mini_qwen3_next`) with
transformers' `AutoConfig` and `AutoModelForCausalLM`.
"""

__version__ = "0.1.0"

import os

# The `minillm` command defers this while it builds its commands (cli/main.py): registering the models loads torch
# and transformers' modeling code (seconds), which `minillm --help` has no use for. Its commands register them
# before they run.
if os.environ.get("MINILLM_DEFER_MODELS") != "1":
    from minillm import models as _models  # noqa: F401  (registers the Auto classes)
