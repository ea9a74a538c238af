"""Benchmarks: attributors x models x image pairs, resumable, sharded; reports; the β sweep.

Python API::

    from manip_bench import bench
    grid = bench.make_grid(attributors="gradient,zennit.epsilon", models="cifar_vgg",
                           pairs="path/to/cifar10/test", n=20, iterations=300)
    bench.run_grid(grid, "bench-out/run1", batch_size=10, device="auto", progress=True)
    bench.report("bench-out/run1")            # summary.csv, box plots, example grids

    sweep = bench.make_sweep(["captum.saliency"], betas=[1, 5, 20], stdevs=[0.01, 0.05])
    bench.run_grid(sweep, "bench-out/smooth")
    bench.report("bench-out/smooth")          # + smooth.csv, smooth.png (paper Fig. 4)

A results folder holds ``config.json`` (the grid, versions, device, seed),
``results.jsonl`` or ``results-rank{i}-of-{N}.jsonl`` (one JSON line per attributor,
model and pair) and ``examples/<cell>.pt`` (images and maps of pair 0 of each cell).
Running the same grid into the same folder again resumes; a different grid is refused.
"""
from .grid import (BUNDLED, Grid, GridMethod, RunSummary, build_grid, default_out_dir,
                   load_examples, make_grid, parse_budgets, parse_model, parse_shard, resolve_attributors,
                   run_grid, sample_pairs, shard_from_env, shard_pairs, stored_config)
from .defend import defence_methods, make_defence_grid, matched_stdev
from .report import report, summarize
from .results import (ResultsWriter, read_results, read_rows, results_files, results_name,
                      row_key)
from .smooth import DEFAULT_BETAS, DEFAULT_STDEVS, make_sweep, sweep_methods

__all__ = ["BUNDLED", "DEFAULT_BETAS", "DEFAULT_STDEVS", "Grid", "GridMethod", "ResultsWriter",
           "RunSummary", "build_grid", "default_out_dir", "defence_methods", "load_examples",
           "make_defence_grid", "make_grid", "matched_stdev",
           "make_sweep", "parse_budgets", "parse_model", "parse_shard", "read_results",
           "read_rows", "report", "resolve_attributors", "results_files", "results_name",
           "row_key", "run_grid", "sample_pairs", "shard_from_env", "shard_pairs",
           "stored_config", "summarize", "sweep_methods"]
