"""unrollc's benchmark suite: ``python -m unrollc.bench`` (see ``unrollc/bench/__main__.py``).

Modules: ``workloads`` (models, optimizers, seeded data), ``methods`` (unrollc, higher, eager), ``memory``
(peak RSS / CUDA memory and bytes saved for backward), ``runner`` (one fresh process per configuration),
``report`` (table, CSV, JSON, PNG). From Python::

    from unrollc.bench import Config, run_configs, table
    results = run_configs([Config("mlp", "sgd", 64, "unrollc", "sqrt"), Config("mlp", "sgd", 64, "higher")])
    print(table(results))
"""

from .methods import METHODS, SCHEDULES, MethodSpec, build
from .report import plot, read_json, table, write_csv, write_json
from .runner import Config, Result, measure_config, run_config, run_configs
from .workloads import OPTIMIZERS, WORKLOADS, make_task

__all__ = [
    "Config", "Result", "run_configs", "run_config", "measure_config", "table", "write_csv", "write_json", "read_json",
    "plot", "WORKLOADS", "OPTIMIZERS", "METHODS", "SCHEDULES", "MethodSpec", "build", "make_task",
]
