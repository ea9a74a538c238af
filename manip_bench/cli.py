"""``manip-bench``: a thin command line over the library (parse, call, print)."""
import argparse
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import attributors, experiment, models
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


def build_parser():
    parser = argparse.ArgumentParser(
        prog="manip-bench",
        description="Manipulate image explanations (Dombrowski et al. 2019) and measure it.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_run_parser, _list_parser):
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
