"""unrollc's benchmark suite: ``python -m unrollc.bench`` (see ``unrollc/bench/__main__.py``).

Modules: ``workloads`` (models, optimizers, seeded data), ``methods`` (unrollc, higher, eager), ``memory``
(peak RSS / CUDA memory and bytes saved for backward), ``runner`` (one fresh process per configuration),
``report`` (table, CSV, JSON, PNG).
"""
