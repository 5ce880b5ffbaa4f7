"""Fine-tuning methods, one file each (the ``adv-*`` baselines share ``adv.py``), registered in
:data:`medshield.registry.METHODS` (which imports every module of this package on the first lookup).

``linear-probe``, ``full``, ``lora``, ``adapter``, ``tecoa``, ``fare``, ``ran`` and the
adversarial baselines ``adv-lora``, ``adv-adapter`` and ``adv-linear-probe``. What they share
has a module each: ``config.py`` (:class:`FineTuneConfig`), ``classifier.py``
(:class:`FineTunedClassifier`), ``method.py`` (:class:`FineTuneMethod`), ``data.py`` (the task's
items), ``loop.py`` (:func:`finetune`) and ``io.py`` (save and load).
"""

from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.config import FineTuneConfig
from medshield.train.finetune.io import load_finetuned, save_finetuned
from medshield.train.finetune.loop import FineTuneResult, count_flops, finetune, measure_overhead
from medshield.train.finetune.method import FineTuneMethod

__all__ = [
    "FineTuneConfig",
    "FineTuneMethod",
    "FineTuneResult",
    "FineTunedClassifier",
    "count_flops",
    "finetune",
    "load_finetuned",
    "measure_overhead",
    "save_finetuned",
]
