"""Shared fixtures: offline hubs, the repo root, the third-party data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        msg = f"third-party test data not found at {SHARED_DATA} (../shared/data)"
        if os.environ.get("CI", "").lower() == "true":  # CI has the data: missing is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED_DATA
