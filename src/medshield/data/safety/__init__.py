"""Clinical safety data: the harm taxonomy, the medshield query benchmark, external sets, the
user's own query files."""

from medshield.data.safety.benchmark import benchmark_modalities, build_benchmark
from medshield.data.safety.external import (
    image_picker,
    load_figstep,
    load_figstep_benign,
    load_jailbreakbench,
    load_medsafetybench,
)
from medshield.data.safety.items import (
    BENCHMARK_VERSION,
    ImageRef,
    SafetyItem,
    match_answer,
    normalize_answer,
)
from medshield.data.safety.near_miss import NEAR_MISS, NEAR_MISS_TEMPLATES
from medshield.data.safety.queryfile import load_query_file, query_file_record
from medshield.data.safety.sources import SOURCES, load_safety_items
from medshield.data.safety.taxonomy import CATEGORY_IDS, HARM_CATEGORIES, HarmCategory, get_category

__all__ = [
    "BENCHMARK_VERSION",
    "CATEGORY_IDS",
    "HARM_CATEGORIES",
    "NEAR_MISS",
    "NEAR_MISS_TEMPLATES",
    "SOURCES",
    "HarmCategory",
    "ImageRef",
    "SafetyItem",
    "benchmark_modalities",
    "build_benchmark",
    "get_category",
    "image_picker",
    "load_figstep",
    "load_figstep_benign",
    "load_jailbreakbench",
    "load_medsafetybench",
    "load_query_file",
    "load_safety_items",
    "match_answer",
    "normalize_answer",
    "query_file_record",
]
