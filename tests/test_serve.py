"""fastdiff.serve on a real uvicorn server (in-process, a free loopback port) and the embedded
model: PNG and JSON answers equal to Pipeline.generate for the same seed, batched requests equal
to each one alone, a 422 naming each bad field, 503 when the queue is full, a disconnected client's
queued work dropped, a deadline, a backend fault failing one batch only, the API key."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from fastdiff import testing  # noqa: E402
from fastdiff.pipeline import Pipeline  # noqa: E402
from fastdiff.serve.app import Settings, create_app  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(testing.TINY_SHAPES, backend="torch", device="cpu")


@contextlib.contextmanager
def running(app):
    """uvicorn serving `app` on a free loopback port, in a thread; yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 30 and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(port, method, path, body=None, headers=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).replace('"NaN"', "NaN").encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def concurrently(port, reqs: list[dict]) -> list:
    """POST every request at once, one thread each; the answers in request order."""
    answers = [None] * len(reqs)

    def send(i):
        answers[i] = call(port, "POST", "/v1/images", reqs[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def as_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def reference(pipe, **kw) -> np.ndarray:
    """What Pipeline.generate makes, as the server's PNGs hold it (uint8)."""
    images = pipe.generate(**{"steps": STEPS, **kw}, output_type="np")
    return (images * 255).round().astype(np.int16)


class Gate:
    """Holds the batcher's worker inside its next batch until opened; counts the batches."""

    def __init__(self, pipe, monkeypatch, fail_once: bool = False):
        self.opened, self.entered, self.calls, self.fail_once = threading.Event(), threading.Event(), [], fail_once
        real = pipe.run_batch

        def run_batch(jobs, **kw):
            self.calls.append([j.seed for j in jobs])
            self.entered.set()
            self.opened.wait(60)
            if self.fail_once:
                self.fail_once = False
                raise RuntimeError("injected backend fault")
            return real(jobs, **kw)

        monkeypatch.setattr(pipe, "run_batch", run_batch)


def test_png_json_health_and_metrics(pipe):
    app = create_app(Settings(warmup=False), pipe)
    with running(app) as port:
        assert call(port, "GET", "/healthz")[0] == 200
        status, _, body = call(port, "GET", "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        status, headers, body = call(port, "POST", "/v1/images", {"prompt": "a red circle", "seed": 5, "steps": STEPS},
                                     {"Accept": "image/png"})  # fmt: skip
        assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "5"
        assert np.abs(as_array(body) - reference(pipe, prompt="a red circle", seed=5)[0]).max() <= 1
        req = {"prompt": "a blue square", "negative_prompt": "red", "seed": 6, "steps": STEPS, "num_images": 2,
               "guidance_scale": 4.0, "scheduler": "euler_a"}  # fmt: skip
        status, _, body = call(port, "POST", "/v1/images", req)
        out = json.loads(body)
        want = reference(pipe, prompt="a blue square", negative_prompt="red", seed=6, num_images=2, guidance_scale=4.0,
                         scheduler="euler_a")  # fmt: skip
        got = np.stack([as_array(base64.b64decode(b)) for b in out["images"]])
        assert status == 200 and out["seed"] == 6 and np.abs(got - want).max() <= 1
        status, _, body = call(port, "POST", "/v1/images", {"prompt": "x", "steps": 2})
        assert status == 200 and 0 <= json.loads(body)["seed"] < 2**63  # drawn by the server, returned
        metrics = call(port, "GET", "/metrics")[2].decode()
        assert "fastdiff_queue_depth 0.0" in metrics and 'fastdiff_requests_total{status="200"} 3.0' in metrics
        assert 'fastdiff_stage_seconds_count{stage="denoise"} 3.0' in metrics
        assert call(port, "GET", "/openapi.json")[0] == 200


def test_img2img_request(pipe):
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    image.paste((220, 30, 30), (10, 20, 34, 44))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with running(create_app(Settings(warmup=False), pipe)) as port:
        req = {"prompt": "a blue circle", "seed": 3, "steps": STEPS, "image": base64.b64encode(buf.getvalue()).decode(),
               "strength": 0.7}  # fmt: skip
        status, _, body = call(port, "POST", "/v1/images", req, {"Accept": "image/png"})
    assert status == 200, body
    want = reference(pipe, prompt="a blue circle", seed=3, image=image, strength=0.7)[0]
    assert np.abs(as_array(body) - want).max() <= 1


def test_batched_requests_equal_each_alone(pipe):
    """Six concurrent requests (prompts, seeds, guidance, negative prompts and image counts all
    differ) share denoising loops; each answer is what that request makes alone."""
    app = create_app(Settings(warmup=False, max_wait_ms=300, max_batch_images=8), pipe)
    reqs = [{"prompt": p, "seed": 10 + i, "steps": STEPS, "guidance_scale": g, "negative_prompt": neg, "num_images": k}
            for i, (p, g, neg, k) in enumerate([("a red circle", 7.5, None, 1), ("a green square", 3.0, "blue", 2),
                                                 ("a yellow triangle", 5.0, None, 1), ("a blue circle", 9.0, "red", 1),
                                                 ("a red square", 2.0, None, 2), ("a purple circle", 7.5, None, 1)])]  # fmt: skip
    reqs += [{"prompt": "a red circle", "seed": 30, "steps": STEPS + 1},  # another loop: never in the others' batch
             {"prompt": "a red circle", "seed": 31, "steps": STEPS, "guidance_scale": 1.0}]  # fmt: skip
    with running(app) as port:
        answers = concurrently(port, reqs)
    sizes = []
    for req, (status, _, body) in zip(reqs, answers):
        assert status == 200, body
        out = json.loads(body)
        sizes.append(out["batch_images"])
        got = np.stack([as_array(base64.b64decode(b)) for b in out["images"]])
        want = reference(pipe, **req)
        assert np.abs(got - want).max() <= 1, req
    assert max(sizes) > 2 and sizes[-2:] == [1, 1]  # requests did share loops, only with their own kind


# (request body, the field the 422 names)
BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 2001}, "negative_prompt"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 101}, "steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 1e9}, "guidance_scale"),
    ({"prompt": "x", "height": 100}, "height"),
    ({"prompt": "x", "height": 4096, "width": 4096}, "height"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "scheduler": "nope"}, "scheduler"),
    ({"prompt": "x", "num_images": 5}, "num_images"),
    ({"prompt": "x", "image": "not base64!"}, "image"),
    ({"prompt": "x", "image": "BIG"}, "image"),  # 4096 x 4096 px: refused before its pixels are decoded
    ({"prompt": "x", "strength": 0.5}, "strength"),
    ({"prompt": "x", "mask_image": base64.b64encode(b"x").decode()}, "mask_image"),
    ({"prompt": "x", "timeout_s": 1e6}, "timeout_s"),
    ({"prompt": "x", "model": "sd15"}, "model"),  # the model is chosen at start, never by a request
    ({"prompt": "x", "guidance_scale": "NaN"}, "guidance_scale"),  # sent as a bare NaN token
    ({"prompt": "x", "image": "BMP"}, "image"),  # PNG and JPEG only: Pillow's other decoders stay shut
]


