"""Helpers shared by the test tiers (imported as `from support.X import ...`).

* `support.fakes` — projects of fake Ray nodes (no Ray), cluster specs and YAML for them, inventory
  and convergence checks, `cli_env` / `run_cli` for one-off `ray-cai` runs, `SMALL_CLUSTER_YAML` (the
  small real-Ray cluster), `clone_with_small_cluster`.
* `support.cli_fork` — `run(args, cwd=, env=, timeout=)`: `ray-cai ARGS` as a fresh process forked from
  a zygote that has imported the CLI's libraries (~0.45 s less CPU per command than an `exec`);
  `fakes.run_cli` and `LocalCluster.cli` use it. A command the test signals, kills or writes to stays a
  `subprocess.Popen` of `RAY_CAI`; `RAY_CAI_TEST_FORK=0` executes every command.
* `support.cli` — `LocalCluster`: one cluster driven through `ray-cai ... --local` (the one CLI
  helper; `tests/ray/conftest.py` keeps one up as the fixture `ray_cluster`), `ray_processes`,
  `run_quick_start`.
* `apps/` — the scripts workspace applications and jobs run in tests (fake node, stream app, jobs).
* `bad_configs/` — the corpus of invalid cluster configs and the error each must give.
"""
