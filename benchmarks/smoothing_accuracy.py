"""Accuracy cost of beta-smoothing on the embedded networks, per activation family.

For each model and beta, the test accuracy of ``defences.beta_smooth(model, beta)`` on CIFAR-10
test images (an ImageFolder tree), beside the model's own. ReLU networks (cifar_vgg,
cifar_resnet) get Softplus(beta); GELU networks (cifar_convnext, cifar_vit) get x Phi(c x) with
c = beta sqrt(2 pi) / 8, which is GELU itself at beta = 3.19 (docs/architectures.md)::

    python benchmarks/smoothing_accuracy.py --data ../shared/data/cifar10/test --limit 2000 \\
        --models cifar_vgg,cifar_convnext,cifar_vit --betas 1,2,3.19,5,10,20
"""
import argparse
import math

import torch

from manip_bench import defences, models
from manip_bench.errors import command
from manip_bench.models.train_cifar import accuracy, load_image_folder, predict


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="ImageFolder tree of CIFAR-10 test images")
    parser.add_argument("--limit", type=int, default=2000, help="images (a seeded subset)")
    parser.add_argument("--models", default="cifar_vgg,cifar_convnext,cifar_vit")
    parser.add_argument("--betas", default="1,2,3.19,5,10,20")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    betas = defences.positive_numbers(args.betas)
    images, labels = load_image_folder(args.data, args.limit, seed=0, workers=1)
    print(f"| model | own | " + " | ".join(f"β={b:g}" for b in betas) + " |")
    print("|---|---|" + "---|" * len(betas))
    for name in args.models.split(","):
        model = models.load(name)
        own = accuracy(predict(model, images), labels)
        cells = [accuracy(predict(defences.beta_smooth(model, b), images), labels)
                 for b in betas]
        print(f"| `{name}` | {own:.1%} | " + " | ".join(f"{c:.1%}" for c in cells) + " |",
              flush=True)
    print(f"\n{len(labels)} CIFAR-10 test images; GELU's own beta is {8 / math.sqrt(2 * math.pi):.2f}")


if __name__ == "__main__":
    raise SystemExit(command(main))
