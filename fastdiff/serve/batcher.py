"""Dynamic batching: requests that can share a denoising loop run as one `Pipeline.run_batch`.

One worker thread owns the pipeline. It takes the oldest queued request, then gathers the queued
requests with the same `Ticket.key` (size, steps, scheduler, guidance on or off) for at most
`max_wait_s` or until `max_images`, and runs them together; requests with another key keep their
place in the queue. img2img and inpainting requests run alone (`Pipeline.run`).

Every accepted ticket's future is resolved exactly once: with its images, with the batch's
error, or cancelled while still queued (its client left or its deadline passed). A running
batch is never interrupted: it finishes for the others.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger("fastdiff.serve")


class QueueFull(RuntimeError):
    """The bounded queue holds `max_queue` requests already: the caller answers 503."""


class DeadlineExceeded(RuntimeError):
    """A request's deadline passed before its batch started."""


@dataclass
class Ticket:
    """One accepted request. `job` is a `fastdiff.pipeline.Job` for text to image; `solo` the
    keyword arguments of `Pipeline.run` for a request that runs alone (img2img, inpainting)."""

    key: tuple  # (height, width, steps, scheduler, cfg): what requests sharing a loop must agree on
    images: int  # rows it adds to a batch
    deadline: float  # time.monotonic() after which it is not started
    job: object = None
    solo: dict | None = None
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    batch_images: int = 0  # images in the batch it ran in (set before its future resolves)


@dataclass
class Batch:
    """What the worker ran: for metrics."""

    images: int
    timings: dict


_solo_ids = itertools.count()


def solo_key() -> tuple:
    """A key no other ticket has: the request runs alone."""
    return ("solo", next(_solo_ids))


def padded(n: int, max_images: int) -> int:
    """The batch size a CUDA graph is captured for: the next power of two, at most max_images
    (so at most log2(max_images) + 1 captures per size and step count); n <= max_images."""
    size = 1
    while size < n:
        size *= 2
    return max(n, min(size, max_images))


class Batcher:
    """The queue and the worker thread in front of one pipeline.

    max_images: rows per batch (1 turns batching off); max_queue: queued tickets before QueueFull;
    max_wait_s: how long the oldest request waits for others; pad: pad batches to `padded` sizes
    (on CUDA with graphs, where each size is a capture); on_batch(Batch): called after each batch.
    """

    def __init__(self, pipe, *, max_images: int = 8, max_queue: int = 64, max_wait_s: float = 0.01,
                 pad: bool = False, on_batch=None):  # fmt: skip
        self.pipe, self.max_images, self.max_queue, self.max_wait_s = pipe, max_images, max_queue, max_wait_s
        self.pad, self.on_batch = pad, on_batch
        self._queue: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="fastdiff-batcher", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            self._purge()
            return len(self._queue)

    def _purge(self) -> None:
        """Drop the tickets cancelled while queued (their clients left or timed out): they hold
        no place in the queue (called with the lock held)."""
        if any(t.future.cancelled() for t in self._queue):
            self._queue = collections.deque(t for t in self._queue if not t.future.cancelled())

    def capacity(self, key: tuple) -> int:
        """Images a batch of `key` may hold: max_images, and the pipeline's pixel budget for one
        call (`Limits.max_batch_pixels`), which padding must respect too."""
        if key[0] == "solo":
            return self.max_images
        height, width = key[0], key[1]
        return max(1, min(self.max_images, self.pipe.limits.max_batch_pixels // (height * width)))

    def submit(self, ticket: Ticket) -> Future:
        """Queue `ticket`; QueueFull when the queue is full (nothing is queued then)."""
        with self._cond:
            if self._stopped:
                raise QueueFull("the server is shutting down")
            self._purge()
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued (the limit)")
            self._queue.append(ticket)
            self._cond.notify_all()
        return ticket.future

    def stop(self) -> None:
        """Stop taking work; queued tickets are cancelled (their callers answer), a running batch ends."""
        with self._cond:
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for t in left:
            t.future.cancel()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------------------------------
    def _gather(self) -> list[Ticket]:
        """The next batch, taken from the queue (called with the lock held; waits for work)."""
        self._cond.wait_for(lambda: self._queue or self._stopped)
        if self._stopped:
            return []
        first = self._queue.popleft()
        batch, images = [first], first.images
        if first.key[0] == "solo":
            return batch
        cap = self.capacity(first.key)
        until = time.monotonic() + self.max_wait_s
        while images < cap:
            self._purge()
            for t in list(self._queue):  # oldest first; others keep their place
                if t.key == first.key and images + t.images <= cap:
                    self._queue.remove(t)
                    batch.append(t)
                    images += t.images
            left = until - time.monotonic()
            if images >= cap or left <= 0 or self._stopped:
                break
            self._cond.wait(timeout=left)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._gather()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for t in batch:
                if not t.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued: its client is gone
                if now > t.deadline:
                    t.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                    continue
                live.append(t)
            if live:
                self._run(live)

    def _run(self, tickets: list[Ticket]) -> None:
        images = sum(t.images for t in tickets)
        size = padded(images, self.capacity(tickets[0].key)) if self.pad else images
        try:
            if tickets[0].solo is not None:
                result = self.pipe.run(**tickets[0].solo, output_type="np", timed=True)
                results = [result]
            else:
                first = tickets[0].key
                height, width, steps, scheduler, _ = first
                results = self.pipe.run_batch([t.job for t in tickets], steps=steps, height=height, width=width,
                                              scheduler=scheduler, pad_to=size, timed=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the batch's requests get the error; the worker goes on
            log.warning("fastdiff.serve: a batch of %d request(s) failed: %s", len(tickets), e)
            for t in tickets:
                t.future.set_exception(e)
            return
        for t, r in zip(tickets, results):
            t.batch_images = images
            t.future.set_result(r)
        if self.on_batch is not None:
            try:
                self.on_batch(Batch(images, results[0].timings))
            except Exception:  # noqa: BLE001 - a metrics hook never stops the worker
                log.exception("fastdiff.serve: the batch hook failed")
