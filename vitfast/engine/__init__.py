"""The machinery all vitfast pipelines share: training loop (trainer), atomic checkpoints
(checkpoint), run directories that refuse a changed configuration (run), models by timm name with
checked weights (models), streaming evaluation with the model's data config (evaluation)."""
from .checkpoint import CheckpointError, load_training_state, save_training_state
from .run import ResumeMismatch, RunDir, file_digest, folder_digest
from .trainer import FitResult, RunLog, TrainConfig, autocast_for, fit

__all__ = ["CheckpointError", "FitResult", "ResumeMismatch", "RunDir", "RunLog", "TrainConfig", "autocast_for",
           "file_digest", "fit", "folder_digest", "load_training_state", "save_training_state"]
