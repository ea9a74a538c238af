"""``manip-bench``: a thin command line over the library (parse, call, print)."""
import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import attributors, bench, experiment, models, patterns, robustness
from .attack import PRESETS
from .errors import ManipBenchError

console = Console()
error_console = Console(stderr=True)


def _run_parser(sub):
    p = sub.add_parser("run", help="manipulate one image's explanation toward a target")
    p.add_argument("--attributor", default="zennit.epsilon",
                   help="registry name (see `manip-bench list`)")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default", help="default | random | PATH to a state_dict")
    p.add_argument("--image", help="image to manipulate (file or bundled photo name)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-image", help="image whose explanation is the target")
    target.add_argument("--target-map", help="grayscale image used directly as the target heatmap")
    p.add_argument("--preset", default="paper", help=f"paper | {' | '.join(PRESETS)}")
    p.add_argument("--iterations", type=int)
    p.add_argument("--lr", type=float, help="Adam step in [0,1] pixel units")
    p.add_argument("--linf", type=float, help="optional L-inf budget in pixel units")
    p.add_argument("--beta", type=float, dest="smooth_beta",
                   help="attack the beta-smoothed explanation (softplus(beta) network)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for small inputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: a new folder under ./manip-out/)")
    p.set_defaults(func=cmd_run)


def cmd_run(args):
    result, out = experiment.run(
        attributor=args.attributor, model=args.model, weights=args.weights, image=args.image,
        target_image=args.target_image, target_map=args.target_map, preset=args.preset,
        device=args.device, seed=args.seed, out=args.out, threads=args.threads, progress=True,
        smooth_beta=args.smooth_beta, iterations=args.iterations, lr=args.lr, linf=args.linf)
    table = Table(title=f"{result.attributor} on {args.model}: {result.iterations} iterations, "
                        f"{result.seconds:.1f} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in experiment.CONTRACT_METRICS:
        value = result.metrics[key][0]
        table.add_row(key, str(value) if isinstance(value, bool) else f"{value:.4g}")
    console.print(table)
    console.print(f"results written to [bold]{out}[/bold]")


def _list_parser(sub):
    p = sub.add_parser("list", help="attributors, models and presets")
    p.set_defaults(func=cmd_list)


def cmd_list(args):
    table = Table(title="attributors")
    table.add_column("name", no_wrap=True)
    for column in ("library", "rule", "softplus swap", "attackable"):
        table.add_column(column)
    for row in attributors.describe():
        table.add_row(row["name"], row["library"], row["rule"],
                      "yes" if row["needs_softplus"] else "no", "yes" if row["attackable"] else "no")
    console.print(table)
    table = Table(title="models")
    for column in ("name", "input", "classes", "source"):
        table.add_column(column)
    for row in models.describe():
        table.add_row(row["name"], str(row["input_size"]), str(row["classes"]), row["source"])
    console.print(table)
    table = Table(title="presets (lr in [0,1] pixel units)")
    for column in ("name", "iterations", "lr", "weight_expl", "weight_output"):
        table.add_column(column)
    for name, values in PRESETS.items():
        table.add_row(name, *(f"{values[key]:g}" for key in
                              ("iterations", "lr", "weight_expl", "weight_output")))
    console.print(table)


def _grid_arguments(p, attributors_default, what):
    p.add_argument("--attributors", default=attributors_default,
                   help=f"{what}: registry names and groups, comma-separated "
                        f"({', '.join(attributors.GROUPS)}; see `manip-bench list`)")
    p.add_argument("--models", default=models.DEFAULT_MODEL,
                   help="zoo names, comma-separated; NAME:random or NAME:PATH for other weights")
    p.add_argument("--pairs", default=bench.BUNDLED,
                   help="bundled | a folder or ImageFolder tree of images | a CSV with columns "
                        "original,target (the original is attacked toward the target's map)")
    p.add_argument("--n", type=int, default=20, help="number of pairs (default 20)")
    p.add_argument("--batch-size", type=int, default=10, help="pairs attacked together")
    p.add_argument("--preset", default="paper", help=f"paper | {' | '.join(PRESETS)}")
    p.add_argument("--iterations", type=int, help="override the preset's iterations")
    p.add_argument("--lr", type=float, help="override the preset's Adam step ([0,1] pixel units)")
    p.add_argument("--linf", type=float, help="L-inf budget in pixel units (e.g. 0.0314 = 8/255)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for small inputs)")
    p.add_argument("--seed", type=int, default=0, help="pair sampling and noise seed")
    p.add_argument("--shard", help="i/N: run every N-th pair from i (default: torchrun's "
                                   "RANK/WORLD_SIZE); all shards need the same --out")
    p.add_argument("--out", help="results folder; the same folder again resumes "
                                 "(default: a new folder under ./bench-out/)")


def _bench_parser(sub):
    p = sub.add_parser("bench", help="attack a grid of attributors x models x image pairs")
    _grid_arguments(p, "all", "methods")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args):
    grid = bench.make_grid(args.attributors, args.models, args.pairs, args.n, args.seed,
                           args.preset, iterations=args.iterations, lr=args.lr, linf=args.linf)
    _run_grid(grid, args)


