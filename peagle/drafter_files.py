"""What a drafter checkpoint directory holds, in either format this suite reads (its own and
speculators'): the file names, and the error raised for a bad directory. Kept apart so that both
:mod:`peagle.checkpoint` and :mod:`peagle.speculators` use them without importing each other."""

from __future__ import annotations

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "STATE_NAME", "CheckpointError"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "trainer_state.pt"


class CheckpointError(ValueError):
    """A drafter checkpoint is missing, incomplete or inconsistent."""
