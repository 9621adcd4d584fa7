"""Run one trainer step under `accelerate launch` and save rank 0's synchronised gradients (for test_launch_train).

    accelerate launch --config_file accelerate_configs/cpu_multiprocess.yaml tests/grad_probe.py OUT GLOBAL MICRO
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from train_helpers import step_gradients  # noqa: E402

if __name__ == "__main__":
    out, global_batch, micro_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    grads = step_gradients(global_batch, micro_batch)
    if grads is not None:
        torch.save(grads, out)
