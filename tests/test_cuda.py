"""The CUDA paths: mixed-precision training (bf16; fp16 with the gradient scaler), resuming on the
GPU, loading and answering on the GPU, bitsandbytes int8 / int4. Skipped without a GPU (CI has
none); run them on a GPU machine with ``pytest tests/test_cuda.py``."""

import pytest
import torch

from train_helpers import losses, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(out, changes):
    from tinygptv.train import train

    train(tiny_config(out, {"device": "cuda", "deterministic": False, **changes}))
    return losses(out)


def test_fp32_on_the_gpu_follows_the_cpu(tmp_path):
    from tinygptv.train import train

    train(tiny_config(tmp_path / "cpu", {"device": "cpu"}))
    cpu = losses(tmp_path / "cpu")
    gpu = _train(tmp_path / "gpu", {"precision": "fp32"})
    assert gpu.keys() == cpu.keys()
    assert max(abs(gpu[s] - cpu[s]) for s in cpu) < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(tmp_path, precision):
    fp32 = _train(tmp_path / "fp32", {"precision": "fp32"})
    mixed = _train(tmp_path / precision, {"precision": precision})
    assert all(torch.isfinite(torch.tensor(v)) for v in mixed.values())
    assert max(abs(mixed[s] - fp32[s]) for s in fp32) < 0.05


def test_fp16_uses_the_gradient_scaler_and_keeps_master_weights_fp32(tmp_path):
    from tinygptv.train import setup, train_step

    run = setup(tiny_config(tmp_path / "run", {"device": "cuda", "precision": "fp16"}))
    assert run.scaler is not None
    step = train_step(run)
    assert torch.isfinite(torch.tensor(step.loss)) and run.scaler.get_scale() > 0
    assert all(p.dtype == torch.float32 and p.is_cuda for p in run.trainable)


def test_checkpoint_rng_state_restores_the_cuda_generator():
    from tinygptv.train import rng_state, set_rng_state

    state = rng_state()
    assert "cuda" in state
    first = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_builtin_model_answers_on_the_gpu(quantize):
    from PIL import Image

    from tinygptv.inference import load_model

    cpu = load_model(device="cpu")
    gpu = load_model(device="cuda", dtype="float32", quantize=quantize)
    image = Image.new("RGB", (224, 224), (250, 250, 250))
    question = "how many shapes are there?"
    expected = cpu.ask(image, question, max_new_tokens=8).text
    got = gpu.ask(image, question, max_new_tokens=8).text
    if quantize is None:
        assert got == expected
    else:
        assert type(gpu.lm.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
        assert isinstance(got, str) and got
