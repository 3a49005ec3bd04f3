"""The floor: a minimal hand-written dispatcher doing the same work, measured in the same run.

The issue's reference figures come from a faster machine (a minimal kombu dispatcher
at 1.5 ms p50 and 700-840 jobs/s, Celery at 3.1 ms and 480 jobs/s). To tell what the
host allows from what Dispatch's code costs, the bench runs, on the same broker and
minutes apart, a dispatcher with nothing but the job in it, in two variants:

- ``bare``: what such a dispatcher usually is. The job is published persistent with
  no confirm; a worker process runs it and sends one persistent reply with the zip,
  then acks the job.
- ``protocol``: the same, plus exactly the guarantees Dispatch's protocol asks for and
  nothing else: the pool queue has ``x-max-priority`` 9, the job is published
  mandatory and confirmed, the worker's ``Exited`` reply is persistent and confirmed,
  and the job is acked once it is confirmed. (No ``Running`` reply: Dispatch sends
  none for a job this short. Until session 10 this variant sent one, persistent and
  confirmed; the ``running`` feature still adds it.)

The work is the Celery task's (``bench.celery_app``): a fresh temp dir, ``/bin/true``
through ``subprocess`` with stdout/stderr to files, the dir zipped at deflate level 1,
removed. Each worker process holds one job at a time (prefetch 1); two processes give
two slots. No header parsing, validation, requirements, limits, ledger or logging:
what is left between this and Dispatch is what Dispatch's features cost.

The worker side runs as ``python -m bench.minimal serve URL QUEUE ROOT {bare,protocol}``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import kombu

from bench import cpu, stats, testbed
from bench.celery_app import zip_tree

TIMEOUT_S = 30.0
VARIANTS = ("bare", "protocol")
#: What ``protocol`` adds to ``bare``; a variant may also name some of them, "+"-joined.
FEATURES = ("priority", "submit-confirms", "reply-confirms", "running")
#: What Dispatch's protocol guarantees for a short job (no Running reply).
PROTOCOL = ("priority", "submit-confirms", "reply-confirms")


def features(variant: str) -> frozenset[str]:
    """Return the protocol features a variant name stands for."""
    if variant == "bare":
        return frozenset()
    if variant == "protocol":
        return frozenset(PROTOCOL)
    named = frozenset(variant.split("+"))
    if not named <= set(FEATURES):
        raise ValueError(f"unknown variant {variant!r}")
    return named
PROCESSES = 2
_PERSISTENT = 2
_DEVNULL = subprocess.DEVNULL


class _Confirms:
    """Counts the broker's confirms on a channel in confirm mode."""

    def __init__(self, channel: Any) -> None:
        self.published = 0
        self.acked = 0
        self.nacked = 0
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self.acked = delivery_tag if multiple else self.acked + 1

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked += 1

    def settled(self) -> bool:
        if self.nacked:
            raise RuntimeError("the broker refused a message (basic.nack)")
        return self.acked >= self.published


def _reply(channel: Any, confirms: _Confirms | None, message: Any, state: str,
           body: bytes = b"") -> None:
    props = message.properties
    reply = amqp.Message(body, delivery_mode=_PERSISTENT,
                         correlation_id=props.get("correlation_id"),
                         content_type="application/zip" if body else None,
                         application_headers={"JobState": state})
    channel.basic_publish(reply, exchange="", routing_key=props["reply_to"],
                          mandatory=confirms is not None)
    if confirms is not None:
        confirms.published += 1


def serve(url: str, queue: str, root: str, variant: str) -> None:
    """Take jobs from ``queue`` one at a time until SIGTERM; run each; reply."""
    wanted = features(variant)
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        confirms = _Confirms(channel) if "reply-confirms" in wanted else None

        def on_message(message: Any) -> None:
            if "running" in wanted:
                _reply(channel, confirms, message, "Running")
            workdir = tempfile.mkdtemp(dir=root)
            try:
                with open(os.path.join(workdir, "job.out"), "wb") as out, \
                        open(os.path.join(workdir, "job.err"), "wb") as err:
                    code = subprocess.run(["/bin/true"], cwd=workdir, stdin=_DEVNULL,
                                          stdout=out, stderr=err, check=False).returncode
                _reply(channel, confirms, message, f"Exited {code}", zip_tree(workdir))
                while confirms is not None and not confirms.settled():
                    conn.drain_events(timeout=TIMEOUT_S)
                message.ack()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

        # Bodies are never decoded (on_message takes the raw message); accept= says so.
        with kombu.Consumer(channel, queues=[kombu.Queue(queue, no_declare=True)],
                            on_message=on_message, accept=["application/zip"]):
            while True:
                conn.drain_events()


