"""The one trainer shared by pretraining and SFT: config, loop, checkpoints, optimizer/schedule, metrics, plots.

    from minillm.training import TrainConfig, train
    run_dir = train(TrainConfig(stage="pretrain", model="mini_llama3"))

Heavy imports (torch, accelerate) happen when `train` is first used, so importing the config stays cheap.
"""

from minillm.training.config import TrainConfig


def train(config: TrainConfig, **kwargs):
    """Run training; see `minillm.training.trainer.train`."""
    from minillm.training.trainer import train as _train

    return _train(config, **kwargs)


__all__ = ["TrainConfig", "train"]
