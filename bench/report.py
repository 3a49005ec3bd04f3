"""The bench's output: ratios, targets, a table on stdout and a JSON file per run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: What Dispatch must reach on this machine (docs/benchmarks.md): absolute figures from
#: an earlier issue, and issue 16's ratios within one run (against Celery, against the
#: bare minimal dispatcher, and with a ledger against without).
TARGETS = {"p50_ms": 2.0, "p99_ms": 4.0, "jobs_per_s": 800.0, "advantage": 1.5,
           "latency_advantage": 1.8, "of_bare": 0.75, "ledger_p50_ratio": 1.25}


def ratios_of(dispatch: dict[str, Any], celery: dict[str, Any]) -> dict[str, float]:
    """Return how many times better Dispatch does than Celery (> 1: Dispatch better).

    Latency compares Celery's time over Dispatch's; throughput Dispatch's rate over
    Celery's, with both at two jobs at once (2 slots, concurrency 2).
    """
    d_lat, c_lat = dispatch["latency"], celery["latency"]
    d_tp, c_tp = dispatch["throughput_2slot"], celery["throughput"]
    return {
        "latency_p50": round(c_lat["p50_ms"] / d_lat["p50_ms"], 2),
        "latency_p99": round(c_lat["p99_ms"] / d_lat["p99_ms"], 2),
        "throughput": round(d_tp["jobs_per_s"] / c_tp["jobs_per_s"], 2),
    }


def ledger_ratios(dispatch: dict[str, Any], ledger: dict[str, Any]) -> dict[str, float]:
    """Return the figures with a ledger over those without (latency: above 1 is slower)."""
    d_lat, l_lat = dispatch["latency"], ledger["latency"]
    return {
        "latency_p50": round(l_lat["p50_ms"] / d_lat["p50_ms"], 2),
        "latency_p99": round(l_lat["p99_ms"] / d_lat["p99_ms"], 2),
        "throughput": round(ledger["throughput_2slot"]["jobs_per_s"]
                            / dispatch["throughput_2slot"]["jobs_per_s"], 2),
    }


def round_ratios(dispatch: dict[str, Any], celery: dict[str, Any] | None,
                 ledger: dict[str, Any] | None,
                 floor: dict[str, Any] | None) -> dict[str, Any]:
    """Return one round's ratios: against Celery, with a ledger, and of the bare floor."""
    ratios: dict[str, Any] = {}
    if celery is not None:
        ratios["advantage"] = ratios_of(dispatch, celery)
    if ledger is not None:
        ratios["ledger_ratio"] = ledger_ratios(dispatch, ledger)
    if floor is not None and "bare" in floor:
        ratios["of_bare"] = round(dispatch["throughput_2slot"]["jobs_per_s"]
                                  / floor["bare"]["throughput"]["jobs_per_s"], 2)
    return ratios


def median_figures(runs: list[Any]) -> Any:
    """Return the median of each number across ``runs`` (dicts alike in shape).

    Anything else (names, counts of the same size, None) is taken from the first run.
    """
    first = runs[0]
    if isinstance(first, dict):
        return {key: median_figures([run[key] for run in runs]) for key in first}
    if isinstance(first, float) and all(isinstance(run, float) for run in runs):
        return round(statistics.median(runs), 3)
    return first


def rounds_table(per_round: list[dict[str, Any]]) -> str:
    """Return each round's ratios, one row a round."""
    rows = ["| round | p50 adv. | p99 adv. | throughput adv. | ledger/none p50 | of bare |",
            "|---:|---:|---:|---:|---:|---:|"]
    for number, ratios in enumerate(per_round, 1):
        adv = ratios.get("advantage") or {}
        led = ratios.get("ledger_ratio") or {}
        rows.append(f"| {number} | {adv.get('latency_p50', '-')} | {adv.get('latency_p99', '-')}"
                    f" | {adv.get('throughput', '-')} | {led.get('latency_p50', '-')}"
                    f" | {ratios.get('of_bare', '-')} |")
    return "\n".join(rows)


