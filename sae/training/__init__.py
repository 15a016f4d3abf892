"""Training: the jitted step, schedules, geometric-median init, and the loop."""

from sae.training.loop import train
from sae.training.step import TrainState, init_state, make_optimizer, make_train_step

__all__ = ["TrainState", "init_state", "make_optimizer", "make_train_step", "train"]
