"""Geometry study: Theorem 1 along attack paths, curvature vs beta, curvature vs manipulability.

1. Attacks ``--n`` image pairs (``captum.saliency`` on the Softplus(``--beta``) copy of the
   embedded model, default attack: auto schedule, L-inf 8/255, ``--iterations`` steps) and
   records every path x_0 ... x_T. For each path: its length, the change of the unit normal
   h = grad g / |grad g| of the explained logit g, lambda_max sampled every
   ``--sample-every`` steps, and the ratio |h(x_T) - h(x_0)| / (lambda_max * length) of
   Theorem 1; then the same for the path moved onto the level set through x_0 (Newton
   projection), and the reasons a ratio exceeds 1 (steps across level sets, max-pool
   switches).
   Up to ``--diagnose`` single steps whose own ratio exceeds 1 are examined: is it the
   curvature where the step is (missed by the sparse sampling), kinks (max-pool switches),
   or the step crossing level sets? The steps whose ratio exceeds 1 are also read on a
   control network (max-pool -> average pool, no kinks).
2. Spearman correlation between |lambda_max| at each original image and the target PCC the
   attack reaches there.
3. |lambda_max| of the bundled photos for every beta in ``--betas``.
(The intuition figure, a two-layer network on R^2, comes with ``manip-bench geometry``.)

    python benchmarks/geometry_study.py --pairs ../shared/data/cifar10/test --out docs/results

``--vgg16`` instead times the top-5 curvatures of a torchvision VGG-16 (random weights,
224x224, softplus beta 10, Lanczos tolerance ``--tol``) against one saliency attack step,
each in its own process (peak resident memory from ``getrusage``), and writes
``geometry_vgg16_tol<tol>.json``.
"""
import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from manip_bench import ManipulationAttack, data, defences, geometry, models
from manip_bench import geometry_figures as figures
from manip_bench.bench import sample_pairs


def log(message, start):
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


def per_pair(result, i):
    """Pair i's entries of a trajectory_bound result."""
    return {key: value[i] for key, value in result.items()
            if isinstance(value, list) and len(value) == len(result["ratio"])}


