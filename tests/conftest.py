"""Shared fixtures: the real SmolLM2 model (converted once, cached on disk)."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_dir():
    from pdserve.engine.weights import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def hf_model(smol_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()
