"""Training: the jitted step, schedules, geometric-median init, the step loop, single runs and sweeps."""

from sae.training.step import TrainState, init_state, make_optimizer, make_train_step
from sae.training.train import train

__all__ = ["TrainState", "init_state", "make_optimizer", "make_train_step", "train"]
