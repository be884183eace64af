"""Run configs: YAML overrides, type checks, and the paper's recipe in configs/tinygptv-phi2."""

from pathlib import Path

import pytest

from tinygptv.schedules import Schedule
from tinygptv.stages import get_stage
from tinygptv.train_config import TrainConfig, load_train_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tinygptv-phi2"

# Paper section 4.1 / ORIGINAL-NOTES "Training recipe":
# stage: (epochs, iters/epoch, batch, schedule kind, start LR, peak LR, min LR, warm-up steps)
PAPER = {
    1: (17, 1000, 64, "epoch_ramp", 1e-5, 1e-4, None, 0),
    2: (4, 5000, 64, "warmup_cosine", 1e-6, 1e-4, 8e-5, 5000),
    3: (5, 200, 6, "warmup_cosine", 1e-6, 3e-5, 1e-5, 200),
    4: (50, 1000, 2, "warmup_cosine", 1e-6, 1e-5, 8e-6, 1000),  # min 8e-6: the 8e-5 typo resolved
}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_phi2_recipe_matches_the_paper(stage):
    path = CONFIGS / f"stage{stage}.yaml"
    text = path.read_text()
    assert text.splitlines()[0].startswith(f"# tinygptv train configs/tinygptv-phi2/stage{stage}.yaml")
    assert "/root" not in text and ": /" not in text  # no absolute paths
    cfg = load_train_config(path)
    epochs, iters, batch, kind, start, peak, min_lr, warmup = PAPER[stage]
    assert (cfg.stage, cfg.model, cfg.epochs, cfg.iters_per_epoch, cfg.batch_size) == (
        stage, "tinygptv-phi2", epochs, iters, batch,
    )  # fmt: skip
    s = cfg.schedule
    assert (s.kind, s.start_lr, s.peak_lr, s.warmup_steps) == (kind, start, peak, warmup)
    if min_lr is not None:
        assert s.min_lr == min_lr
    assert cfg.optimizer.weight_decay == 0.05
    assert (cfg.image_size or get_stage(stage).image_size) == (448 if stage == 4 else 224)
    assert cfg.init_from == (None if stage == 1 else f"runs/tinygptv-phi2/stage{stage - 1}")
    assert cfg.data.root is None  # given on the command line
    # every schedule is valid as configured (the stage-4 typo would raise here)
    Schedule(s.kind, s.peak_lr, s.start_lr, s.min_lr, s.warmup_steps, cfg.iters_per_epoch, cfg.total_steps)


def test_phi2_data_mixes():
    from tinygptv.data.readers import READERS
    from tinygptv.train import _path_arguments

    stage1 = load_train_config(CONFIGS / "stage1.yaml").data.datasets
    assert {k: v.ratio for k, v in stage1.items()} == {"laion": 115, "cc_sbu": 14}
    stage4 = load_train_config(CONFIGS / "stage4.yaml")
    assert stage4.data.max_length == 1024 and stage4.gradient_checkpointing
    assert len(stage4.data.datasets) == 20 and sum(e.ratio for e in stage4.data.datasets.values()) == 690
    assert load_train_config(CONFIGS / "stage3.yaml").data.max_length == 160
    for n in (1, 2, 3, 4):
        for name, entry in load_train_config(CONFIGS / f"stage{n}.yaml").data.datasets.items():
            reader = READERS[entry.reader or name]  # every dataset names a reader that exists
            paths = _path_arguments(reader)
            assert paths & set(entry.args), (n, name)  # and gives it a path ...
            assert not any(str(entry.args[k]).startswith("/") for k in paths & set(entry.args))  # ... a relative one


def test_overrides_and_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: 2\nschedule:\n  peak_lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = load_train_config(path, ["epochs=3", "schedule.min_lr=2e-5", "data.root=some/dir", "grad_clip=null"])
    assert cfg.stage == 2 and cfg.epochs == 3
    assert cfg.schedule.peak_lr == 1e-4 and isinstance(cfg.schedule.peak_lr, float)
    assert cfg.schedule.min_lr == 2e-5 and cfg.data.root == "some/dir" and cfg.grad_clip is None
    assert cfg.optimizer.betas == (0.9, 0.999)
    again = load_train_config(None, [f"{k}={v}" for k, v in [("stage", 2), ("epochs", 3)]])
    assert again.stage == 2 and again.epochs == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("epoch=3", r"unknown setting\(s\) \['epoch'\]"),
        ("schedule.peak=1", r"config.schedule: unknown"),
        ("epochs=three", r"config.epochs: expected int"),
        ("precision=fp8", r"config.precision: 'fp8' is not one of"),
        ("schedule.peak_lr=fast", r"config.schedule.peak_lr: expected a number"),
        ("epochs", r"key=value"),
        ("data.datasets.laion.ratio=x", r"config.data.datasets.laion.ratio: expected a number"),
    ],
)
def test_bad_settings_name_their_path(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, [override])


def test_yaml_round_trip(tmp_path):
    cfg = load_train_config(CONFIGS / "stage4.yaml")
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_train_config(path) == cfg
    assert TrainConfig().total_steps == TrainConfig().epochs * TrainConfig().iters_per_epoch
