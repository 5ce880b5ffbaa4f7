"""Fine-tuning methods, one file each (the ``adv-*`` baselines share ``adv.py``), registered in
:data:`medshield.registry.METHODS` (which imports every module of this package on the first lookup).

``linear-probe``, ``full``, ``lora``, ``adapter``, ``tecoa``, ``fare``, ``ran`` and the
adversarial baselines ``adv-lora``, ``adv-adapter`` and ``adv-linear-probe``; see
:mod:`medshield.train.finetune.common` for the shared classifier, loop and save/load.
"""

from medshield.train.finetune.common import (
    FineTuneConfig,
    FineTunedClassifier,
    FineTuneMethod,
    FineTuneResult,
    count_flops,
    finetune,
    load_finetuned,
    measure_overhead,
    save_finetuned,
)

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
