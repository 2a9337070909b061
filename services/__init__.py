"""ddk: domain-aware knowledge distillation (DDK, Liu et al., NeurIPS 2024) as three services.

- ``services.teacher``: top-k log-probability server (vLLM or transformers) and its client.
- ``services.controller``: DDK domain-mixture math, run state in SQLite, HTTP API and client.
- ``services.trainer``: the student: data, sampler, loss, Ray Train loop, evaluation, fixtures.
"""

__version__ = "0.1.0"