def _smooth_parser(sub):
    p = sub.add_parser("smooth", help="the beta-smoothing defence: attack beta-smoothed "
                                      "explanations over beta, with SmoothGrad for comparison")
    _grid_arguments(p, "captum.saliency", "gradient-type methods to smooth (LRP is not smoothed)")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in bench.DEFAULT_BETAS),
                   help="softplus betas, comma-separated (ReLU, beta -> inf, is always added)")
    p.add_argument("--stdevs", default=",".join(f"{s:g}" for s in bench.DEFAULT_STDEVS),
                   help="SmoothGrad noise levels as fractions of the input range ('' for none)")
    p.add_argument("--samples", type=int, default=10, help="SmoothGrad samples (default 10)")
    p.set_defaults(func=cmd_smooth)


def cmd_smooth(args):
    grid = bench.make_sweep(args.attributors, args.betas, args.stdevs, args.models, args.pairs,
                            args.n, args.seed, args.preset, samples=args.samples,
                            iterations=args.iterations, lr=args.lr, linf=args.linf)
    _run_grid(grid, args)


def _run_grid(grid, args):
    shard = bench.parse_shard(args.shard) if args.shard else bench.shard_from_env()
    out = args.out or bench.default_out_dir(shard=shard)
    console.print(f"{grid.size} results ({len(grid.methods)} methods x {len(grid.models)} models "
                  f"x {len(grid.pairs)} pairs) in {out}; the same command with --out {out} "
                  f"resumes", highlight=False)
    try:
        bench.run_grid(grid, out, batch_size=args.batch_size, device=args.device, shard=shard,
                       threads=args.threads, progress=True, console=console)
    except KeyboardInterrupt:
        error_console.print(f"finished results are kept in {out}; rerun with --out {out} to resume")
        raise
    if shard is None:
        bench.report(out, console=console)
    else:
        console.print(f"shard {shard[0]}/{shard[1]} done; when every shard is done: "
                      f"manip-bench report {out}", highlight=False)


def _report_parser(sub):
    p = sub.add_parser("report", help="summary table, summary.csv and figures of a results folder")
    p.add_argument("folder", help="a folder written by `manip-bench bench` or `smooth`")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables and CSV only")
    p.set_defaults(func=cmd_report)


def cmd_report(args):
    bench.report(args.folder, console=console, figures=args.figures)


def _check_parser(sub):
    p = sub.add_parser("check", help="how manipulable are a model's explanations? (worst case "
                                     "within an L-inf budget, optionally with beta-smoothing)")
    p.add_argument("images", help="folder of images (searched recursively, e.g. ImageFolder)")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default", help="default | random | PATH to a checkpoint")
    p.add_argument("--method", default="captum.saliency",
                   help="registry name (see `manip-bench list`)")
    p.add_argument("--n", type=int, default=8,
                   help="number of images drawn (default 8; all if fewer)")
    p.add_argument("--iterations", type=int, default=robustness.DEFAULT_ITERATIONS)
    p.add_argument("--linf", type=float, default=robustness.DEFAULT_LINF,
                   help="L-inf budget in [0,1] pixel units (default 8/255)")
    p.add_argument("--lr", type=float, help="Adam step in pixel units (default linf/16)")
    p.add_argument("--beta", type=float, dest="smooth_beta",
                   help="also assess the beta-smoothed explanation (softplus(beta) network)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 for small inputs)")
    p.add_argument("--seed", type=int, default=0, help="image sampling and noise seed")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=cmd_check)


def cmd_check(args):
    device = experiment.pick_device(args.device)
    experiment.pick_threads(device, models.input_size(args.model), args.threads)
    report = robustness.check_folder(
        args.images, args.model, args.weights, args.method, args.n, args.seed, device,
        iterations=args.iterations, linf=args.linf, lr=args.lr, smooth_beta=args.smooth_beta,
        progress=True)
    console.print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))


def _patterns_parser(sub):
    p = sub.add_parser("patterns", help="estimate PatternAttribution patterns from an image folder")
    p.add_argument("data", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="where to save the patterns (.pt)")
    p.add_argument("--model", default=models.DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default", help="default | random | PATH to a state_dict")
    p.add_argument("--limit", type=int, help="use a seeded random subset of this many images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--regime", choices=patterns.REGIMES, default="relu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.set_defaults(func=cmd_patterns)


def cmd_patterns(args):
    device = experiment.pick_device(args.device)
    experiment.pick_threads(device, 10_000, args.threads)
    path, count, seconds = patterns.estimate_folder(
        args.data, args.out, args.model, args.weights, args.limit, args.batch_size, args.regime,
        args.seed, device)
    console.print(f"{count} images, {seconds:.1f} s; saved {path}; use it with "
                  f"attributors.create('pattern.attribution', model, patterns={str(path)!r})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="manip-bench",
        description="Manipulate image explanations (Dombrowski et al. 2019) and measure it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_run_parser, _list_parser, _bench_parser, _report_parser, _smooth_parser,
                _check_parser, _patterns_parser):
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ManipBenchError as error:
        error_console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False,
                            soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        error_console.print("interrupted; nothing half-written was left behind")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
