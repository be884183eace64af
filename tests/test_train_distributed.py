"""Scale-out: `torchrun --nproc-per-node 2` (gloo, CPU) gives the losses of one process with the same
global batch. One process accumulates 2 micro-batches per step; two processes take one each."""

import subprocess
import sys

import pytest
import torch
from train_helpers import losses, write_config

from tinygptv.train import CHECKPOINT_FILE, TRAINABLE_FILE, train
from tinygptv.train_config import load_train_config

# global batch 4 = micro-batch 2 x (2 accumulation steps on 1 process | 2 processes)
CHANGES = {"batch_size": 4, "micro_batch_size": 2, "data.val_batches": 2, "tensorboard": False}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return train(load_train_config(write_config(tmp / "run.yaml", tmp / "run", CHANGES)))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one(engine, single_process, tmp_path):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", {**CHANGES, "distributed": engine})
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "tinygptv", "train", str(config),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    assert (run / TRAINABLE_FILE).exists()

    one, two = losses(single_process), losses(run)
    assert sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    val_one, val_two = losses(single_process, "val_loss"), losses(run, "val_loss")
    assert val_one.keys() == val_two.keys() == {5, 10}
    assert all(abs(val_one[s] - val_two[s]) <= 1e-5 for s in val_one)

    state = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    assert len(state["ranks"]) == 2  # each process's RNG and data position, for resume
    assert [r["data"]["served"] for r in state["ranks"]] == [10, 10]
    reference = torch.load(single_process / CHECKPOINT_FILE, weights_only=True)["model"]
    assert state["model"].keys() == reference.keys()  # full (unsharded) weights, plain names
    # The key LayerNorm's bias adds the same amount to every score of a query, which softmax
    # ignores: its true gradient is zero, and Adam turns the rounding noise into LR-sized steps.
    compared = [k for k in reference if not k.endswith("k_layernorm.bias")]
    assert all(torch.allclose(state["model"][k], reference[k], atol=1e-5, rtol=0) for k in compared)
