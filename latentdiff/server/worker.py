"""The server's one worker thread: jobs (generations, model switches) run one at a time in arrival order
from a bounded queue; /interrupt and /skip reach the running job through its generate() callback, which
also feeds /progress (steps done, and a preview decoded when a client asks for one)."""

import base64
import logging
import queue
import threading
import time
from concurrent.futures import Future
from datetime import datetime

from ..errors import LatentDiffError
from ..images import png_bytes
from ..pipeline import Interrupted

log = logging.getLogger("latentdiff.server")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


def png_base64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


# a preview is decoded at most every this many steps (A1111's show_progress_every_n_steps default): a full
# VAE decode of a 512 px image takes seconds on a CPU, and clients poll /progress twice a second
PREVIEW_EVERY = 10


class Job:
    """A running job's state as /progress reports it, and its interrupt / skip switches."""

    def __init__(self, kind: str, iterations: int = 0, steps: int | tuple[int, ...] = 0):
        """`steps`: each iteration's, or a cycle of them (the hires fix's first and second pass)."""
        self.kind, self.iterations = kind, iterations
        self.pass_steps = steps if isinstance(steps, tuple) else (steps,)
        self.iteration, self.step = 0, 0
        self.started = time.monotonic()
        self.timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.interrupted = self.skipped = False
        self.preview_wanted, self.preview, self.preview_at = False, None, None
        self.done = 0  # steps done, over every iteration

    def callback(self, pipeline):
        """generate()'s per-step callback: counts steps, decodes a preview when one was asked for, and stops
        sampling (with the step's denoised latents as the result) when interrupted or skipped."""
        def on_step(info):
            if info["i"] == 0 and self.step:
                self.iteration += 1
            self.step, self.done = info["i"] + 1, self.done + 1
            if self.preview_wanted and (self.preview_at is None or self.done - self.preview_at >= PREVIEW_EVERY):
                self.preview_wanted, self.preview_at = False, self.done
                try:
                    self.preview = png_base64(pipeline.decode(info["denoised"][:1])[0][0])
                except LatentDiffError:  # a non-finite preview: keep the last one
                    pass
            if self.interrupted or self.skipped:
                skip, self.skipped = not self.interrupted, False
                raise Interrupted(info["denoised"], info["i"], skip=skip)
        return on_step

    @property
    def steps(self) -> int:
        return self.pass_steps[self.iteration % len(self.pass_steps)]

    def fraction(self) -> float:
        if not self.iterations or not self.steps:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.steps) / self.iterations)


class Worker:
    """Runs `task(worker, job)` callables; `pipeline` and `checkpoint` are the loaded model (tasks may
    replace them: a model switch)."""

    def __init__(self, pipeline, checkpoint, *, queue_size: int):
        self.pipeline, self.checkpoint = pipeline, checkpoint
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._job: Job | None = None
        self._seconds_per_job = 1.0  # a running average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="latentdiff-worker", daemon=True)
        self._thread.start()

    def submit(self, task, job: Job) -> Future:
        future = Future()
        try:
            self._queue.put_nowait((task, job, future))
        except queue.Full:
            raise QueueFull(max(1, round(self._seconds_per_job * (self._queue.qsize() + 1)))) from None
        return future

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put((None, None, None))
        self._thread.join(timeout)

    @property
    def job(self) -> Job | None:
        return self._job

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def interrupt(self) -> None:
        if self._job is not None:
            self._job.interrupted = True

    def skip(self) -> None:
        if self._job is not None:
            self._job.skipped = True

    def _run(self) -> None:
        while True:
            task, job, future = self._queue.get()
            if task is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            self._job, start = job, time.monotonic()
            try:
                result, error = task(self, job), None
            except Exception as e:  # the job's error goes to its client; the worker carries on
                if not isinstance(e, LatentDiffError):
                    log.exception("job %s failed", job.kind)
                result, error = None, e
            self._job = None  # idle before the client hears back
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - start)
            future.set_exception(error) if error is not None else future.set_result(result)

    def progress(self, want_preview: bool) -> dict:
        """A1111's /sdapi/v1/progress body."""
        job = self._job
        if job is None:
            state = dict(skipped=False, interrupted=False, stopping_generation=False, job="", job_count=0,
                         job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0)
            return dict(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None,
                        current_task=None, queued=self.waiting)
        if want_preview:
            job.preview_wanted = True
        fraction, elapsed = job.fraction(), time.monotonic() - job.started
        state = dict(skipped=job.skipped, interrupted=job.interrupted, stopping_generation=False, job=job.kind,
                     job_count=job.iterations, job_timestamp=job.timestamp, job_no=job.iteration,
                     sampling_step=job.step, sampling_steps=job.steps)
        return dict(progress=fraction, eta_relative=elapsed / fraction - elapsed if fraction > 0 else 0.0,
                    state=state, current_image=job.preview if want_preview else None, textinfo=None,
                    current_task=None, queued=self.waiting)
