"""The batcher's queue logic: which requests go together, the bound on waiting requests, failures
and shutdown. The model is replaced by a function that records the batches it is given."""

from __future__ import annotations

import threading

import pytest

from tinygptv.generate import SamplingParams
from tinygptv.serve.batcher import Batcher, Job, QueueFull, ShuttingDown
from tinygptv.serve.engine import Completion
from tinygptv.serve.messages import ChatTurns, PreparedChat


def job(question: str, stream: bool = False, **sampling) -> Job:
    chat = PreparedChat(images=[], turns=ChatTurns(question), prompt_ids=[5, 6, 7], params=SamplingParams(**sampling))
    return Job(chat, stream=stream, on_piece=(lambda piece: None) if stream else None)


class Recorder:
    """Answers each job with its question; the first batch waits until ``release`` is set."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def run_batch(self, jobs):
        self.entered.set()
        if not self.batches:
            self.release.wait(10)
        self.batches.append([j.chat.turns.question for j in jobs])
        if self.fail_on in self.batches[-1]:
            raise RuntimeError("the model broke")
        return [Completion(j.chat.turns.question, "stop", 3, 1, [], len(jobs)) for j in jobs]

    def run_stream(self, job):
        self.batches.append(["stream:" + job.chat.turns.question])
        job.on_piece("x")
        return Completion(job.chat.turns.question, "stop", 3, 1, [])


def batcher(recorder: Recorder, **kwargs) -> Batcher:
    return Batcher(recorder.run_batch, recorder.run_stream, **{"batch_wait": 0.0, **kwargs}).start()


def wait_running(rec: Recorder) -> None:
    """Until the worker is inside the first batch (so later jobs queue behind it)."""
    assert rec.entered.wait(10)


def test_compatible_requests_go_together_others_wait_their_turn():
    rec = Recorder()
    b = batcher(rec, max_batch_size=8)
    first = b.submit(job("first"))
    wait_running(rec)  # the worker holds "first" until released
    jobs = [
        job("a1"),
        job("b1", temperature=0.5),
        job("a2"),
        job("s", stream=True),
        job("a3"),
        job("c1", max_new_tokens=7),
        job("seeded1", seed=1),
        job("seeded2", seed=1),
    ]
    futures = [b.submit(j) for j in jobs]
    rec.release.set()
    results = [f.result(10) for f in [first, *futures]]
    b.stop()
    assert rec.batches == [["first"], ["a1", "a2", "a3"], ["b1"], ["stream:s"], ["c1"], ["seeded1"], ["seeded2"]]
    assert [r.text for r in results] == ["first", "a1", "b1", "a2", "s", "a3", "c1", "seeded1", "seeded2"]
    assert results[1].batch_size == 3 and b.stats.largest_batch == 3 and b.stats.requests == 9


def test_batches_are_at_most_max_batch_size():
    rec = Recorder()
    b = batcher(rec, max_batch_size=2)
    futures = [b.submit(job("first"))]
    wait_running(rec)
    futures += [b.submit(job(f"q{k}")) for k in range(5)]
    rec.release.set()
    for f in futures:
        f.result(10)
    b.stop()
    assert rec.batches == [["first"], ["q0", "q1"], ["q2", "q3"], ["q4"]]


def test_a_full_queue_refuses_and_recovers():
    rec = Recorder()
    b = batcher(rec, max_queue=2)
    first = b.submit(job("first"))
    wait_running(rec)
    waiting = [b.submit(job("w1")), b.submit(job("w2"))]
    with pytest.raises(QueueFull):
        b.submit(job("one too many"))
    rec.release.set()
    assert [f.result(10).text for f in [first, *waiting]] == ["first", "w1", "w2"]
    assert b.submit(job("later")).result(10).text == "later"
    b.stop()


def test_a_failing_batch_fails_its_requests_only():
    rec = Recorder(fail_on="bad")
    b = batcher(rec)
    rec.release.set()
    bad = b.submit(job("bad"))
    with pytest.raises(RuntimeError, match="the model broke"):
        bad.result(10)
    assert b.submit(job("good")).result(10).text == "good"
    assert b.stats.failed == 1
    b.stop()


def test_requests_whose_client_left_are_skipped():
    rec = Recorder()
    b = batcher(rec)
    first = b.submit(job("first"))
    wait_running(rec)
    gone = b.submit(job("gone"))
    assert gone.cancel()
    kept = b.submit(job("kept"))
    rec.release.set()
    assert kept.result(10).text == "kept" and first.result(10).text == "first"
    b.stop()
    assert ["gone"] not in rec.batches and all("gone" not in batch for batch in rec.batches)


def test_stop_fails_waiting_requests_and_refuses_new_ones():
    rec = Recorder()
    b = batcher(rec)
    first = b.submit(job("first"))
    wait_running(rec)
    waiting = b.submit(job("waiting"))
    threading.Timer(0.2, rec.release.set).start()
    b.stop()
    assert first.result(10).text == "first"  # the running batch finishes
    with pytest.raises(ShuttingDown):
        waiting.result(10)
    with pytest.raises(ShuttingDown):
        b.submit(job("after"))
