"""``manip-bench``: a thin command line over the library (parse, call, print).

The parser is built from :mod:`manip_bench.defaults` alone, so ``manip-bench --help``, every
sub-command's ``--help`` and argument errors answer without loading torch; each command
imports what it uses when it runs.
"""
import argparse
import functools
import json
import sys

from . import __version__
from .defaults import (ATTRIBUTOR_GROUPS, BETAS, BUNDLED, CHECK_ITERATIONS, CIFAR10,
                       CIFAR10_FOLDER, CURVATURE_TOL, DATA_ROOT_ENV, DEFAULT_BUDGET,
                       DEFAULT_MODEL, DEFAULT_PRESET, DEFENCE_BETAS, EXPLANATION_LOSSES,
                       FINETUNED_MODEL, PATTERN_REGIMES, PRESET_NAMES, SMOOTHGRAD_STDEVS)
from .errors import ManipBenchError, command


@functools.lru_cache(maxsize=None)
def _console(stderr=False):
    """The rich console of standard output (or error), made on first use."""
    from rich.console import Console
    return Console(stderr=stderr)


def _run_parser(sub):
    p = sub.add_parser("run", help="manipulate one image's explanation toward a target")
    p.add_argument("--attributor", default="zennit.epsilon",
                   help="registry name (see `manip-bench list`)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default",
                   help="default (the shipped weights) | random | PATH to a state_dict")
    p.add_argument("--image", help="image to manipulate (file or bundled photo name; default: "
                                   "the bundled photo chelsea)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-image", help="image whose explanation is the target "
                                               "(default: the bundled photo coffee)")
    target.add_argument("--target-map", help="grayscale image used directly as the target heatmap")
    _attack_arguments(p)
    p.add_argument("--beta", type=float,
                   help="defence: attack the explanation of the beta-smoothed model (every ReLU "
                        "computed as softplus(beta))")
    _where_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (noise, sampling)")
    p.add_argument("--out", help="output folder (default: a new folder under ./manip-out/)")
    p.set_defaults(func=cmd_run)


def _where_arguments(p, devices="auto | cpu | cuda", threads="1 for small inputs"):
    """``--device`` and ``--threads``, shared by every command that computes."""
    p.add_argument("--device", default="auto", help=devices)
    p.add_argument("--threads", type=int, help=f"CPU threads (default: {threads})")


def _attack_arguments(p):
    """Options of the attack itself, shared by run, bench and smooth."""
    p.add_argument("--preset", default=DEFAULT_PRESET, help=_PRESET_HELP)
    p.add_argument("--budget", help=f"threat model: 8/255 (L-inf), linf:8/255, l2:0.5 or none "
                                    f"(default: {DEFAULT_BUDGET} for auto, none for paper presets)")
    p.add_argument("--linf", help="shorthand for --budget linf:VALUE")
    p.add_argument("--loss", help=_LOSS_HELP)
    p.add_argument("--iterations", type=int, help="attack steps (default: the preset's)")
    p.add_argument("--lr", type=float, help="fixed Adam step in [0,1] pixel units (paper presets)")


_PRESET_HELP = (f"auto (default: budget-tied self-tuning steps) | paper (the method's preset "
                f"from the paper, no budget unless given) | "
                f"{' | '.join(k for k in PRESET_NAMES if k != 'auto')}")
_LOSS_HELP = (f"what the attack does to the explanation: {' | '.join(EXPLANATION_LOSSES)} "
              f"(default: target_map; plugins may add more)")


def _defence(beta):
    """The defence spec of a ``--beta`` option (None: no defence)."""
    return None if beta is None else f"beta={beta!r}"


def _attack_overrides(args):
    return dict(iterations=args.iterations, lr=args.lr, linf=args.linf, budget=args.budget,
                loss=args.loss)


