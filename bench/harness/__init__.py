"""Shared helpers of the benchmark scripts in ``bench/``, one module per purpose.

* ``cli``: the options every script has (``make_parser``), device and backend, CPU threads and the
  allocator re-exec, seeds, progress bars;
* ``timing``: ``bench_fn`` and the interleaved ``bench_many`` (what is timed, and how);
* ``workload``: the paper's AdaMoE settings, expert-MLP FLOPs and the load dial
  (``calibrate_null_bias``);
* ``provenance``: device naming and the environment recorded with every result;
* ``results``: output folders, the JSON every script writes (``meta`` + ``rows``, read by
  ``make_readme_table.py``) and its markdown tables;
* ``plotting``: matplotlib without a display, and saving a figure.

Every script builds its parser with ``cli.make_parser``, times with ``timing.bench_fn`` /
``timing.bench_many``, controls the load with ``workload.calibrate_null_bias`` and ends with
``results.save_results``. Importing this package puts the repository on ``sys.path``, so the
scripts run from a checkout without ``pip install -e .``.
"""

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO_DIR) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_DIR))
