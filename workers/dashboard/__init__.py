"""The dashboard feed: Dispatch's events shown in Flower (``dispatch flower-feed``).

- :mod:`workers.dashboard.cli`: the command;
- :mod:`workers.dashboard.feed`: the feed's loop, connection and consumers;
- :mod:`workers.dashboard.events`: Dispatch events turned into Celery task events;
- :mod:`workers.dashboard.inspect`: answers to Flower's inspect broadcasts;
- :mod:`workers.dashboard.nodes`: what the feed knows of nodes and their jobs.
"""