def cmd_run(args):
    from rich.markup import escape

    from . import experiment
    result, out = experiment.run(
        attributor=args.attributor, model=args.model, weights=args.weights, image=args.image,
        target_image=args.target_image, target_map=args.target_map, preset=args.preset,
        device=args.device, seed=args.seed, out=args.out, threads=args.threads, progress=True,
        defence=_defence(args.beta), **_attack_overrides(args))
    console = _console()
    console.print(run_table(result, out, args.model))
    console.print(read_result(result), highlight=False)
    console.print(experiment.read_record(out)["stability"], style="dim", highlight=False)
    console.print(f"results written to [bold]{escape(str(out))}[/bold]")


def run_table(result, out, model):
    """What one run did: image, target, class and probability, budget, time, metrics."""
    from rich.table import Table

    from . import experiment
    record = experiment.read_record(out)
    m = {key: values[0] for key, values in result.metrics.items()}
    table = Table(title=f"{result.attributor} on {model}", title_justify="left", show_header=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("")
    target = record.get("target_image") or record.get("target_map") or "none (untargeted)"
    table.add_row("image → target", f"{record['image']} → {target}")
    kept = "kept" if m["class_kept"] else "CHANGED"
    table.add_row("class", f"{record['original_class']}: p = {m['prob_before']:.3f} before, "
                           f"{m['prob_after']:.3f} after ({kept})")
    used = "" if not result.budget.bounded else f", used {m['input_budget_used']:.0%}"
    table.add_row("budget", f"{result.budget.label()}{used}; "
                            f"L∞ change {m['input_linf'] * 255:.1f}/255")
    table.add_row("attack", f"{record['preset']} preset, {result.schedule['name']} schedule, "
                            f"{result.iterations} iterations, {result.seconds:.1f} s, "
                            f"{record['threads']} thread(s) on {record['device']}")
    for key in experiment.CONTRACT_METRICS + ("expl_original_topk",):
        if key in m:
            value = m[key]
            table.add_row(key, str(value) if isinstance(value, bool) else f"{value:.4g}")
    return table


def read_result(result, index=0):
    """One sentence that reads a result for a person."""
    from .threat import format_value
    m = {key: values[index] for key, values in result.metrics.items()}
    if "expl_target_pcc" in m:
        moved = f"the explanation now matches the target map with PCC {m['expl_target_pcc']:.2f}"
    else:
        moved = (f"{m['expl_original_topk']:.0%} of the explanation's top pixels are still on top "
                 f"(centre of mass moved {m['expl_original_com_shift']:.1f} px)")
    change = f"the image changed by at most {format_value(round(m['input_linf'] * 255) / 255)}" \
        if m["input_linf"] > 0 else "the image did not change"
    return (f"{moved}; {change} (input SSIM {m['input_ssim']:.3f}); "
            f"{'class kept' if m['class_kept'] else 'the class changed'}.")


def _list_parser(sub):
    p = sub.add_parser("list", help="attributors, models and presets")
    p.set_defaults(func=cmd_list)


def cmd_list(args):
    from rich.table import Table

    from . import attributors, models
    from .attack import PRESETS, make_config
    console = _console()
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
    table = Table(title="attack presets (auto: the default; paper: each method's own preset)")
    for column in ("name", "schedule", "budget", "iterations", "lr (pixel units)",
                   "weight_expl", "weight_output"):
        table.add_column(column)
    for name in PRESETS:
        config = make_config(name)
        table.add_row(name, config.schedule, config.budget.label(), str(config.iterations),
                      "–" if config.lr is None else f"{config.lr:g}",
                      "relative" if config.weight_expl is None else f"{config.weight_expl:g}",
                      f"{config.weight_output:g}")
    console.print(table)


def _grid_arguments(p, attributors_default, what):
    p.add_argument("--attributors", default=attributors_default,
                   help=f"{what}: registry names and groups, comma-separated "
                        f"({', '.join(ATTRIBUTOR_GROUPS)}; see `manip-bench list`)")
    p.add_argument("--models", default=DEFAULT_MODEL,
                   help="zoo names, comma-separated; NAME:random or NAME:PATH for other weights")
    p.add_argument("--pairs", default=BUNDLED,
                   help=f"{BUNDLED} | {CIFAR10} (CIFAR-10's test set, see --data-root) | a "
                        f"folder or ImageFolder tree of images | a CSV with columns "
                        f"original,target (the original is attacked toward the target's map)")
    p.add_argument("--data-root",
                   help=f"for --pairs {CIFAR10}: the folder that holds torchvision's "
                        f"{CIFAR10_FOLDER}, downloaded there if absent (default: "
                        f"${DATA_ROOT_ENV}, else $XDG_CACHE_HOME/manip_bench, "
                        f"~/.cache/manip_bench)")
    p.add_argument("--n", type=int, default=20, help="number of pairs (default 20)")
    p.add_argument("--batch-size", type=int, default=10, help="pairs attacked together")
    _attack_arguments(p)
    _where_arguments(p, devices="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="pair sampling and noise seed")
    p.add_argument("--shard", help="i/N: run every N-th pair from i (default: torchrun's "
                                   "RANK/WORLD_SIZE); all shards need the same --out")
    p.add_argument("--out", help="results folder; the same folder again resumes "
                                 "(default: a new folder under ./bench-out/)")


def _bench_parser(sub):
    p = sub.add_parser("bench", help="attack a grid of attributors x models x image pairs")
    _grid_arguments(p, "all", "methods")
    p.add_argument("--budgets", help="several budgets, comma-separated (e.g. 1/255,2/255,4/255,"
                                     "8/255,16/255): every method at every budget, for "
                                     "manipulability curves")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args):
    from . import bench, data
    grid = bench.make_grid(args.attributors, args.models,
                           data.pairs_source(args.pairs, args.data_root), args.n, args.seed,
                           args.preset, budgets=args.budgets, **_attack_overrides(args))
    _run_grid(grid, args)


def _smooth_parser(sub):
    p = sub.add_parser("smooth", help="the beta-smoothing defence: attack beta-smoothed "
                                      "explanations over beta, with SmoothGrad for comparison")
    _grid_arguments(p, "captum.saliency", "methods to smooth (any attackable one)")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS),
                   help="softplus betas, comma-separated (ReLU, beta -> inf, is always added)")
    p.add_argument("--stdevs", default=",".join(f"{s:g}" for s in SMOOTHGRAD_STDEVS),
                   help="SmoothGrad noise levels as fractions of the input range ('' for none)")
    p.add_argument("--samples", type=int, default=10, help="SmoothGrad samples (default 10)")
    p.set_defaults(func=cmd_smooth)


