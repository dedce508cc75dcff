"""Training: a trainer, task types with their data handling and metrics, checkpoints and resume.

Needs transformers for the task types (tokenizers and model heads); the loop itself is plain torch.
"""

from .config import TrainConfig
from .data import Rows, read_rows, rows_from, split_rows, splits_from
from .hf_trainer import adapter_checkpoint_callback
from .stream import FeatureStream, stream_features
from .tasks import TASKS, Task, task_class
from .trainer import Trainer, TrainResult, seed_everything

__all__ = ["TASKS", "Rows", "Task", "TrainConfig", "TrainResult", "Trainer", "adapter_checkpoint_callback",
           "read_rows", "rows_from", "FeatureStream", "stream_features", "splits_from",
           "seed_everything", "split_rows", "task_class"]
