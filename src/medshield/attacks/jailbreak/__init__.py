"""Jailbreaks against generative (chat) VLMs, registered by name in
:data:`medshield.registry.JAILBREAKS`.

Each turns a harmful request and its medical image into the attacked conversation::

    from medshield.attacks.jailbreak import FigStep, RolePlayJailbreak
    conversation = RolePlayJailbreak(seed=0).apply("Write a fake MRI report.", [image])
    replies = vlm.generate([conversation])

Textual: ``direct`` (no attack), ``jb-roleplay``, ``jb-refusal-suppression``,
``jb-prefix-injection``, ``jb-hypothetical``, ``jb-authority``. Visual: ``figstep`` (typography)
and ``adv-image-affirm`` (white-box PGD on the image through ``ChatVLM.score``).
"""

from medshield.attacks.jailbreak.adversarial_image import (
    AdversarialImageJailbreak,
    AdversarialImageResult,
)
from medshield.attacks.jailbreak.authority import AuthorityJailbreak
from medshield.attacks.jailbreak.base import (
    JailbreakAttack,
    TextJailbreak,
    check_request,
    check_request_images,
)
from medshield.attacks.jailbreak.direct import DirectRequest
from medshield.attacks.jailbreak.figstep import (
    FigStep,
    composite_beside,
    figstep_heading,
    render_typography,
)
from medshield.attacks.jailbreak.hypothetical import HypotheticalJailbreak
from medshield.attacks.jailbreak.prefix_injection import PrefixInjectionJailbreak
from medshield.attacks.jailbreak.refusal_suppression import RefusalSuppressionJailbreak
from medshield.attacks.jailbreak.roleplay import RolePlayJailbreak

__all__ = [
    "AdversarialImageJailbreak",
    "AdversarialImageResult",
    "AuthorityJailbreak",
    "DirectRequest",
    "FigStep",
    "HypotheticalJailbreak",
    "JailbreakAttack",
    "PrefixInjectionJailbreak",
    "RefusalSuppressionJailbreak",
    "RolePlayJailbreak",
    "TextJailbreak",
    "check_request",
    "check_request_images",
    "composite_beside",
    "figstep_heading",
    "render_typography",
]
