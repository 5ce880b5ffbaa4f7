"""Attacks, one file each, registered by name in one registry per call contract:
:data:`~medshield.registry.IMAGE_ATTACKS`, :data:`~medshield.registry.MULTIMODAL_ATTACKS`,
:data:`~medshield.registry.TEXT_ATTACKS` (``text/``) and :data:`~medshield.registry.JAILBREAKS`
(``jailbreak/``).

Image attacks take [0, 1] NCHW images and a model that normalises them itself::

    from medshield.attacks import PGD
    adv = PGD(classifier, eps=4, alpha=1, steps=20)(images, labels)
"""

from medshield.attacks.apgd import APGD
from medshield.attacks.apgd_dlr import APGDDLR, dlr_loss
from medshield.attacks.base import Attack, attack_mode, cross_entropy_loss
from medshield.attacks.co_attack import CoAttack
from medshield.attacks.fgsm import FGSM
from medshield.attacks.jailbreak import FigStep, JailbreakAttack
from medshield.attacks.multimodal import MultimodalAttack, MultimodalResult
from medshield.attacks.pgd import PGD
from medshield.attacks.sanity import SanityFlag
from medshield.attacks.sga import SGA
from medshield.attacks.text import WordSubstitutionAttack

__all__ = [
    "APGD",
    "APGDDLR",
    "FGSM",
    "PGD",
    "SGA",
    "Attack",
    "CoAttack",
    "FigStep",
    "JailbreakAttack",
    "MultimodalAttack",
    "MultimodalResult",
    "SanityFlag",
    "WordSubstitutionAttack",
    "attack_mode",
    "cross_entropy_loss",
    "dlr_loss",
]
