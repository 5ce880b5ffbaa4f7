"""Clinical safety workflows: red-teaming a generative medical VLM (``medshield redteam``)."""

from medshield.safety.redteam import (
    RedteamConfig,
    load_redteam_config,
    print_redteam_summary,
    run_redteam,
    select_items,
)

__all__ = [
    "RedteamConfig",
    "load_redteam_config",
    "print_redteam_summary",
    "run_redteam",
    "select_items",
]