def average_pool_control(model):
    """A control network: ``model`` with every max-pool replaced by an average pool of the
    same size (a different function without kinks, used only to read the diagnostics)."""
    control = copy.deepcopy(model)
    for parent in list(control.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(parent, name, torch.nn.AvgPool2d(child.kernel_size, child.stride))
    return control


def diagnose(args, model, points, target, bound, over):
    """step_diagnostics of up to --diagnose steps whose ratio is > 1 (``over``) or <= 1."""
    ratio = np.asarray(bound["step_ratio"], dtype=float)  # (paths, steps)
    chosen = np.argwhere(ratio > 1 if over else ratio <= 1)
    rng = np.random.default_rng(args.seed)
    chosen = chosen[rng.permutation(len(chosen))[:args.diagnose]]
    steps = [(int(t), int(i)) for i, t in chosen]
    rows = geometry.step_diagnostics(model, points, target, args.beta, steps, args.substeps,
                                     seed=args.seed, tol=args.tol)
    for row in rows:
        row["step_ratio"] = float(ratio[row["path"], row["t"]])
    summary = {key: geometry.summarize([row[key] for row in rows])
               for key in ("step_ratio", "local_ratio", "hessian_share", "largest_substep",
                           "normal_share", "pool_switches")}
    summary.update({
        "steps": len(rows), "of": int(np.sum(ratio > 1 if over else ratio <= 1)),
        "local_ratio_at_most_1": int(sum(row["local_ratio"] <= 1 for row in rows)),
        "hessian_share_below_half": int(sum(row["hessian_share"] < 0.5 for row in rows)),
    })
    return {"summary": summary, "steps": rows}


def trajectory_study(args, model, start):
    pairs = sample_pairs(args.pairs, args.n, args.seed)
    size = models.input_size(args.model)
    x = data.load_batch([p[0] for p in pairs], size)
    x_target = data.load_batch([p[1] for p in pairs], size)
    attack = ManipulationAttack(defences.beta_smooth(model, args.beta), "captum.saliency",
                                iterations=args.iterations)
    trajectory = geometry.record_trajectory(
        attack, x, attack.target_maps(x_target),
        progress=lambda step: step % 25 == 0 and log(f"attack step {step}", start))
    log(f"attack done: median target PCC {np.median(trajectory.target_pcc):.3f}", start)
    report = lambda done, total: log(f"  lambda_max at sample {done}/{total}", start)  # noqa: E731
    on_attack = geometry.trajectory_bound(model, trajectory.points, trajectory.target, args.beta,
                                          args.sample_every, seed=args.seed, tol=args.tol,
                                          progress=report)
    log("attack paths measured", start)
    projected, residual = geometry.level_set_path(model, trajectory.points, trajectory.target,
                                                  args.beta, iterations=args.newton)
    on_level_set = geometry.trajectory_bound(model, projected, trajectory.target, args.beta,
                                             args.sample_every, seed=args.seed, tol=args.tol,
                                             progress=report)
    log("level-set paths measured", start)
    diagnostics = {
        "attack_over_1": diagnose(args, model, trajectory.points, trajectory.target, on_attack,
                                  True),
        "level_set_over_1": diagnose(args, model, projected, trajectory.target, on_level_set,
                                     True),
        "attack_at_most_1": diagnose(args, model, trajectory.points, trajectory.target,
                                     on_attack, False),
        "control_average_pool_attack_over_1": diagnose(
            args, average_pool_control(model), trajectory.points, trajectory.target, on_attack,
            True),
    }
    log("steps diagnosed", start)
    lam0 = np.asarray(on_attack["lambda_start"])
    rho, p = scipy.stats.spearmanr(lam0, trajectory.target_pcc)
    names = models.class_names(args.model)
    rows = []
    for i, (original, target) in enumerate(pairs):
        rows.append({
            "original": str(original), "target": str(target),
            "class": names[int(trajectory.target[i])], "target_pcc": trajectory.target_pcc[i],
            "class_kept": trajectory.class_kept[i], "projection_residual": float(residual[i]),
            "attack_path": per_pair(on_attack, i),
            "level_set_path": per_pair(on_level_set, i),
        })
    def share(numerator, denominator, path):
        return geometry.summarize(np.divide(path[numerator], path[denominator]))

    def at_most_1(values):
        return int(np.sum(np.asarray(values) <= 1))

    summary = {"n": len(pairs)}
    for label, path in (("attack", on_attack), ("level_set", on_level_set)):
        summary[label] = {
            "ratio": geometry.summarize(path["ratio"]), "ratio_at_most_1": at_most_1(path["ratio"]),
            "general_ratio": geometry.summarize(path["general_ratio"]),
            "general_ratio_at_most_1": at_most_1(path["general_ratio"]),
            "normal_change": geometry.summarize(path["normal_change"]),
            "length": geometry.summarize(path["length"]),
            "lambda_max": geometry.summarize(path["lambda_max"]),
            "normal_share_of_length": share("normal_length", "length", path),
            "output_change": geometry.summarize(path["output_change"]),
            "turning": geometry.summarize(path["turning"]),
            "normal_change_over_turning": share("normal_change", "turning", path),
            "steps_over_1": geometry.summarize(path["steps_over_1"]),
            "step_ratio": geometry.summarize(np.concatenate(path["step_ratio"])),
            "step_ratio_share_over_1": float(np.mean(np.concatenate(path["step_ratio"]) > 1)),
            "pool_switch_steps": geometry.summarize(path["pool_switch_steps"]),
        }
    summary.update({
        "projection_residual_max": float(residual.max()),
        "lambda_start": geometry.summarize(lam0),
        "target_pcc": geometry.summarize(trajectory.target_pcc),
        "class_kept": float(np.mean(trajectory.class_kept)),
        "spearman_lambda_vs_pcc": {"rho": float(rho), "p": float(p), "n": len(pairs)},
    })
    figures.trajectory_figure(
        on_attack, on_level_set, args.out / "geometry_trajectory_ratio.png",
        title=f"{len(pairs)} saliency attacks on {args.model}, softplus beta = {args.beta:g}, "
              f"{args.iterations} steps, L-inf 8/255")
    figures.curvature_pcc_figure(lam0, trajectory.target_pcc,
                                 args.out / "geometry_curvature_vs_pcc.png", rho, p, args.beta)
    return {"pairs": rows, "summary": summary, "sampled_steps": on_attack["sampled_steps"],
            "step_diagnostics": diagnostics}


def beta_study(args, model, start):
    names = list(data.BUNDLED_IMAGES)
    x = data.load_batch(names, models.input_size(args.model))
    sweep = geometry.curvature_vs_beta(
        model, x, None, args.betas, args.k, seed=args.seed,
        progress=lambda beta, i: i == len(names) - 1 and log(f"beta {beta:g} done", start))
    values = np.stack([result.values for result in sweep], 1)  # (images, betas, k)
    figures.curvature_vs_beta_figure(
        [r.beta for r in sweep], values, args.out / "geometry_curvature_vs_beta.png",
        labels=names, title=f"{args.model}: {len(names)} bundled photos, logit of the ReLU "
                            f"network's class")
    classes = models.class_names(args.model)
    return {
        "images": names, "classes": [classes[t] for t in sweep[0].target],
        "betas": [r.beta for r in sweep],
        "median_lambda_max": [float(np.median(r.lambda_max)) for r in sweep],
        "lambda_max": {f"{r.beta:g}": r.lambda_max.tolist() for r in sweep},
        "curvatures": {f"{r.beta:g}": r.values.tolist() for r in sweep},
        "hvp_median": [float(np.median(r.products)) for r in sweep],
        "seconds_median": [float(np.median(r.seconds)) for r in sweep],
    }


VGG16_JOB = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from manip_bench import ManipulationAttack, defences, geometry, models
torch.manual_seed(0)
model = models.load("vgg16", "random")
x = torch.rand(1, 3, 224, 224)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
if sys.argv[1] == "attack_step":
    attack = ManipulationAttack(defences.beta_smooth(model, 10.0), "captum.saliency", iterations=2)
    state = attack.start(x, torch.rand(1, 224, 224))
    start = time.perf_counter()
    attack.step(state)
    extra = {}
else:
    result = geometry.principal_curvatures(model, x, k=5, beta=10.0, tol=float(sys.argv[3]))
    extra = {"curvatures": result.values[0].tolist(), "hvp": int(result.products[0])}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"job": sys.argv[1], "seconds": seconds, "peak_mib": peak,
                  "after_model_mib": loaded, **extra}))