def targets(dispatch: dict[str, Any], advantage: dict[str, float] | None,
            ledger_ratio: dict[str, float] | None = None,
            of_bare: float | None = None) -> dict[str, bool]:
    """Return which targets this run met; the Celery, ledger and floor ones when they ran."""
    met = {
        "p50_ms<=2.0": dispatch["latency"]["p50_ms"] <= TARGETS["p50_ms"],
        "p99_ms<=4": dispatch["latency"]["p99_ms"] <= TARGETS["p99_ms"],
        "jobs_per_s>=800": dispatch["throughput_2slot"]["jobs_per_s"] >= TARGETS["jobs_per_s"],
    }
    if advantage is not None:
        met["latency>=1.5x_celery"] = advantage["latency_p50"] >= TARGETS["advantage"]
        met["throughput>=1.5x_celery"] = advantage["throughput"] >= TARGETS["advantage"]
        met["p50>=1.8x_celery"] = advantage["latency_p50"] >= TARGETS["latency_advantage"]
        met["p99>=1.8x_celery"] = advantage["latency_p99"] >= TARGETS["latency_advantage"]
    if of_bare is not None:
        met["throughput>=0.75x_bare"] = of_bare >= TARGETS["of_bare"]
    if ledger_ratio is not None:
        met["ledger_p50<=1.25x_no_ledger"] = \
            ledger_ratio["latency_p50"] <= TARGETS["ledger_p50_ratio"]
    return met


def _row(name: str, d: object, c: object, r: object) -> str:
    return f"| {name:<34} | {d!s:>9} | {c!s:>9} | {r!s:>13} |"


def table(run: dict[str, Any]) -> str:
    """Return the figures as a Markdown table, ready for docs/benchmarks.md."""
    d = run["dispatch"]
    c = run.get("celery")
    a = run.get("advantage") or {}

    def cel(*keys: str) -> object:
        value: Any = c
        for key in keys:
            value = value[key] if value is not None else None
        return "-" if value is None else value

    def adv(key: str) -> str:
        return f"{a[key]:.2f}x" if key in a else "-"

    lines = [
        _row("measure", "Dispatch", "Celery", "Dispatch adv."),
        "|" + "-" * 36 + "|" + "-" * 10 + ":|" + "-" * 10 + ":|" + "-" * 14 + ":|",
        _row("latency p50 (ms), 1 in flight", d["latency"]["p50_ms"], cel("latency", "p50_ms"),
             adv("latency_p50")),
        _row("latency p99 (ms), 1 in flight", d["latency"]["p99_ms"], cel("latency", "p99_ms"),
             adv("latency_p99")),
        _row("latency mean (ms)", d["latency"]["mean_ms"], cel("latency", "mean_ms"), ""),
        _row("throughput (jobs/s), 2 at once", d["throughput_2slot"]["jobs_per_s"],
             cel("throughput", "jobs_per_s"), adv("throughput")),
        _row("throughput (jobs/s), 1 slot", d["throughput_1slot"]["jobs_per_s"], "-", ""),
    ]
    for side, label in (("broker", "broker"), ("worker", "worker and its jobs"),
                        ("client", "submitting process")):
        lines.append(_row(f"CPU ms/job, {label}",
                          _cpu(d["throughput_2slot"], side), _cpu(c and c["throughput"], side),
                          ""))
    root = d.get("latency_root_switching_user")
    if root:
        lines.append(_row("p50 (ms), root worker, jobs as nobody", root["p50_ms"], "-", ""))
        lines.append(_row("p99 (ms), root worker, jobs as nobody", root["p99_ms"], "-", ""))
    return "\n".join(lines)


