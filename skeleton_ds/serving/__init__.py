"""The serving wing: many tasks on one shared base, behind HTTP (`skeleton-ds serve`).

- `multitask`: MultiTaskModel, one base with each task's skeleton materialised on shared tensors;
- `cross_task`: one forward pass over rows of many tasks (shared modules once, each task's slices on its rows);
- `baselines`: the contenders served the same way (plain prompt tuning, separate compact models);
- `settings`: the server's flags and defaults, importable without the HTTP stack;
- `server`: the FastAPI app, the dynamic batcher and its metrics (the top floor, beside the CLI).
"""
