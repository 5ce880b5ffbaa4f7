"""TEMPORARY (issue 24): the names the commands (``workflows.py``, ``demo/config.py``,
``studies/finetune.py``, ``studies/finetune_report.py``) still import from here, while those files
move into ``medshield.commands``. Once they import from the modules below, delete this module."""

from medshield.train.finetune.classifier import adapted_encoder
from medshield.train.finetune.config import FineTuneConfig, parse_finetune_config
from medshield.train.finetune.data import VQA_TASK, task_prompts
from medshield.train.finetune.io import META_FILE, load_finetuned

__all__ = [
    "META_FILE",
    "VQA_TASK",
    "FineTuneConfig",
    "adapted_encoder",
    "load_finetuned",
    "parse_finetune_config",
    "task_prompts",
]
