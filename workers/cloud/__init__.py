"""The cloud plane: execute nodes on OpenStack, booted, bootstrapped and reaped by Celery tasks.

One library per module: openstacksdk in :mod:`workers.cloud.servers`, fabric in
:mod:`workers.cloud.bootstrap`, Celery in :mod:`workers.cloud.app` and
:mod:`workers.cloud.tasks`. Decisions (flavors, reaping, scaling) are pure functions.
"""
