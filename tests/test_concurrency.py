"""generate()'s pipeline cache: a load or export in one thread never holds up calls to pipelines
that are already loaded, and threads asking for the same new pipeline share one load.

The slow load is a stand-in that blocks until the test releases it, so nothing here depends on
timing: a call that waited on the load would never finish while the load is held.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fastdiff
import fastdiff.pipeline as P
from fastdiff.weights import resolve_model

MODEL = resolve_model("tiny-shapes")
RUN = dict(steps=2, seed=1, output_type="np", backend="torch")


class RecordingCache(dict):
    """generate()'s cache, noting when a caller finds a pipeline entry already there."""

    def __init__(self):
        super().__init__()
        self.found = threading.Event()

    def get(self, key, default=None):
        value = super().get(key, default)
        if value is not None:
            self.found.set()
        return value


@pytest.fixture
def slow_loads(monkeypatch, tmp_path):
    """Loads of the folder named "slow" block until `release` is set; every load is counted."""
    slow = shutil.copytree(MODEL, tmp_path / "slow")
    real = P.Pipeline.from_pretrained.__func__
    state = dict(loads=[], started=threading.Event(), release=threading.Event(), cache=RecordingCache())

    def load(cls, root, **kwargs):
        state["loads"].append(Path(root).name)
        if Path(root).name == "slow":
            state["started"].set()
            assert state["release"].wait(120), "the test never released the slow load"
        return real(cls, root, **kwargs)

    monkeypatch.setattr(P.Pipeline, "from_pretrained", classmethod(load))
    monkeypatch.setattr(P, "_cache", state["cache"])
    yield slow, state
    state["release"].set()


def call_in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_loaded_pipeline_answers_while_another_model_loads(slow_loads):
    slow, state = slow_loads
    fastdiff.generate("a red circle", model=MODEL, **RUN)  # loaded before the slow load starts
    t0 = time.perf_counter()
    solo = fastdiff.generate("a red circle", model=MODEL, **RUN)
    solo_s = time.perf_counter() - t0

    loader, _ = call_in_thread(lambda: fastdiff.generate("a blue square", model=slow, **RUN))
    assert state["started"].wait(60)
    t0 = time.perf_counter()
    caller, out = call_in_thread(lambda: fastdiff.generate("a red circle", model=MODEL, **RUN))
    caller.join(60)
    during_s = time.perf_counter() - t0
    assert not caller.is_alive() and "error" not in out, "a call to a loaded pipeline waited on another model's load"
    assert not state["release"].is_set()  # it answered while the other load was still held
    np.testing.assert_array_equal(out["value"], solo)
    print(f"loaded pipeline: {solo_s:.3f} s alone, {during_s:.3f} s while another model loads")

    state["release"].set()
    loader.join(120)
    assert not loader.is_alive()


def test_two_threads_asking_for_the_same_new_pipeline_load_it_once(slow_loads):
    slow, state = slow_loads
    first, out1 = call_in_thread(lambda: fastdiff.generate("a blue square", model=slow, **RUN))
    assert state["started"].wait(60)
    second, out2 = call_in_thread(lambda: fastdiff.generate("a blue square", model=slow, **RUN))
    assert state["cache"].found.wait(60), "the second caller never found the load in progress"
    state["release"].set()
    for t in (first, second):
        t.join(120)
    assert "error" not in out1 and "error" not in out2, (out1.get("error"), out2.get("error"))
    assert state["loads"] == ["slow"]
    np.testing.assert_array_equal(out1["value"], out2["value"])


def test_a_failed_load_is_reported_to_every_waiter_and_retried(monkeypatch, tmp_path):
    broken = shutil.copytree(MODEL, tmp_path / "broken")
    (broken / "unet" / "config.json").write_text("{")
    monkeypatch.setattr(P, "_cache", {})
    for _ in range(2):  # not cached: the second call loads (and fails) again, naming the file
        with pytest.raises(ValueError, match="config.json"):
            fastdiff.generate("x", model=broken, **RUN)
    assert P._cache == {}
