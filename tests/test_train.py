"""The training loop on the tiny model, in this process: outputs, chaining, guard rails, precision."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import losses, tiny_config, write_config

from tinygptv.cli import main as cli_main
from tinygptv.stages import get_stage, trainable_parameter_names
from tinygptv.testing import word_tokenizer
from tinygptv.train import (
    CHECKPOINT_FILE,
    TRAINABLE_FILE,
    RandomCaptionStream,
    TrainingStopped,
    accumulation_steps,
    build_model,
    set_train_mode,
    setup,
    train,
)


def test_a_stage_writes_its_outputs(tmp_path):
    cfg = tiny_config(tmp_path / "run", {"stage": 1, "data.val_batches": 2})
    initial = build_model(cfg, get_stage(1))
    out = train(cfg)

    saved = load_file(str(out / TRAINABLE_FILE))
    assert set(saved) == trainable_parameter_names(initial, 1)  # only the stage's trainable part
    assert not any(".lora_" in k or k.startswith(("vision.", "qformer.")) for k in saved)
    before = dict(initial.named_parameters())
    assert all(not torch.equal(saved[k], before[k]) for k in ("vision_proj.weight", "lm_proj.weight"))

    assert set(losses(out)) == set(range(1, 11))  # 2 epochs x 5 steps
    assert set(losses(out, "val_loss")) == {5, 10}  # validation at the end of each epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"lr", "grad_norm", "samples_per_s", "epoch"} <= set(r) for r in records if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").exists() and json.loads((out / "model_config.json").read_text())["name"]
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 10 and set(state["model"]) == set(saved)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 10 and len(events.Scalars("val_loss")) == 2


def test_training_lowers_the_loss(tmp_path):
    cfg = tiny_config(
        tmp_path / "run",
        {"epochs": 1, "iters_per_epoch": 40, "data.num_samples": 4, "batch_size": 4, "micro_batch_size": 4,
         "schedule.kind": "constant", "schedule.peak_lr": 1e-2},
    )  # fmt: skip
    loss = losses(train(cfg))
    assert sum(loss[s] for s in range(36, 41)) / 5 < sum(loss[s] for s in range(1, 6)) / 5 - 0.5


def test_stage_n_starts_from_stage_n_minus_1(tmp_path):
    first = train(tiny_config(tmp_path / "s1", {"stage": 1}))
    run = setup(tiny_config(tmp_path / "s2", {"stage": 2, "init_from": str(first)}))
    stage1 = load_file(str(first / TRAINABLE_FILE))
    params = dict(run.module.named_parameters())
    for name, tensor in stage1.items():
        assert torch.equal(params[name].detach(), tensor), name
    assert {n for n, p in params.items() if p.requires_grad} == trainable_parameter_names(run.module, 2)
    run.log.close()

    with pytest.raises(ValueError, match="does not fit"):  # another model's weights are refused
        setup(
            tiny_config(tmp_path / "s2b", {"init_from": str(first), "model_overrides": {"projection_hidden_size": 64}})
        )
    with pytest.raises(FileNotFoundError, match="finished run"):
        setup(tiny_config(tmp_path / "s2c", {"init_from": str(tmp_path / "nowhere")}))


def test_cli_runs_a_chain_of_stages_and_skips_finished_ones(tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    for n in (1, 2):
        write_config(
            configs / f"stage{n}.yaml",
            tmp_path / f"stage{n}",
            {"stage": n, "epochs": 1, "iters_per_epoch": 2, "schedule.warmup_steps": 1},
        )
    assert cli_main(["train", str(configs), "--stages", "1-2", "tensorboard=false"]) == 0  # overrides after options
    saved = yaml.safe_load((tmp_path / "stage2" / "config.yaml").read_text())
    assert saved["init_from"] == str(tmp_path / "stage1") and not saved["tensorboard"]
    assert (tmp_path / "stage2" / TRAINABLE_FILE).exists()
    assert cli_main(["train", str(configs), "seed=1", "--stages", "1-2", "--resume"]) == 0  # ... or before
    assert capsys.readouterr().out.count("is finished, skipping") == 2
    # a run directory that already holds a run is never overwritten by accident
    assert cli_main(["train", str(configs / "stage1.yaml")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # An absurd learning rate blows the norms up: the loss turns Inf/NaN within a few steps.
    path = write_config(
        tmp_path / "nan.yaml",
        tmp_path / "run",
        {"stage": 1, "schedule.kind": "constant", "schedule.peak_lr": 1e30, "checkpoint_every": 1},
    )
    assert cli_main(["train", str(path)]) == 1
    message = capsys.readouterr().err
    assert "stopped: stage 1 (warm-up), step" in message
    assert "nan" in message.lower() or "inf" in message.lower()
    failed_step = int(message.split(", step ")[1].split(" ")[0])
    assert failed_step >= 2  # step 1 was good and checkpointed
    assert not (tmp_path / "run" / TRAINABLE_FILE).exists()

    state = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == failed_step - 1
    assert f"(step {failed_step - 1})" in message
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert losses(tmp_path / "run").keys() == set(range(1, failed_step))
    assert (tmp_path / "run" / "loss.png").exists()  # the curve that led to the stop
    # usable: a resume restores it (its weights, its step)
    from tinygptv.train_config import load_train_config

    run = setup(load_train_config(path), resume=True)
    assert run.step == failed_step - 1
    params = dict(run.module.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in state["model"].items())
    run.log.close()


def test_vanishing_gradients_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", {"guard.vanishing_grad_norm": 1e9, "guard.vanishing_patience": 3})
    with pytest.raises(
        TrainingStopped, match=r"stage 2 \(pre-train\), step 3 of 10: the gradient norm has stayed"
    ) as err:
        train(cfg)
    assert "no checkpoint had been written yet" in str(err.value)  # steps 1-2 ran, the first checkpoint is at 3
    assert losses(tmp_path / "run").keys() == {1, 2}


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = losses(train(tiny_config(tmp_path / "plain", {"epochs": 1})))
    run = setup(tiny_config(tmp_path / "ckpt", {"epochs": 1, "gradient_checkpointing": True}))
    assert run.module.lm.is_activation_checkpointing
    run.log.close()
    ckpt = losses(train(tiny_config(tmp_path / "ckpt2", {"epochs": 1, "gradient_checkpointing": True})))
    assert ckpt == pytest.approx(plain, abs=1e-6)


def test_bf16_keeps_trainable_weights_in_fp32(tmp_path):
    run = setup(tiny_config(tmp_path / "run", {"precision": "bf16"}))
    for name, p in run.module.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    run.log.close()
    loss = losses(
        train(
            tiny_config(
                tmp_path / "run2", {"precision": "bf16", "epochs": 1, "iters_per_epoch": 3, "schedule.warmup_steps": 1}
            )
        )
    )
    assert all(math.isfinite(v) for v in loss.values())
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        setup(tiny_config(tmp_path / "run3", {"precision": "fp16"}))


def test_frozen_parts_run_in_eval_mode_and_decay_skips_1d(tmp_path):
    run = setup(tiny_config(tmp_path / "run"))
    set_train_mode(run.module)
    assert not run.module.vision.training and not run.module.qformer.training  # no dropout in frozen parts
    assert run.module.language_model.training
    decay, no_decay = run.optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    run.log.close()


def test_batch_arithmetic(tmp_path):
    assert accumulation_steps(tiny_config(tmp_path / "a", {"batch_size": 8, "micro_batch_size": 2}), 2) == 2
    assert accumulation_steps(tiny_config(tmp_path / "b", {"batch_size": 8, "micro_batch_size": None}), 2) == 1
    with pytest.raises(ValueError, match="whole number of accumulation steps"):
        accumulation_steps(tiny_config(tmp_path / "c", {"batch_size": 6, "micro_batch_size": 4}), 1)


def test_random_caption_stream_splits_a_global_batch_the_same_way_for_any_world_size():
    tok = word_tokenizer()
    one = RandomCaptionStream(tok, 4, 28, micro_batch_size=2, num_samples=100, seed=3)
    two = [
        RandomCaptionStream(tok, 4, 28, micro_batch_size=2, rank=r, world_size=2, num_samples=100, seed=3)
        for r in (0, 1)
    ]
    for _ in range(3):  # global micro-batches 0..5: one process in order; two processes interleaved
        for rank in (0, 1):
            a, b = next(one), next(two[rank])
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = one.state_dict()
    expected = next(one)
    resumed = RandomCaptionStream(tok, 4, 28, micro_batch_size=2, num_samples=100, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(expected[k], v) for k, v in next(resumed).items())
    batch = expected
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and (batch["labels"] != -100).any()


def test_base_weights_give_the_frozen_parts(tmp_path):
    from tinygptv.model.tinygptv import TinyGPTV

    torch.manual_seed(123)  # other weights than the trainer's own random init
    base = TinyGPTV("tinygptv-tiny", tokenizer=word_tokenizer())
    base.save_pretrained(tmp_path / "base")
    out = train(tiny_config(tmp_path / "run", {"epochs": 1, "base_weights": str(tmp_path / "base")}))
    run = setup(tiny_config(tmp_path / "run2", {"base_weights": str(tmp_path / "base"), "init_from": str(out)}))
    own, saved = dict(run.module.named_parameters()), dict(base.named_parameters())
    trained = load_file(str(out / TRAINABLE_FILE))
    for name, param in own.items():
        expected = trained[name] if name in trained else saved[name]
        assert torch.equal(param.detach(), expected.detach()), name
    run.log.close()
    with pytest.raises(ValueError, match=r"language.qk_norm: True \(weights\) vs False \(run\)"):
        setup(
            tiny_config(
                tmp_path / "run3",
                {"base_weights": str(tmp_path / "base"), "model_overrides": {"language.qk_norm": False}},
            )
        )
