"""The numbers of docs/transformer_lrp.md on the tests' tiny ViT (random weights).

Conservation (total relevance / target logit) with and without bias-like constants,
relative error to lxt 2.1's map, how far lxt's derivative in x is from AttnLRP's (all
float64, image 16), and the target PCC before and after the default attack on the
float32 ViT at 32x32 of ``test_attack_moves_the_map``::

    OMP_NUM_THREADS=1 python benchmarks/transformer_lrp_facts.py
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "attributors")]

import test_transformer_lrp as t  # noqa: E402

from manip_bench import ManipulationAttack, attributors, metrics  # noqa: E402


def attack_rows():
    """Target PCC before -> after, per image, at two budgets (the attack test's setting)."""
    print("\n| method | budget | iterations | target PCC before -> after |\n|---|---|---|---|")
    x = t.images(2, 32, torch.float32)
    x_target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for name in t.NAMES:
        for budget, iterations in (("8/255", 40), ("8/255", 150), ("32/255", 60)):
            model = t.tiny_vit(image_size=32, dtype=torch.float32)
            attack = ManipulationAttack(model, name, iterations=iterations, budget=budget)
            result = attack(x, attack.target_maps(x_target))
            before = metrics.map_similarity(result.original_map, result.target_map)["pcc"]
            after = result.metrics["expl_target_pcc"]
            pairs = ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(before, after))
            print(f"| {name} | {budget} | {iterations} | {pairs} |")


def main():
    torch.set_num_threads(1)
    x, target = t.images(), t.TARGET
    print("| model | method | ε | total / logit (2 images) |\n|---|---|---|---|")
    models = (("biases on", t.tiny_vit()), ("biases off", t.without_biases(t.tiny_vit())))
    for label, model in models:
        for name in t.NAMES:
            for epsilon in (0.0, 1e-6, 0.25):
                output, relevance = attributors.create(name, model, epsilon=epsilon)(x, target)
                logit = output.gather(1, target[:, None])[:, 0]
                ratio = attributors.total_relevance(relevance) / logit
                print(f"| {label} | {name} | {epsilon:g} | "
                      f"{', '.join(f'{r:.4f}' for r in ratio.tolist())} |")
    patches, rules = t.load_lxt()
    model = t.tiny_vit()
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    print("\n| method | map: rel. error to lxt | d(loss)/dx: rel. difference to lxt's |"
          "\n|---|---|---|")
    for name in t.NAMES:
        patched = t.lxt_model(model, patches, rules, cp=name == "lrp.cp_lrp")
        explain = attributors.create(name, model, epsilon=0.0)
        maps, derivatives = [], []
        for relevance_of in (lambda v: t.lxt_relevance(patched, v, target, create_graph=True),
                             lambda v: explain(v, target)[1]):
            v = x.clone().requires_grad_()
            relevance = relevance_of(v)
            (gradient,) = torch.autograd.grad((relevance * weights).sum(), v)
            maps.append(relevance.detach())
            derivatives.append(gradient)
        print(f"| {name} | {t.relative_error(maps[1], maps[0]):.2e} | "
              f"{t.relative_error(derivatives[0], derivatives[1]):.3f} |")
    attack_rows()


if __name__ == "__main__":
    main()
