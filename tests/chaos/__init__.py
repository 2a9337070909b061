"""The chaos harness (a test tool, not a benchmark): a real DDK run while a seeded schedule SIGKILLs its parts
and a supervisor restarts them; then checks of what the run left behind.

- :mod:`chaos.schedule`: the faults (kind, phase, step, restart delay), drawn from a seed. Pure.
- :mod:`chaos.cluster`: the Ray head, two teacher replicas and the controller; finding and ending every process
  the harness started.
- :mod:`chaos.supervisor`: :class:`~chaos.supervisor.Supervisor`, one ``ddk train`` run: fires the faults at
  their moments, restarts what died, follows the run's ``metrics.jsonl``.
- :mod:`chaos.checks`: the checks (steps once each, the controller's versions and the paper's update recomputed
  independently, the final student, nothing left running) and the printed report.
- :mod:`chaos.__main__`: the command line, ``PYTHONPATH=tests .venv/bin/python -m chaos --steps 60 --faults 20
  --seed 1`` (the long schedule); ``tests/e2e/test_chaos.py`` runs the short one.

docs/reliability.md describes the phases, the checks and the long schedule's results.
"""
