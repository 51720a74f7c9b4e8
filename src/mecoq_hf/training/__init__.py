"""Training MeCoQ with Accelerate, and the records and final test of a training run.

- `arguments`: `TrainingArguments`, the optimisation and run settings;
- `settings`: `resolve_run_settings`, preset < config file < overrides < `key=value`, into the config objects,
  and `describe_run_settings`; `presets`: the training arguments of the reference-script presets;
- `run_folder`: `RunFolder`, the one owner of a run's records, and `EvaluationReport` (`metrics.json`);
- `trainer`: `train` / `train_on_splits`, the loop; `optimization`, `checkpoints` and `validation` its parts;
- `run_evaluation`: `evaluate_run`, mAP@K of the trained model on its query split, next to a baseline.
"""

from .arguments import TrainingArguments
from .run_evaluation import evaluate_run
from .run_folder import EvaluationReport, RunFolder, TrainingRunLocked
from .settings import RunSettings, describe_run_settings, resolve_run_settings
from .trainer import TrainingResult, build_accelerator, train, train_on_splits

__all__ = [
    "EvaluationReport",
    "RunFolder",
    "RunSettings",
    "TrainingArguments",
    "TrainingResult",
    "TrainingRunLocked",
    "build_accelerator",
    "describe_run_settings",
    "evaluate_run",
    "resolve_run_settings",
    "train",
    "train_on_splits",
]
