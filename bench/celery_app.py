"""The Celery baseline: the work of one Dispatch job as a Celery task.

Imported by the ``celery -A bench.celery_app worker`` subprocess and by the bench
that calls the task; both read the broker and queue from ``BENCH_BROKER_URL`` and
``BENCH_CELERY_QUEUE``. JSON only: pickle is never accepted.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import tempfile
import zipfile

from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_BROKER_URL", "amqp://localhost//"),
             backend="rpc://")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "bench.celery"),
    broker_connection_retry_on_startup=True,
)


def zip_tree(root: str) -> bytes:
    """Zip every file under ``root`` as Dispatch does: deflate level 1, relative names."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for dirpath, _, filenames in os.walk(root):
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                zf.write(path, os.path.relpath(path, root))
    return buf.getvalue()


@app.task(name="bench.run_true")
def run_true() -> str:
    """Run /bin/true in a fresh temp dir, output to files; return the dir zipped, base64."""
    workdir = tempfile.mkdtemp(prefix="celery-bench.")
    try:
        with open(os.path.join(workdir, "job.out"), "wb") as out, \
                open(os.path.join(workdir, "job.err"), "wb") as err:
            subprocess.run(["/bin/true"], cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=err, check=True)
        return base64.b64encode(zip_tree(workdir)).decode("ascii")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
