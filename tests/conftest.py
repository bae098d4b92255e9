"""Shared pytest fixtures (run the suite with `python -m pytest -q`, or `make test`).

Asset fixtures never download or build anything: they skip the test when the cache that
`zebra assets fetch` fills (`$ZEBRA_CACHE` or ~/.cache/zebra) does not have what they need.

    teacher_dir         Path of the converted SmolLM2-135M-Instruct teacher (transformers dir)
    teacher_tokenizer   its tokenizer, loaded once per session (do not modify)
    teacher_model       its float32 model in eval mode, loaded once per session (do not modify in place)
    sharegpt_file       Path of the cached ShareGPT JSON
    olmo_datasets_dir   Path of the cached `datasets.save_to_disk` eval sets (zebra.assets.OLMO_DATASETS)
    tmp_zebra_cache     an empty tmp dir set as $ZEBRA_CACHE for this test
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# every GPU test's limit unless it sets its own: a hung kernel fails one test, not the lease
GPU_TEST_TIMEOUT_S = float(os.environ.get("ZEBRA_GPU_TEST_TIMEOUT", 120))


def pytest_collection_modifyitems(config, items):
    """Each `gpu`-marked test without its own `timeout` mark gets GPU_TEST_TIMEOUT_S (pytest-timeout), so
    `pytest -m gpu` is bounded per test however it is started (tools/gpu_session.sh also passes --timeout)."""
    for item in items:
        if item.get_closest_marker("gpu") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(GPU_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    from zebra import assets

    path = assets.teacher_cache_dir(assets.DEFAULT_TEACHER)
    if not assets._teacher_ready(path):
        pytest.skip(f"teacher not cached at {path} (run `zebra assets fetch`)")
    return path


@pytest.fixture(scope="session")
def teacher_tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher_dir))


@pytest.fixture(scope="session")
def teacher_model(teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def sharegpt_file() -> Path:
    from zebra import assets

    path = assets.package_dir(*assets.PACKAGES["sharegpt"]) / assets.SHAREGPT_JSON
    if not path.is_file():
        pytest.skip(f"ShareGPT data not cached at {path} (run `zebra assets fetch`)")
    return path


@pytest.fixture(scope="session")
def olmo_datasets_dir() -> Path:
    from zebra import assets

    path = assets.package_dir(*assets.PACKAGES["olmo"]) / assets.OLMO_HF_DATASETS
    if not path.is_dir():
        pytest.skip(f"eval datasets not cached at {path} (run `zebra assets fetch`)")
    return path


@pytest.fixture
def tmp_zebra_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "zebra-cache"
    monkeypatch.setenv("ZEBRA_CACHE", str(cache))
    return cache
