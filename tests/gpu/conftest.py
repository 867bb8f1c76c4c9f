"""The GPU suite: the compiled paths (flex kernels, CUDA graphs) at the shapes users send. Skipped where CUDA is absent,
so the CPU suite (CI) stays green; run it on a GPU machine with

    FLEXGEN_GPU_RESULTS=analysis/results/gpu_suite_<card>.json pytest tests/gpu -n 4

With ``FLEXGEN_GPU_RESULTS`` set, the session writes one JSON record: card, torch / triton versions, every test with its
outcome, duration and what it recorded (errors against the reference, compiled graphs), and the compiled-graph total.

``-n 4`` (pytest-xdist, in the dev extra) runs the cases in four processes: the suite's time is almost all
compilation (Inductor, CPU-bound), so four processes on a 16-core host take the suite from about 10 minutes to under
5. Each case still measures the graphs it compiled in its own process (counts are per process, taken before and after
the case); the totals add each process's last count. Without xdist the suite runs in one process, unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import time

import pytest
import torch

_RESULTS: list[dict] = []


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (the GPU suite; CI runs the CPU suite)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Before the call's report is made: this process's compiled-graph count and compile time so far, so that the
    controller (which compiles nothing) can total them over the worker processes."""
    if call.when == "call" and torch.cuda.is_available():
        from flexgen_long.shapes import compiled_graphs

        graphs = compiled_graphs()
        item.user_properties.append(("process", _worker()))
        item.user_properties.append(("process_graphs", len(graphs)))
        item.user_properties.append(
            ("process_compile_s", round(sum(g.first_call_s for g in graphs if g.first_call_s == g.first_call_s), 1)))


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if "tests/gpu/" not in report.nodeid.replace(os.sep, "/") and not report.nodeid.startswith("test_gpu"):
            return
        _RESULTS.append({"case": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 2),
                         **{k: v for k, v in report.user_properties}})
        _write(finished=False)  # after every case: a run stopped by a time limit keeps what it did


def pytest_sessionfinish(session, exitstatus):
    _write(finished=True)


def _flex_backend() -> dict:
    """What compiled flex runs by default on this machine, and why (flexgen_long.flex_backend)."""
    from flexgen_long.flex_backend import flash_status

    ok, why = flash_status("cuda")
    return {"backend": "flash" if ok else "triton", "why": why}


def _write(finished: bool) -> None:
    path = os.environ.get("FLEXGEN_GPU_RESULTS")
    if not path or not torch.cuda.is_available() or not _RESULTS or _worker() != "main":
        return  # under xdist only the controller writes (it sees every worker's reports)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    last: dict[str, dict] = {}  # each process's latest counts (they only grow)
    for r in _RESULTS:
        if "process" in r:
            last[r["process"]] = r
    record = {
        "suite": "tests/gpu", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(), "commit": os.environ.get("FLEXGEN_COMMIT"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "finished": finished,  # False: the session was stopped before its end (cases after the last listed not run)
        "passed": sum(r["outcome"] == "passed" for r in _RESULTS),
        "failed": sum(r["outcome"] == "failed" for r in _RESULTS),
        "skipped": sum(r["outcome"] == "skipped" for r in _RESULTS),
        "processes": len(last),
        # summed over processes; first calls that raised (the guard test runs a compiled function eagerly on purpose)
        # have no time
        "flex_backend_default": _flex_backend(),
        "compiled_graphs_total": sum(r["process_graphs"] for r in last.values()),
        "compile_s_total": round(sum(r["process_compile_s"] for r in last.values()), 1),
        "cases": _RESULTS,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
