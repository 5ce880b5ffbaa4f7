"""Shared test set-up: real data from ../shared/data, never the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSHIELD_DATA_DIR", REPO.parent / "shared" / "data"))

os.environ.setdefault("MEDSHIELD_DATA_DIR", str(SHARED_DATA))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MEDSHIELD_OFFLINE"] = "1"  # never download MedMNIST, even with medmnist installed
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "medmnist").is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}; set MEDSHIELD_DATA_DIR")
    return SHARED_DATA
