"""fastdiff.serve as a Ray Serve deployment with 2 replicas on a local Ray instance (CPU, the
embedded model): every request answered with the image Pipeline.generate makes for its seed,
both replicas serving, a bad field still a 422 through Ray's proxy."""

from __future__ import annotations

import base64
import json
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from test_serve import STEPS, as_array, call, concurrently, reference  # noqa: E402

from fastdiff import testing  # noqa: E402
from fastdiff.pipeline import Pipeline  # noqa: E402
from fastdiff.serve import ray_app  # noqa: E402
from fastdiff.serve.app import Settings  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(backend="torch", device="cpu", max_wait_ms=50)
        app = ray_app.deployment(settings, num_replicas=2, ray_actor_options={"num_cpus": 1},
                                 max_ongoing_requests=16).bind()  # fmt: skip
        serve.run(app, name="fastdiff", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_config_file_is_a_valid_serve_config():
    """fastdiff/serve/ray_serve.yaml passes Ray Serve's own schema, and its args build the app."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(ray_app.__file__).parent / "ray_serve.yaml").read_text())
    ServeDeploySchema(**config)
    (app,) = config["applications"]
    assert app["import_path"] == "fastdiff.serve.ray_app:build"
    ray_app.build(app["args"])
    with pytest.raises(ValueError, match="unknown server settings: modle"):
        ray_app.build({"modle": "x"})


def test_two_replicas_answer_like_the_pipeline(endpoint):
    pipe = Pipeline.from_pretrained(testing.TINY_SHAPES, backend="torch", device="cpu")
    replicas = set()
    # Rounds of 8 requests at once until both replicas have answered: Ray's router may send one
    # round's requests to one replica when they do not overlap there (a loaded machine), but
    # not four rounds' (a router that uses one replica fails here).
    for round_ in range(4):
        reqs = [{"prompt": ["a red circle", "a blue square"][i % 2], "seed": 20 + 8 * round_ + i, "steps": STEPS} for i in range(8)]
        answers = concurrently(endpoint, reqs)
        for req, (status, headers, body) in zip(reqs, answers):
            assert status == 200, body
            replicas.add(headers["x-fastdiff-replica"])
            got = as_array(base64.b64decode(json.loads(body)["images"][0]))
            want = reference(pipe, prompt=req["prompt"], seed=req["seed"])[0]
            assert np.abs(got - want).max() <= 1, req
        if len(replicas) == 2:
            break
    assert len(replicas) == 2
    status, _, body = call(endpoint, "POST", "/v1/images", {"prompt": "x", "steps": 0})
    assert status == 422 and json.loads(body)["detail"][0]["loc"] == ["body", "steps"]
