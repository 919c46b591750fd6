"""Running recipes: the recipe format, variants and results, the runner, sweeps and their executors,
the workspace on disk and the reports.
"""