class _Client:
    """Publishes jobs to the pool queue and collects the replies on its own queue."""

    def __init__(self, conn: kombu.Connection, queue: str, variant: str) -> None:
        self.conn = conn
        self.confirmed = "submit-confirms" in features(variant)
        self.channel = conn.channel()
        self.reply_queue = f"bench.minimal.reply.{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(self.reply_queue, durable=True, auto_delete=False,
                                   arguments={"x-expires": 3_600_000})
        self.confirms = _Confirms(self.channel) if self.confirmed else None
        self.queue = queue
        self.finished: set[str] = set()
        self.channel.basic_qos(0, 1000, False)
        self.consumer = kombu.Consumer(self.channel,
                                       queues=[kombu.Queue(self.reply_queue, no_declare=True)],
                                       on_message=self._on_reply,
                                       accept=["application/zip"])
        self.consumer.consume()

    def _on_reply(self, message: Any) -> None:
        state = message.headers.get("JobState", "")
        if state.startswith("Exited"):
            if state != "Exited 0" or not message.body.startswith(b"PK"):
                raise RuntimeError(f"minimal job failed: {state}")
            self.finished.add(message.properties["correlation_id"])
        message.ack()

    def submit(self) -> str:
        job_id = uuid.uuid4().hex
        job = amqp.Message(b"", delivery_mode=_PERSISTENT, message_id=job_id,
                           correlation_id=job_id, reply_to=self.reply_queue,
                           application_headers={"Cmd": "/bin/true"})
        self.channel.basic_publish(job, exchange="", routing_key=self.queue,
                                   mandatory=self.confirmed)
        if self.confirms is not None:
            self.confirms.published += 1
        return job_id

    def drain_until(self, done: Any) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not (done() and (self.confirms is None or self.confirms.settled())):
            self.conn.drain_events(timeout=max(0.001, deadline - time.monotonic()))

    def delete(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.queue_delete(self.reply_queue)


def _run_latency(client: _Client, jobs: int, warmup: int) -> list[float]:
    samples: list[float] = []
    for i in range(warmup + jobs):
        started = time.perf_counter()
        job_id = client.submit()
        client.drain_until(lambda j=job_id: j in client.finished)
        elapsed = time.perf_counter() - started
        if i >= warmup:
            samples.append(elapsed)
    return samples


def _run_throughput(client: _Client, jobs: int) -> float:
    started = time.perf_counter()
    ids = {client.submit() for _ in range(jobs)}
    client.drain_until(lambda: ids <= client.finished)
    return time.perf_counter() - started


def _worker_argv(url: str, queue: str, root: Path, variant: str, run_as: str) -> list[str]:
    argv = [sys.executable, "-m", "bench.minimal", "serve", url, queue, str(root), variant]
    if os.geteuid() == 0:
        account = pwd.getpwnam(run_as)
        argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                "--clear-groups", *argv]
        os.chown(root, account.pw_uid, account.pw_gid)
    return argv


@contextlib.contextmanager
def _workers(url: str, work: Path, queue: str, variant: str,
             run_as: str) -> Iterator[list[Any]]:
    root = work / f"jobs-minimal-{variant}"
    root.mkdir(mode=0o755)
    argv = _worker_argv(url, queue, root, variant, run_as)
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(testbed.subprocess_running(
                     argv, work / f"worker-minimal-{variant}-{i}.log", cwd=work / "src"))
                 for i in range(PROCESSES)]
        testbed.wait_for_consumer(url, queue, procs[0], consumers=PROCESSES)
        yield procs


def measure(url: str, work: Path, *, latency_jobs: int, warmup: int,
            throughput_jobs: int, run_as: str = "nobody",
            variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Measure each variant (latency, then throughput with two processes)."""
    figures: dict[str, Any] = {}
    for variant in variants:
        queue = f"bench.minimal.{variant}.{uuid.uuid4().hex[:8]}"
        arguments = {"x-max-priority": 9} if "priority" in features(variant) else None
        with kombu.Connection(url) as conn:
            conn.channel().queue_declare(queue, durable=True, auto_delete=False,
                                         arguments=arguments)
            client = _Client(conn, queue, variant)
            try:
                with _workers(url, work, queue, variant, run_as) as procs:
                    print(f"minimal ({variant}): latency, {latency_jobs} jobs one at a time",
                          file=sys.stderr)
                    samples = _run_latency(client, latency_jobs, warmup)
                    print(f"minimal ({variant}): throughput, {throughput_jobs} jobs in "
                          f"flight, {PROCESSES} processes", file=sys.stderr)
                    meter = cpu.Meter(url, [p.pid for p in procs])
                    before = meter.read()
                    elapsed = _run_throughput(client, throughput_jobs)
                    per_job = cpu.per_job_ms(before, meter.read(), throughput_jobs)
            finally:
                client.delete()
        figures[variant] = {
            "latency": stats.latency_figures(samples),
            "throughput": {**stats.throughput_figures(throughput_jobs, elapsed),
                           "processes": PROCESSES, "cpu_ms_per_job": per_job},
        }
        testbed.delete_queues(url, [queue])
    return figures


def main(argv: list[str]) -> int:
    """``serve URL QUEUE ROOT VARIANT``: the worker side, as a subprocess of the bench."""
    if len(argv) != 5 or argv[0] != "serve":
        print("usage: python -m bench.minimal serve URL QUEUE ROOT {bare,protocol}",
              file=sys.stderr)
        return 2
    features(argv[4])  # an unknown variant fails here, not in the loop
    with contextlib.suppress(KeyboardInterrupt):
        serve(*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
