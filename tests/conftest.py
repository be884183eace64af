import pytest
import torch

from tinygptv.config import get_preset
from tinygptv.testing import word_tokenizer


@pytest.fixture
def tokenizer():
    return word_tokenizer()


@pytest.fixture
def tiny_config():
    return get_preset("tinygptv-tiny")


@pytest.fixture
def tiny_model(tiny_config, tokenizer):
    from tinygptv.model.tinygptv import TinyGPTV

    torch.manual_seed(0)
    return TinyGPTV(tiny_config, tokenizer=tokenizer).eval()


def random_pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