def cmd_smooth(args):
    from . import bench, data
    grid = bench.make_sweep(args.attributors, args.betas, args.stdevs, args.models,
                            data.pairs_source(args.pairs, args.data_root), args.n, args.seed,
                            args.preset, samples=args.samples,
                            **_attack_overrides(args))
    _run_grid(grid, args)


def _defend_parser(sub):
    p = sub.add_parser("defend", help="the defence table: every method without defence, "
                                      "beta-smoothed, fine-tuned, and matched SmoothGrad; "
                                      "robustness beside accuracy and faithfulness")
    _grid_arguments(p, "all", "methods to defend")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in DEFENCE_BETAS),
                   help="beta-smoothing betas, comma-separated; SmoothGrad runs at the sigma "
                        "matched to each (log(2) sqrt(2 pi) / beta)")
    p.add_argument("--finetuned", default=FINETUNED_MODEL,
                   help="zoo model fine-tuned against manipulation, same architecture as "
                        "--models ('' for none)")
    p.add_argument("--samples", type=int, default=10, help="SmoothGrad samples (default 10)")
    p.add_argument("--accuracy-data", help="labelled ImageFolder tree for clean accuracy "
                                           "(default: --pairs when it is one)")
    p.set_defaults(func=cmd_defend)


def cmd_defend(args):
    from . import bench, data
    pairs = data.pairs_source(args.pairs, args.data_root)
    grid = bench.make_defence_grid(args.attributors, args.betas, args.finetuned, args.models,
                                   pairs, args.n, args.seed, args.preset, samples=args.samples,
                                   **_attack_overrides(args))
    for label, reason in grid.skipped.items():
        _console().print(f"left out: {label} ({reason})", highlight=False)
    args.accuracy_data = args.accuracy_data or pairs
    _run_grid(grid, args)


