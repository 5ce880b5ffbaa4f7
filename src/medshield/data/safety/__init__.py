"""Clinical safety data: the harm taxonomy, the medshield query benchmark, external sets."""

from medshield.data.safety.benchmark import (
    BENCHMARK_VERSION,
    ImageRef,
    SafetyItem,
    benchmark_modalities,
    build_benchmark,
    match_answer,
    normalize_answer,
)
from medshield.data.safety.external import (
    SOURCES,
    load_figstep,
    load_figstep_benign,
    load_jailbreakbench,
    load_medsafetybench,
    load_safety_items,
)
from medshield.data.safety.taxonomy import CATEGORY_IDS, HARM_CATEGORIES, HarmCategory, get_category

__all__ = [
    "BENCHMARK_VERSION",
    "CATEGORY_IDS",
    "HARM_CATEGORIES",
    "SOURCES",
    "HarmCategory",
    "ImageRef",
    "SafetyItem",
    "benchmark_modalities",
    "build_benchmark",
    "get_category",
    "load_figstep",
    "load_figstep_benign",
    "load_jailbreakbench",
    "load_medsafetybench",
    "load_safety_items",
    "match_answer",
    "normalize_answer",
]
