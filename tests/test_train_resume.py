"""Resume: a run killed with SIGKILL mid-epoch continues from its last checkpoint and produces the
same losses, step for step, as a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time

import torch
from train_helpers import losses, write_config

from tinygptv.train import CHECKPOINT_FILE, TRAINABLE_FILE

# 2 epochs x 30 steps; a checkpoint every 7 steps and at each epoch's end; killed in epoch 2.
CHANGES = {"epochs": 2, "iters_per_epoch": 30, "checkpoint_every": 7, "deterministic": True, "tensorboard": False}
KILL_AFTER_STEP = 40


def _last_logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [line for line in path.read_text().splitlines() if '"loss"' in line]
    return len(steps)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path / "run.yaml", tmp_path / "killed", CHANGES)
    # One thread per run: the same arithmetic in every run, and no spinning threads on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tinygptv", "train", str(config)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while _last_logged_step(tmp_path / "killed") < KILL_AFTER_STEP:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the run did not reach the kill point in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / TRAINABLE_FILE).exists()  # it really did not finish

    checkpoint = torch.load(tmp_path / "killed" / CHECKPOINT_FILE, weights_only=True)
    resumed_from = checkpoint["step"]
    assert KILL_AFTER_STEP - 7 <= resumed_from < 60 and resumed_from % 30 != 0  # mid-epoch 2
    assert checkpoint["ranks"][0]["data"]["served"] == resumed_from * 2  # 2 micro-batches per step

    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "killed" / TRAINABLE_FILE).exists()

    reference_config = write_config(tmp_path / "ref.yaml", tmp_path / "reference", CHANGES)
    done = subprocess.run(
        command[:-1] + [str(reference_config)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    reference = tmp_path / "reference"
    killed, uninterrupted = losses(tmp_path / "killed"), losses(reference)
    assert sorted(killed) == list(range(1, 61))  # every step logged once: the redone steps replaced
    for step in range(1, 61):
        assert abs(killed[step] - uninterrupted[step]) <= 1e-6, (step, killed[step], uninterrupted[step])
    a = torch.load(tmp_path / "killed" / CHECKPOINT_FILE, weights_only=True)["model"]
    b = torch.load(reference / CHECKPOINT_FILE, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
