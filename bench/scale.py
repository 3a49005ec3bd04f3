"""``python -m bench --scale``: the scale phases, against one broker and one private PostgreSQL.

1. :mod:`bench.scale_queue`: jobs queued before any node starts, then drained by 2 nodes;
2. :mod:`bench.scale_nodes`: 1 -> 5 -> 20 single-slot nodes with a ledger;
3. :mod:`bench.scale_ledger`: ``dispatch q`` and ``dispatch history`` over a million jobs
   (in the database the nodes phase used, so its real jobs are the rows' templates).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench import postgres, scale_ledger, scale_nodes, scale_queue

#: How far a process's memory may move from the first mark to the last (issue 16).
FLAT_MIB = 20.0
#: How long ``dispatch q`` and ``dispatch history`` may take over a million jobs.
COMMAND_S = 1.0


def measure(url: str, work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """Run the three scale phases with ``sizes`` (see ``bench.__main__``); return the figures."""
    if not postgres.installed():
        raise RuntimeError(f"the scale phases need PostgreSQL ({postgres.PG_BIN} is missing)")
    out: dict[str, Any] = {}
    out["queued"] = scale_queue.measure(url, work, jobs=sizes["scale_jobs"], nodes=2, slots=1)
    with postgres.server() as server:
        db_url = postgres.create_database(server.url, "scale")
        out["nodes"] = scale_nodes.measure(url, work, db_url, server.pid(),
                                           node_counts=sizes["scale_nodes"],
                                           jobs_per_step=sizes["scale_node_jobs"])
        out["ledger"] = scale_ledger.measure(db_url, work,
                                             finished=sizes["scale_ledger_jobs"])
    out["targets"] = targets(out)
    print("scale: done", file=sys.stderr)
    return out


def targets(scale: dict[str, Any]) -> dict[str, bool]:
    """Return which of issue 16's scale targets the run met."""
    spreads = scale["queued"]["rss_spread_mib"].values()
    commands = scale["ledger"]["commands"]
    return {
        "rss_flat_within_20MiB": all(s is not None and s <= FLAT_MIB for s in spreads),
        "q_under_1s": commands["dispatch q"]["median_s"] < COMMAND_S,
        "history_under_1s": commands["dispatch history"]["median_s"] < COMMAND_S,
    }


def tables(scale: dict[str, Any]) -> str:
    """Return the scale figures as text and Markdown tables."""
    q = scale["queued"]
    lines = [f"{q['jobs']} jobs queued before any node: submitted at "
             f"{q['submit']['jobs_per_s']} jobs/s ({q['submit']['elapsed_s']} s, "
             f"{q['submit']['queued']} in the queue); broker RSS (MiB) "
             f"{q['broker_mib']}; drained by {q['nodes']} nodes of {q['slots_per_node']} "
             f"slot at {q['drain']['jobs_per_s']} jobs/s ({q['drain']['elapsed_s']} s)", "",
             "| jobs | client MiB, submitting | client MiB, draining | " +
             " | ".join(f"node {i} MiB" for i in range(q["nodes"])) + " |",
             "|---:|---:|---:|" + "---:|" * q["nodes"]]
    for sub, dra in zip(q["submit"]["rss"], q["drain"]["rss"], strict=True):
        lines.append(f"| {sub['jobs']} | {sub['client_mib']} | {dra['client_mib']} | "
                     + " | ".join(str(m) for m in dra["nodes_mib"]) + " |")
    lines += [f"spread (MiB, highest - lowest): {q['rss_spread_mib']}", "",
              "| nodes | in flight | jobs/s | p50 (ms) | p99 (ms) | CPU ms/job: broker | "
              "nodes | client | ledger | database |", "|---:|" + "---:|" * 9]
    for s in scale["nodes"]["steps"]:
        c = s["cpu_ms_per_job"]
        lines.append(f"| {s['nodes']} | {s['in_flight']} | {s['jobs_per_s']} | {s['p50_ms']} | "
                     f"{s['p99_ms']} | {c['broker']} | {c['worker']} | {c['client']} | "
                     f"{c['ledger']} | {c['database']} |")
    led = scale["ledger"]
    lines += ["", f"ledger filled with {led['fill']['jobs_by_state']} jobs, "
              f"{led['fill']['history_rows']} history rows, in {led['fill']['elapsed_s']} s",
              "", "| command | median (s) | min (s) | lines | query in process (s) |",
              "|---|---:|---:|---:|---:|"]
    for name, figures in led["commands"].items():
        query = led["queries"].get(name.removeprefix("dispatch "), {}).get("in_process_s", "-")
        lines.append(f"| `{name}` | {figures['median_s']} | {figures['min_s']} | "
                     f"{figures['lines']} | {query} |")
    return "\n".join(lines)
