"""The paper's learning-rate schedules (section 4.1), with the paper's own numbers."""

import io
import math
from itertools import pairwise

import pytest
import torch

from tinygptv.schedules import Schedule, epoch_ramp, lambda_lr, warmup_cosine


def test_stage1_ramps_from_1e5_to_1e4_within_every_epoch():
    lrs = [epoch_ramp(step, 1000, 1e-5, 1e-4) for step in range(17 * 1000)]
    for epoch in range(17):
        window = lrs[epoch * 1000 : (epoch + 1) * 1000]
        assert window[0] == pytest.approx(1e-5)  # "commenced at 1e-5 at the beginning of each epoch"
        assert window[-1] == pytest.approx(1e-4)  # "ascended to 1e-4 by the epoch's end"
        assert all(a < b for a, b in pairwise(window))
    assert lrs[1000] < lrs[999]  # back down at the next epoch


def test_stage2_warmup_then_cosine_to_min():
    total, warmup = 4 * 5000, 5000
    lr = [warmup_cosine(s, total, warmup, 1e-6, 1e-4, 8e-5) for s in range(total)]
    assert lr[0] == pytest.approx(1e-6)
    assert lr[2500] == pytest.approx((1e-6 + 1e-4) / 2)  # linear warm-up
    assert lr[warmup] == pytest.approx(1e-4)
    assert lr[-1] == pytest.approx(8e-5)
    assert max(lr) == pytest.approx(1e-4)
    decay = lr[warmup:]
    assert all(a >= b for a, b in pairwise(decay))
    middle = warmup + (total - 1 - warmup) // 2
    assert lr[middle] == pytest.approx((1e-4 + 8e-5) / 2, rel=1e-3)  # cosine: half-way at the midpoint
    assert warmup_cosine(total + 10, total, warmup, 1e-6, 1e-4, 8e-5) == pytest.approx(8e-5)


def test_stage4_typo_min_above_peak_is_refused():
    with pytest.raises(ValueError, match="typo"):
        warmup_cosine(0, 50_000, 1000, 1e-6, 1e-5, 8e-5)  # the paper's numbers as printed
    with pytest.raises(ValueError, match="above peak_lr"):
        Schedule("warmup_cosine", 1e-5, 1e-6, 8e-5, 1000, 1000, 50_000)
    fixed = Schedule("warmup_cosine", 1e-5, 1e-6, 8e-6, 1000, 1000, 50_000)
    assert fixed(49_999) == pytest.approx(8e-6) and fixed(1000) == pytest.approx(1e-5)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear", 1e-4, 0, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule("warmup_cosine", 1e-4, 1e-6, 1e-5, 20, 10, 10)
    assert Schedule("constant", 3e-4, 0, 0, 0, 10, 10)(7) == 3e-4


def _optimizer(lr):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_lambda_lr_follows_schedule_and_resumes_from_its_state():
    schedule = Schedule("warmup_cosine", 1e-4, 1e-6, 8e-5, 5, 10, 30)
    opt = _optimizer(1e-4)
    sched = lambda_lr(opt, schedule)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([schedule(s) for s in range(12)], rel=1e-12)

    buf = io.BytesIO()
    torch.save({"scheduler": sched.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain numbers only: no pickled functions
    opt2 = _optimizer(1e-4)
    sched2 = lambda_lr(opt2, schedule)  # built fresh, then both restored: the trainer's order
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    for step in range(12, 20):
        assert opt2.param_groups[0]["lr"] == pytest.approx(schedule(step), rel=1e-12)
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step(), sched.step(), opt2.step(), sched2.step()


def test_lambda_lr_needs_the_peak_as_base_lr():
    with pytest.raises(ValueError, match="peak_lr"):
        lambda_lr(_optimizer(1e-3), Schedule("constant", 1e-4, 0, 0, 0, 10, 10))


def test_epoch_ramp_single_step_epoch_is_finite():
    assert math.isfinite(epoch_ramp(3, 1, 1e-5, 1e-4))
