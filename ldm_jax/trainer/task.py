"""The contract between the training loop and a stage: the `Task` protocol.

Stage 1 (`ldm_jax.autoencoder.task.AutoencoderTask`) and stage 2
(`ldm_jax.diffusion.task.DiffusionTask`) implement it; the loop (`ldm_jax.trainer.loop`)
knows nothing of a stage's models or losses.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """What `ldm_jax.trainer.train` needs from a stage.

    Attributes:
        config: the validated ml_collections config.
        config_path: the config file (or None), for hints in messages.
        best_metric: a validation metric to minimise (e.g. "val_l1"); the checkpoint
            with its lowest value is kept as "best".
        loss_metric: the training metric watched for absurd values (e.g. "loss").
        progress_keys: {progress-bar label: metric name}.
        resume_fixed: dotted config prefixes a resumed run must keep (the state's shapes,
            what the data mean: model sections, preprocessing).
        resume_free: dotted prefixes inside `resume_fixed` that may change anyway
            (e.g. "autoencoder.dtype").
    """

    config: Any
    config_path: Optional[str]
    best_metric: str
    loss_metric: str
    progress_keys: Mapping[str, str]
    resume_fixed: tuple
    resume_free: tuple

    def init_state(self, rng) -> Any:
        """The initial train state: a pytree with at least int32 scalars `step`, `rng`,
        `bad_steps` and `skipped_steps` (the non-finite guard reads the last two)."""

    def train_step(self, state, batch: Mapping, consts) -> tuple[Any, Mapping]:
        """One update: (state, batch, consts) -> (state, metrics); traced under jax.jit."""

    def step_consts(self) -> Any:
        """Replicated constants passed to `train_step` (e.g. perceptual-network weights)."""

    def sample_shape(self) -> tuple:
        """(1, X, Y, Z, C) of one training input."""

    def train_loader(self, batch_size: int) -> Iterable[Mapping]:
        """Host batches: dicts of numpy arrays, batch first; may carry "name" ((B,) str)."""

    def eval_batches(self, batch_size: int) -> Iterable[Mapping]:
        """Validation batches (dicts of numpy arrays; may carry extra keys, e.g. names)."""

    def evaluate(self, state, batches, put: Callable, image_path: str) -> Mapping:
        """Validation metrics of `state` (writes images to `image_path` on process 0)."""

    def describe(self) -> str:
        """Printed at start: the model and the data it reads."""

    def quick_run_hint(self, seconds: float, first_seconds: float, steps: int) -> str:
        """Printed on a CPU when the remaining `steps` would take more than
        `ldm_jax.trainer.loop.LONG_RUN_HOURS`."""
