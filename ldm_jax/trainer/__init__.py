"""The training loop for any stage (`loop.train`), the `Task` protocol a stage implements,
resuming (`resume`) and what a run writes (`writers`)."""

from ldm_jax.trainer.loop import TrainingStopped, train
from ldm_jax.trainer.task import Task

__all__ = ["Task", "TrainingStopped", "train"]