def _run_grid(grid, args):
    from . import bench
    console = _console()
    shard = bench.parse_shard(args.shard) if args.shard else bench.shard_from_env()
    out = args.out or bench.default_out_dir(shard=shard)
    resuming = bench.stored_config(out, grid) is not None  # a different grid: refused now
    console.print(f"{grid.size} results ({len(grid.methods)} methods x {len(grid.models)} models "
                  f"x {len(grid.pairs)} pairs) in {out}"
                  + ("; resuming what is there" if resuming else "")
                  + f"; the same command with --out {out} resumes", highlight=False)
    try:
        bench.run_grid(grid, out, batch_size=args.batch_size, device=args.device, shard=shard,
                       threads=args.threads, progress=True, console=console)
    except KeyboardInterrupt:
        _console(stderr=True).print(f"finished results are kept in {out}; rerun with --out "
                                    f"{out} to resume")
        raise
    if shard is None:
        bench.report(out, console=console, accuracy_data=getattr(args, "accuracy_data", None))
    else:
        console.print(f"shard {shard[0]}/{shard[1]} done; when every shard is done: "
                      f"manip-bench report {out}", highlight=False)


def _report_parser(sub):
    p = sub.add_parser("report", help="summary table, summary.csv and figures of a results folder")
    p.add_argument("folder", help="a folder written by `manip-bench bench` or `smooth`")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables and CSV only")
    p.add_argument("--accuracy-data", help="a `defend` folder: labelled ImageFolder tree for "
                                           "clean accuracy (default: the one used before)")
    p.set_defaults(func=cmd_report)


def cmd_report(args):
    from . import bench
    bench.report(args.folder, console=_console(), figures=args.figures,
                 accuracy_data=args.accuracy_data)


def _check_parser(sub):
    p = sub.add_parser("check", help="how manipulable are a model's explanations? (worst case "
                                     "within an L-inf budget, optionally with beta-smoothing)")
    p.add_argument("images", help="folder of images (searched recursively, e.g. ImageFolder)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default",
                   help="default (the shipped weights) | random | PATH to a checkpoint")
    p.add_argument("--method", default="captum.saliency",
                   help="registry name (see `manip-bench list`)")
    p.add_argument("--n", type=int, default=8,
                   help="number of images drawn (default 8; all if fewer)")
    p.add_argument("--iterations", type=int, default=CHECK_ITERATIONS)
    p.add_argument("--budget", default=DEFAULT_BUDGET,
                   help="threat model: 8/255 (L-inf, [0,1] pixel units), l2:0.5 or none")
    p.add_argument("--lr", type=float, help="use the paper's fixed-rate Adam with this step "
                                            "(default: the self-tuning schedule)")
    p.add_argument("--beta", type=float,
                   help="also assess the explanation of the beta-smoothed model (softplus(beta))")
    _where_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="image sampling and noise seed")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=cmd_check)


def cmd_check(args):
    from . import models, robustness, runtime
    json_path = runtime.file_path(args.json, "--json") if args.json else None  # before the work
    device = runtime.pick_device(args.device)
    runtime.pick_threads(device, models.input_size(args.model), args.threads)
    report = robustness.check_folder(
        args.images, args.model, args.weights, args.method, args.n, args.seed, device,
        iterations=args.iterations, budget=args.budget, lr=args.lr, defence=_defence(args.beta),
        progress=True)
    _console().print(report)
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report.to_dict(), indent=2))
        except OSError as error:
            raise ManipBenchError(f"--json {json_path}: cannot write the report "
                                  f"({error.strerror or error})") from error