def ledger_table(run: dict[str, Any]) -> str | None:
    """Return Dispatch without and with a ledger side by side, or None without that phase."""
    ledger, ratio = run.get("ledger"), run.get("ledger_ratio")
    if not ledger or not ratio:
        return None
    d = run["dispatch"]
    lines = [_row("measure", "no ledger", "ledger", "ledger/none"),
             "|" + "-" * 36 + "|" + "-" * 10 + ":|" + "-" * 10 + ":|" + "-" * 14 + ":|"]
    for key, label in (("p50_ms", "latency p50 (ms), 1 in flight"),
                       ("p99_ms", "latency p99 (ms), 1 in flight")):
        lines.append(_row(label, d["latency"][key], ledger["latency"][key],
                          f"{ratio['latency_' + key[:3]]:.2f}x"))
    lines.append(_row("throughput (jobs/s), 2 slots", d["throughput_2slot"]["jobs_per_s"],
                      ledger["throughput_2slot"]["jobs_per_s"], f"{ratio['throughput']:.2f}x"))
    for side in ("broker", "worker", "client", "ledger", "database"):
        lines.append(_row(f"CPU ms/job, {side}", _cpu(d["throughput_2slot"], side),
                          _cpu(ledger["throughput_2slot"], side), ""))
    return "\n".join(lines)


def floor_table(run: dict[str, Any]) -> str | None:
    """Return Dispatch beside the minimal dispatchers of ``bench.minimal``, or None.

    The last column is how many times better Dispatch does than the ``protocol`` floor,
    as in the main table (above 1: Dispatch better): the floor's latency or CPU over
    Dispatch's, Dispatch's rate over the floor's.
    """
    floor = run.get("minimal")
    if not floor:
        return None
    d = run["dispatch"]
    bare, proto = floor["bare"], floor["protocol"]

    def row(name: str, dv: object, bv: object, pv: object, adv: float) -> str:
        return f"| {name:<34} | {dv!s:>9} | {bv!s:>9} | {pv!s:>9} | {adv:>12.2f}x |"

    lines = [
        f"| {'measure':<34} | {'Dispatch':>9} | {'bare':>9} | {'protocol':>9} | "
        f"{'Dispatch adv.':>13} |",
        "|" + "-" * 36 + "|" + "-" * 10 + ":|" + "-" * 10 + ":|" + "-" * 10 + ":|"
        + "-" * 14 + ":|",
    ]
    for key, label in (("p50_ms", "latency p50 (ms), 1 in flight"),
                       ("p99_ms", "latency p99 (ms), 1 in flight")):
        dv, pv = d["latency"][key], proto["latency"][key]
        lines.append(row(label, dv, bare["latency"][key], pv, pv / dv))
    dv, pv = d["throughput_2slot"]["jobs_per_s"], proto["throughput"]["jobs_per_s"]
    lines.append(row("throughput (jobs/s), 2 at once", dv, bare["throughput"]["jobs_per_s"],
                     pv, dv / pv))
    for side, label in (("broker", "broker"), ("worker", "worker(s) and jobs"),
                        ("client", "submitting process")):
        dc, pc = _cpu(d["throughput_2slot"], side), _cpu(proto["throughput"], side)
        share = pc / dc if isinstance(dc, float) and isinstance(pc, float) and dc else 0.0
        lines.append(row(f"CPU ms/job, {label}", dc, _cpu(bare["throughput"], side), pc,
                         share))
    return "\n".join(lines)


def _cpu(phase: dict[str, Any] | None, side: str) -> object:
    """One side's CPU per job in a throughput phase, or "-" when it was not measured."""
    value = ((phase or {}).get("cpu_ms_per_job") or {}).get(side)
    return "-" if value is None else value


def verdicts(run: dict[str, Any]) -> str:
    """Return one line per target: met or missed."""
    return "\n".join(f"  {'met   ' if ok else 'MISSED'} {name}"
                     for name, ok in run["targets"].items())


def write(run: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write the run as JSON to ``directory/<timestamp>.json``; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{run['timestamp']}.json"
    path.write_text(json.dumps(run, indent=2) + "\n")
    return path