"""


def vgg16_benchmark(args):
    rows = {}
    for job in ("attack_step", "curvatures"):
        done = subprocess.run([sys.executable, "-c", VGG16_JOB, job, str(args.threads),
                               str(args.tol)],
                              capture_output=True, text=True, check=True)
        rows[job] = json.loads(done.stdout.strip().splitlines()[-1])
        print(rows[job], flush=True)
    rows["peak_ratio"] = rows["curvatures"]["peak_mib"] / rows["attack_step"]["peak_mib"]
    rows["threads"], rows["tol"] = args.threads, args.tol
    (args.out / f"geometry_vgg16_tol{args.tol:g}.json").write_text(json.dumps(rows, indent=2))
    print(f"VGG-16 224x224: top-5 in {rows['curvatures']['seconds']:.0f} s, peak "
          f"{rows['curvatures']['peak_mib']:.0f} MiB vs {rows['attack_step']['peak_mib']:.0f} MiB "
          f"for one attack step ({rows['peak_ratio']:.2f}x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--model", default="cifar_vgg")
    parser.add_argument("--pairs", default="bundled",
                        help="bundled | folder / ImageFolder tree | CSV (as `manip-bench bench`)")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--beta", type=float, default=10.0, help="softplus beta of the attack")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-4, help="Lanczos tolerance on the paths")
    parser.add_argument("--diagnose", type=int, default=20,
                        help="steps of each kind examined with step_diagnostics")
    parser.add_argument("--substeps", type=int, default=64,
                        help="pieces each diagnosed step is cut into")
    parser.add_argument("--newton", type=int, default=4,
                        help="Newton steps that move each path point onto the level set")
    parser.add_argument("--betas", default="1,2,5,10,20,50,100")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vgg16", action="store_true",
                        help="only the VGG-16 (224x224) time and memory benchmark")
    args = parser.parse_args(argv)
    args.betas = geometry.parse_betas(args.betas)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.vgg16:
        return vgg16_benchmark(args)
    start = time.perf_counter()
    model = models.load(args.model)
    record = {"config": {key: str(value) if isinstance(value, Path) else value
                         for key, value in vars(args).items()}}
    record["trajectories"] = trajectory_study(args, model, start)
    record["curvature_vs_beta"] = beta_study(args, model, start)
    record["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "geometry_study.json").write_text(json.dumps(record, indent=2))
    summary = record["trajectories"]["summary"]
    print(json.dumps(summary, indent=2))
    beta = record["curvature_vs_beta"]
    print("median |lambda_max| over the bundled photos:",
          ", ".join(f"beta {b:g}: {v:.3g}" for b, v in zip(beta["betas"],
                                                           beta["median_lambda_max"])))
    log(f"written to {args.out}", start)


if __name__ == "__main__":
    from manip_bench.errors import command  # the CLI's handling: one line, exit 2
    sys.exit(command(main))