def _patterns_parser(sub):
    p = sub.add_parser("patterns", help="estimate PatternAttribution patterns from an image folder")
    p.add_argument("data", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="where to save the patterns (.pt)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default",
                   help="default (the shipped weights) | random | PATH to a state_dict")
    p.add_argument("--limit", type=int, help="use a seeded random subset of this many images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--regime", choices=PATTERN_REGIMES, default="relu")
    p.add_argument("--seed", type=int, default=0, help="random seed (noise, sampling)")
    _where_arguments(p, threads="all cores")
    p.set_defaults(func=cmd_patterns)


def cmd_patterns(args):
    from . import patterns, runtime
    device = runtime.pick_device(args.device)
    runtime.pick_threads(device, 10_000, args.threads)
    path, count, seconds = patterns.estimate_folder(
        args.data, args.out, args.model, args.weights, args.limit, args.batch_size, args.regime,
        args.seed, device)
    _console().print(f"{count} images, {seconds:.1f} s; saved {path}; use it with "
                     f"attributors.create('pattern.attribution', model, patterns={str(path)!r})")


def _geometry_parser(sub):
    p = sub.add_parser("geometry", help="principal curvatures of the explained logit's level "
                                        "sets at one image, over softplus beta")
    p.add_argument("--model", default=DEFAULT_MODEL, help="zoo model name")
    p.add_argument("--weights", default="default",
                   help="default (the shipped weights) | random | PATH to a state_dict")
    p.add_argument("--image", help="image (file or bundled photo name; default: the bundled "
                                   "photo chelsea)")
    p.add_argument("--target", type=int, help="class whose logit is explained (default: the "
                                              "ReLU network's top-1)")
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS),
                   help="softplus betas, comma-separated")
    p.add_argument("--k", type=int, default=5, help="principal curvatures per beta "
                                                    "(largest magnitude first)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tol", type=float, default=CURVATURE_TOL,
                   help="Lanczos (ARPACK) relative tolerance")
    _where_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="Lanczos start vector seed")
    p.add_argument("--out", help="output folder (default: a new folder under ./manip-out/)")
    p.set_defaults(func=cmd_geometry)


def cmd_geometry(args):
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from . import geometry, models, runtime
    console = _console()
    out = runtime.fresh_out_dir(args.out)  # refused before the work, not after
    betas = geometry.parse_betas(args.betas)
    device = runtime.pick_device(args.device)
    runtime.pick_threads(device, models.input_size(args.model), args.threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console) as bar:
        task = bar.add_task("curvatures", total=len(betas))
        record = geometry.image_sweep(
            args.model, args.weights, args.image, betas, args.k, args.target, args.dtype,
            args.seed, args.tol, device,
            progress=lambda beta, i: bar.update(task, advance=1, description=f"β = {beta:g}"))
    table = Table(title=f"principal curvatures: {args.model}, {record['image']}, logit of "
                        f"{record['target_class']} (class {record['target']})",
                  title_justify="left")
    for column in ("beta", "lambda_max", f"top-{args.k} (signed)", "HVPs", "s"):
        table.add_column(column, justify="right")
    for row in record["results"]:
        table.add_row(f"{row['beta']:g}", f"{row['lambda_max']:.4g}",
                      " ".join(f"{v:.3g}" for v in row["curvatures"]), str(row["hvp"]),
                      f"{row['seconds']:.2f}")
    console.print(table)
    geometry.save_image_sweep(record, out)
    console.print(f"results written to [bold]{escape(str(out))}[/bold]")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, where it has one."""

    def _get_help_string(self, action):
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.default in (None, False, argparse.SUPPRESS) or flag or \
                "default" in (action.help or ""):  # flags, and helps that name their default
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser():
    parser = _Parser(
        prog="manip-bench",
        description="Manipulate image explanations (Dombrowski et al. 2019) and measure it.")
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_run_parser, _list_parser, _bench_parser, _report_parser, _smooth_parser,
                _defend_parser, _check_parser, _patterns_parser, _geometry_parser):
        add(sub)
    return parser


def main(argv=None):
    """Parse ``argv`` and run the command: 0 on success, 2 with one line for bad input
    (:func:`manip_bench.errors.command`), 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    return command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