def test_each_bad_field_is_a_422_naming_it(pipe):
    encoded = {}
    for name, size, fmt in (("BIG", 4096, "PNG"), ("BMP", 64, "BMP")):
        buf = io.BytesIO()
        Image.new("L", (size, size)).save(buf, format=fmt)
        encoded[name] = base64.b64encode(buf.getvalue()).decode()
    with running(create_app(Settings(warmup=False, max_body_bytes=2**20), pipe)) as port:
        for body, field in BAD:
            body = {k: encoded.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
            status, _, out = call(port, "POST", "/v1/images", body)
            detail = json.loads(out)["detail"]
            assert status == 422 and detail[0]["loc"][:2] == ["body", field], (body, out)
        status, _, out = call(port, "POST", "/v1/images", {"prompt": "x", "image": "A" * 2**20})
        assert status == 413 and "over 1048576 bytes" in json.loads(out)["detail"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # chunked: no Content-Length to go by
        conn.request("POST", "/v1/images", body=iter([b'{"prompt": "x", "image": "', b"A" * 2**20, b'"}']),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
        r = conn.getresponse()
        assert r.status == 413 and "over 1048576 bytes" in json.loads(r.read())["detail"]


def test_queue_full_disconnect_and_deadline(pipe, monkeypatch):
    """With the worker held inside a batch and a queue of 2: a third request is refused with 503
    and Retry-After; a queued client that disconnects and one whose deadline passes are dropped,
    never run; the requests left are answered once the worker goes on."""
    gate = Gate(pipe, monkeypatch)
    app = create_app(Settings(warmup=False, max_queue=2, max_wait_ms=0, max_batch_images=1), pipe)
    answers = {}
    with running(app) as port:
        def send(name, body):
            answers[name] = call(port, "POST", "/v1/images", body)

        first = threading.Thread(target=send, args=("running", {"prompt": "a", "seed": 1, "steps": 2}))
        first.start()
        assert gate.entered.wait(30)
        late = threading.Thread(target=send, args=("late", {"prompt": "b", "seed": 2, "steps": 2, "timeout_s": 0.3}))
        late.start()
        leaver = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"prompt": "c", "seed": 3, "steps": 2}).encode()
        leaver.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        t0 = time.monotonic()
        while app.state.server.batcher.depth() < 2:
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        status, headers, _ = call(port, "POST", "/v1/images", {"prompt": "d", "seed": 4, "steps": 2})
        assert status == 503 and headers["retry-after"] == "2"
        leaver.close()
        late.join()
        assert answers["late"][0] == 504
        t0 = time.monotonic()
        while "disconnected" not in call(port, "GET", "/metrics")[2].decode():
            assert time.monotonic() - t0 < 30
            time.sleep(0.05)
        gate.opened.set()
        first.join()
        assert answers["running"][0] == 200
        status, _, _ = call(port, "POST", "/v1/images", {"prompt": "e", "seed": 5, "steps": 2})
        assert status == 200
        metrics = call(port, "GET", "/metrics")[2].decode()
    assert gate.calls == [[1], [5]]  # the dropped requests never ran
    for reason in ("queue_full", "deadline", "disconnected"):
        assert f'fastdiff_rejected_total{{reason="{reason}"}} 1.0' in metrics


def test_backend_fault_fails_one_batch_only(pipe, monkeypatch):
    gate = Gate(pipe, monkeypatch, fail_once=True)
    gate.opened.set()
    with running(create_app(Settings(warmup=False), pipe)) as port:
        status, _, body = call(port, "POST", "/v1/images", {"prompt": "a", "seed": 1, "steps": 2})
        assert status == 500 and "injected backend fault" in json.loads(body)["detail"]
        status, _, body = call(port, "POST", "/v1/images", {"prompt": "a", "seed": 1, "steps": 2})
        assert status == 200


def test_api_key(pipe):
    with running(create_app(Settings(warmup=False, api_key="s3cret"), pipe)) as port:
        body = {"prompt": "a", "seed": 1, "steps": 2}
        assert call(port, "POST", "/v1/images", body)[0] == 401
        assert call(port, "POST", "/v1/images", {"steps": "bad"})[0] == 401  # before the body is read
        assert call(port, "GET", "/metrics")[0] == 401 and call(port, "GET", "/readyz")[0] == 200
        assert call(port, "POST", "/v1/images", body, {"X-API-Key": "wrong"})[0] == 401
        assert call(port, "POST", "/v1/images", body, {"X-API-Key": "s3cret"})[0] == 200
        assert call(port, "POST", "/v1/images", body, {"Authorization": "Bearer s3cret"})[0] == 200


def test_batches_keep_to_the_pixel_budget_and_cancelled_tickets_free_their_place(pipe, monkeypatch):
    """A batch never holds more pixels than one Pipeline call may (Limits.max_batch_pixels), so
    requests each within the limits never fail together; a cancelled queued ticket no longer counts
    against the queue."""
    import dataclasses

    from fastdiff.pipeline import Job
    from fastdiff.serve.batcher import Batcher, QueueFull, Ticket

    gate = Gate(pipe, monkeypatch)
    monkeypatch.setattr(pipe, "limits", dataclasses.replace(pipe.limits, max_batch_pixels=3 * 64 * 64))
    batcher = Batcher(pipe, max_images=8, max_queue=4, max_wait_s=0.2)
    key = (64, 64, 2, "dpmpp_2m", True)
    try:
        first = batcher.submit(Ticket(key, 1, time.monotonic() + 60, job=Job("a", None, 0, 7.5, 1)))
        assert gate.entered.wait(30)  # the worker holds the first batch
        tickets = [Ticket(key, 1, time.monotonic() + 60, job=Job("a", None, i, 7.5, 1)) for i in range(1, 5)]
        for t in tickets:
            batcher.submit(t)
        with pytest.raises(QueueFull):
            batcher.submit(Ticket(key, 1, time.monotonic() + 60, job=Job("a", None, 9, 7.5, 1)))
        assert tickets[1].future.cancel()  # its client left
        extra = [Ticket(key, 1, time.monotonic() + 60, job=Job("a", None, i, 7.5, 1)) for i in (5, 6)]
        batcher.submit(extra[0])  # the cancelled ticket's place
        with pytest.raises(QueueFull):
            batcher.submit(extra[1])
        gate.opened.set()
        for f in [first] + [t.future for t in (tickets[0], tickets[2], tickets[3], extra[0])]:
            f.result(timeout=60)
    finally:
        batcher.stop()
    assert gate.calls == [[0], [1, 3, 4], [5]]  # 3 images of 64 px fill the budget


def test_run_batch_rules(pipe):
    from fastdiff.pipeline import Job
    from fastdiff.serve.batcher import padded

    jobs = [Job("a red circle", None, 1, 7.5, 1), Job("a blue square", "red", 2, 3.0, 2)]
    plain = pipe.run_batch(jobs, steps=3, scheduler="euler_a")
    # Padded to 8, the matmuls have other shapes, which the CPU rules time apart (fp32 linears:
    # `ops.fp32_packing_pays`): F.linear at one and oneDNN at the other round differently, by
    # about 1e-5 here; a padding row that leaked into the images would move them by far more.
    for a, b in zip(plain, pipe.run_batch(jobs, steps=3, scheduler="euler_a", pad_to=8)):
        np.testing.assert_allclose(a.images, b.images, atol=1e-4)
    assert [r.images.shape[0] for r in plain] == [1, 2]
    with pytest.raises(ValueError, match="guidance_scale > 1 in some jobs"):
        pipe.run_batch([jobs[0], Job("x", None, 3, 1.0, 1)], steps=3)
    with pytest.raises(ValueError, match="jobs: give at least one"):
        pipe.run_batch([], steps=3)
    assert [padded(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8] and padded(6, 6) == 6


def test_beyond_loopback_needs_a_key():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastdiff.serve", "--host", "0.0.0.0"], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "FASTDIFF_API_KEY": ""})  # fmt: skip
    assert proc.returncode == 2 and "--api-key" in proc.stderr
