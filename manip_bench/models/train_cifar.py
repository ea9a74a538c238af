"""Train an embedded CIFAR-10 classifier (VGG, ResNet-20, ConvNeXt or ViT) and save its weights.

Usage::

    python -m manip_bench.models.train_cifar --data DIR --out cifar_vgg.pt
    python -m manip_bench.models.train_cifar --download DIR --out cifar_vgg.pt
    python -m manip_bench.models.train_cifar --arch resnet --data DIR --out cifar_resnet.pt
    python -m manip_bench.models.train_cifar --arch vit --data DIR --out cifar_vit.pt \
        --optimizer adamw --schedule cosine --lr 2e-3 --weight-decay 0.05 --time-budget 1260

(``manip_bench.models.EMBEDDED_MODELS[name].train_args`` holds the options each shipped
model was trained with.) The weights go to ``--out`` only; the shipped files inside the
package are never written unless ``--out`` names them.

``--data`` takes an ImageFolder tree ``DIR/{train,test}/<class>/*.jpg`` with the
ten CIFAR-10 class names; ``--download`` fetches the dataset with torchvision.
All images are decoded once into a uint8 tensor that stays on the device, and
augmentation (4-pixel-padded random crop, horizontal flip) runs on tensors.
With ``--arch vgg`` (the default) ``CifarVGG(batch_norm=True)`` is trained, its
batch norm folded into the convolutions, and only the folded model's float32
``state_dict`` is saved. With ``--arch resnet`` a ``CifarResNet`` is trained
(residual branches start as identity) and its plain ``state_dict``, batch norm
included, is saved. With ``--arch convnext`` (``CifarConvNeXt``) or ``--arch vit``
(``CifarViT``, torchvision's ``VisionTransformer``) the plain ``state_dict`` is saved.
``--threads`` caps PyTorch's CPU threads.

Optimiser and schedule: ``--optimizer sgd`` (Nesterov, the default) or ``adamw``;
``--schedule onecycle`` (the default) or ``cosine`` (linear warm-up over ``--warmup`` of
training, then cosine decay to zero). ``--time-budget SECONDS`` ends training when that
much time has been spent in training steps (test evaluations are not counted) and drives
the cosine schedule by elapsed time instead of steps, so a run fits a wall-clock budget
on any machine; ``--epochs`` is then an upper bound. Such a run is reproducible in its
recipe, not bit for bit: a faster machine takes more steps.

Fine-tuning against explanation manipulation (Dombrowski et al. 2022, "Towards robust
explanations for deep neural networks")::

    python -m manip_bench.models.train_cifar --data DIR --init cifar_vgg.pt \
        --curvature-penalty 1e-3 --out cifar_vgg_robust.pt

``--init PATH`` starts from a saved ``state_dict`` of the architecture the script saves
(for ``--arch vgg`` the batch-norm-free ``CifarVGG``, so nothing is folded afterwards).
``--curvature-penalty LAMBDA`` adds ``LAMBDA * P`` to the cross-entropy, where ``P`` is the
mean over images of ``||H||_F^2``, ``H`` the Hessian with respect to the input image of the
true-class logit of the network's Softplus(``--curvature-beta``) copy (a ReLU network has
zero Hessian almost everywhere). ``P`` is estimated with one Hutchinson probe per image
(``E_v ||H v||^2 = ||H||_F^2`` for a Rademacher ``v``): one Hessian-vector product by double
backpropagation, kept differentiable in the weights, on the first ``--curvature-batch``
images of each batch. Its gradient is heavy-tailed: ``--clip-grad-norm`` bounds each step. ``H`` is not divided by the gradient norm (the level sets' curvature
is ``~ H / |grad|``): the ratio rewards inflating the gradient and blows up where it is small;
report both when judging the result, since shrinking the logit's scale also shrinks ``H``.
Weight decay (``--weight-decay``) is the other half of the defence.
"""
import contextlib
import argparse
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from manip_bench.errors import ManipBenchError
from manip_bench.runtime import pick_device
from manip_bench.models.cifar_convnext import CifarConvNeXt
from manip_bench.models.cifar_resnet import CifarResNet, zero_init_residuals
from manip_bench.models.cifar_vgg import CIFAR10_CLASSES, CifarVGG, fold_batch_norm
from manip_bench.models.cifar_vit import CifarViT

#: --arch -> the class of the saved model (what --init and the saved file hold)
ARCHITECTURES = {"vgg": CifarVGG, "resnet": CifarResNet, "convnext": CifarConvNeXt, "vit": CifarViT}
#: --arch -> a fresh model to train (vgg trains with batch norm, folded away before saving)
FRESH_MODELS = {"vgg": lambda: CifarVGG(batch_norm=True),
                "resnet": lambda: zero_init_residuals(CifarResNet()),
                "convnext": CifarConvNeXt, "vit": CifarViT}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="ImageFolder root holding train/ and test/")
    source.add_argument("--download", metavar="DIR",
                        help="download CIFAR-10 with torchvision into DIR")
    parser.add_argument("--out", help="where to save the state_dict (batch-norm-folded for "
                                      "vgg); required unless --evaluate")
    parser.add_argument("--evaluate", action="store_true",
                        help="only print the test accuracy of the --init weights (reads the "
                             "test split only, saves nothing)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vgg",
                        help="CifarVGG (batch norm folded away), CifarResNet (batch norm kept), "
                             "CifarConvNeXt or CifarViT (torchvision's VisionTransformer)")
    parser.add_argument("--epochs", type=int, default=60,
                        help="epochs (with --time-budget: at most this many)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds of training steps (evaluations not "
                             "counted); the cosine schedule then runs on elapsed time")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="Nesterov SGD (momentum 0.9) or AdamW; no weight decay on "
                             "biases and norm parameters either way")
    parser.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle",
                        help="one-cycle (epochs only) or linear warm-up then cosine decay to 0")
    parser.add_argument("--warmup", type=float, default=0.05, metavar="FRACTION",
                        help="fraction of training spent warming up (cosine schedule)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=5, help="epochs between test evaluations")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None,
                        help="use a random subset of at most this many images per split (smoke tests)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding JPEGs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU training (default: PyTorch's choice)")
    parser.add_argument("--channels-last", action="store_true",
                        help="train in channels-last memory format (faster convolutions on CPU)")
    parser.add_argument("--init", metavar="PATH", default=None,
                        help="start from this state_dict (the saved format: batch-norm-free "
                             "CifarVGG for --arch vgg) instead of a random initialisation")
    parser.add_argument("--curvature-penalty", type=float, default=0.0, metavar="LAMBDA",
                        help="weight of the input-Hessian penalty (squared Frobenius norm of the "
                             "true-class logit's Hessian, Softplus network); 0 disables it")
    parser.add_argument("--curvature-beta", type=float, default=10.0, metavar="BETA",
                        help="Softplus beta of the network the curvature penalty is measured on")
    parser.add_argument("--curvature-batch", type=int, default=32, metavar="N",
                        help="images of each training batch the curvature penalty uses")
    parser.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX",
                        help="clip the gradient's total norm to MAX before each step (the "
                             "curvature penalty's gradient is heavy-tailed); default: no clipping")
    args = parser.parse_args(argv)
    if args.evaluate and args.init is None:
        parser.error("--evaluate needs --init PATH (the weights to evaluate)")
    if not args.evaluate and args.out is None:
        parser.error("--out is required: where to save the trained weights")
    if args.time_budget is not None and args.schedule != "cosine":
        parser.error("--time-budget needs --schedule cosine")
    return args


def seed_everything(seed):
    """Seed every random generator the training touches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def subset(items, limit, seed):
    """A seeded random subset of ``items`` of at most ``limit`` elements, order kept."""
    if limit is None or limit >= len(items):
        return items
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(items), generator=generator)[:limit].sort().values
    return [items[i] for i in keep.tolist()]


def show_progress(label, done, total):
    """One progress line, redrawn in place on a terminal, printed once at the end otherwise."""
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total} ({100 * done // total}%)", end=end, file=sys.stderr, flush=True)
    elif done == total:
        print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)


def decode_image(path):
    from torchvision.datasets.folder import default_loader

    array = np.asarray(default_loader(path), dtype=np.uint8)
    if array.shape != (32, 32, 3):
        raise ManipBenchError(f"{path}: expected a 32x32 RGB image, got shape {array.shape}")
    return array


def load_image_folder(root, limit, seed, workers):
    """Decode ``root/<class>/*`` into ``(uint8 N x 3 x 32 x 32, int64 N)`` tensors."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise ManipBenchError(f"{root}: no such folder; --data needs train/ and test/ inside")
    folder = ImageFolder(root)
    if sorted(folder.classes) != sorted(CIFAR10_CLASSES):
        raise ManipBenchError(f"{root}: class folders {folder.classes} are not the CIFAR-10 classes")
    to_label = [CIFAR10_CLASSES.index(name) for name in folder.classes]
    samples = subset(folder.samples, limit, seed)
    label = f"decoding {root}"
    images = np.empty((len(samples), 32, 32, 3), dtype=np.uint8)
    step = max(1, len(samples) // 100)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, array in enumerate(pool.map(decode_image, (path for path, _ in samples), chunksize=256)):
            images[i] = array
            if (i + 1) % step == 0 or i + 1 == len(samples):
                show_progress(label, i + 1, len(samples))
    labels = torch.tensor([to_label[target] for _, target in samples], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def load_torchvision(root, train, limit, seed):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10(download=True)``, as tensors."""
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10(root, train=train, download=True)
    if list(dataset.classes) != list(CIFAR10_CLASSES):
        raise ManipBenchError(f"torchvision's CIFAR-10 classes {dataset.classes} are not the expected ones")
    keep = subset(list(range(len(dataset.targets))), limit, seed)
    images = torch.from_numpy(dataset.data[keep]).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.int64)[keep]


def load_data(args, splits=("train", "test")):
    """``{"train": (images, labels), "test": (images, labels)}`` on the CPU (the ``splits``
    asked for)."""
    data = {}
    for offset, split in enumerate(("train", "test")):
        if split not in splits:
            continue
        seed = args.seed + offset
        if args.data is not None:
            data[split] = load_image_folder(os.path.join(args.data, split), args.limit, seed, args.workers)
        else:
            data[split] = load_torchvision(args.download, split == "train", args.limit, seed)
    return data


def augment(images, padding=4):
    """Random crop from a zero-padded copy plus random horizontal flip, in one gather."""
    n, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device)
    flip = torch.rand(n, 1, 1, device=device) < 0.5
    rows = torch.arange(height, device=device).view(1, height, 1) + dy
    columns = torch.arange(width, device=device).view(1, 1, width)
    columns = torch.where(flip, width - 1 - columns, columns) + dx
    batch = torch.arange(n, device=device).view(n, 1, 1)
    # advanced indices split by a slice: the result is N x H x W x C
    return padded[batch, :, rows, columns].permute(0, 3, 1, 2)


def to_float(images):
    return images.float().div_(255)


@torch.no_grad()
def predict(model, images, batch_size=1000):
    """Class predictions of ``model`` (in eval mode) for uint8 images."""
    model.eval()
    return torch.cat([model(to_float(images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images), batch_size)])


def accuracy(predictions, labels):
    return (predictions == labels).float().mean().item()


def make_optimizer(model, lr, weight_decay, kind="sgd"):
    """Nesterov SGD or AdamW; biases and norm parameters (1-d) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def cosine_factor(progress, warmup):
    """Learning-rate factor at ``progress`` in [0, 1]: linear warm-up over the first
    ``warmup`` fraction, then cosine decay from 1 to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


class Budget:
    """Training progress in [0, 1], from steps taken or from seconds spent training.

    Parameters
    ----------
    total_steps : int
        Steps of ``--epochs`` epochs.
    seconds : float or None
        ``--time-budget``: progress is the training time spent (only while ``running``),
        and training ends when it is used up.
    """

    def __init__(self, total_steps, seconds=None):
        self.total_steps, self.seconds = total_steps, seconds
        self.steps, self.spent, self._since = 0, 0.0, None

    @contextlib.contextmanager
    def running(self):
        self._since = time.perf_counter()
        try:
            yield
        finally:
            self.spent += time.perf_counter() - self._since
            self._since = None

    def elapsed(self):
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.spent + running

    def progress(self):
        by_steps = self.steps / self.total_steps
        if self.seconds is None:
            return by_steps
        return max(by_steps, self.elapsed() / self.seconds)

    def done(self):
        return self.progress() >= 1.0


@contextlib.contextmanager
def softplus_activations(model, beta):
    """Temporarily replace every ``nn.ReLU`` submodule of ``model`` by ``nn.Softplus(beta)``.

    The graph built inside keeps the softplus, so it can be differentiated after the
    ReLUs are back. Both embedded architectures use one ``nn.ReLU`` module per use.
    """
    swapped = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.ReLU)]
    if not swapped:
        raise ManipBenchError("the curvature penalty needs nn.ReLU modules to swap for softplus")
    for parent, name, _ in swapped:
        setattr(parent, name, nn.Softplus(beta))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def hessian_penalty(model, inputs, labels, beta, probes=1, generator=None, create_graph=True):
    """Hutchinson estimate of ``||H||_F^2`` per image, shape (N,).

    ``H`` is the Hessian, with respect to the input, of the ``labels`` logit of ``model``
    with its ReLUs replaced by Softplus(``beta``): the mean of ``||H v||^2`` over ``probes``
    Rademacher vectors ``v`` (drawn from ``generator``), each one Hessian-vector product.
    With ``create_graph`` the result can be backpropagated to the weights.
    """
    x = inputs.detach().requires_grad_(True)
    with softplus_activations(model, beta):
        logit = model(x).gather(1, labels.view(-1, 1)).sum()
    grad, = torch.autograd.grad(logit, x, create_graph=True)
    total = torch.zeros(len(x), device=x.device)
    for _ in range(probes):
        v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        hv, = torch.autograd.grad((grad * v).sum(), x, create_graph=create_graph,
                                  retain_graph=True)
        total = total + hv.pow(2).flatten(1).sum(1)
    return total / probes


def held_out_penalty(model, images, labels, beta, count=128, probes=8, seed=0):
    """Mean ``||H||_F^2`` (softplus network) on a fixed seeded subset of ``images``: the same
    images and probe vectors on every call, so values before and after training compare."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=generator)[:count].to(images.device)
    probe_generator = torch.Generator(device=images.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    values = torch.cat([
        hessian_penalty(model, to_float(images[index[i:i + 32]]), labels[index[i:i + 32]], beta,
                        probes, probe_generator, create_graph=False).detach()
        for i in range(0, len(index), 32)])
    model.train(was_training)
    return values.mean().item(), len(index)


def train_step(model, images, labels, criterion, optimizer, args):
    """One optimiser step on a uint8 batch (augmented here); returns (loss, penalty or None)."""
    inputs = to_float(augment(images))
    if args.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    loss = criterion(model(inputs), labels)
    penalty = None
    if args.curvature_penalty:
        # on the function the model computes in eval mode (batch norm: running stats)
        model.eval()
        penalty = hessian_penalty(model, inputs[:args.curvature_batch],
                                  labels[:args.curvature_batch], args.curvature_beta).mean()
        model.train()
        loss = loss + args.curvature_penalty * penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
    optimizer.step()
    return loss.detach(), None if penalty is None else penalty.detach()


def train(model, data, args, device):
    """Train with the chosen optimiser and schedule until ``--epochs`` or ``--time-budget``
    ends; prints the loss and, every ``--eval-every`` epochs and at the end, test accuracy.

    Returns the number of epochs run (the last one may be partial), the seconds of
    training steps and the last test accuracy printed (None if none was)."""
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.optimizer)
    budget = Budget(args.epochs * steps_per_epoch, args.time_budget)
    if args.schedule == "onecycle":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    epochs, acc = 0.0, None
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_images), device=device)
        total_loss = torch.zeros((), device=device)
        total_penalty = torch.zeros((), device=device)
        seen = 0
        with budget.running():
            for start in range(0, len(order), args.batch_size):
                if budget.done():
                    break
                if args.schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = args.lr * cosine_factor(budget.progress(), args.warmup)
                index = order[start:start + args.batch_size]
                loss, penalty = train_step(model, train_images[index], train_labels[index],
                                           criterion, optimizer, args)
                if args.schedule == "onecycle":
                    schedule.step()
                budget.steps += 1
                seen += len(index)
                total_loss += loss * len(index)
                if penalty is not None:
                    total_penalty += penalty * len(index)
            if device.type == "cuda":  # the budget counts finished work
                torch.cuda.synchronize()
        if not seen:
            break
        epochs += seen / len(order)
        last = epoch == args.epochs or budget.done()
        message = (f"epoch {epoch:3d}/{args.epochs}  loss {total_loss.item() / seen:.4f}  "
                   f"{budget.elapsed():.0f}s")
        if seen < len(order):
            message += f" ({seen} of {len(order)} images)"
        if args.curvature_penalty:
            message += f"  hessian penalty {total_penalty.item() / seen:.1f}"
        if epoch % args.eval_every == 0 or last:
            acc = accuracy(predict(model, test_images), test_labels)
            message += f"  test acc {acc:.4f}"
        else:
            acc = None
        print(message, flush=True)
        if last:
            break
    return epochs, budget.elapsed(), acc


def fold_and_check(model, test_images, test_labels):
    """Fold batch norm and check the folded model classifies the test set the same way."""
    reference = predict(model, test_images)
    folded = fold_batch_norm(model).to(test_images.device)
    predictions = predict(folded, test_images)
    disagree = (predictions != reference).sum().item()
    acc, folded_acc = accuracy(reference, test_labels), accuracy(predictions, test_labels)
    print(f"batch-norm model test acc {acc:.4f}, folded {folded_acc:.4f}, "
          f"{disagree} of {len(test_labels)} predictions differ", flush=True)
    if abs(acc - folded_acc) > 1e-3:
        raise RuntimeError("folding batch norm changed the test accuracy")
    return folded, folded_acc


def save_weights(model, path, arch="vgg"):
    """Save the float32 state_dict and check it loads into a fresh model of ``arch``."""
    state = {name: tensor.detach().cpu().contiguous()
             for name, tensor in model.state_dict().items()}
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in state.items()}  # batch norm's int64 step counter stays
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)
    ARCHITECTURES[arch]().load_state_dict(torch.load(path, weights_only=True))
    return os.path.getsize(path)


def load_init(args, device):
    """The ``--init`` weights in a model of ``--arch`` (the saved format)."""
    model = ARCHITECTURES[args.arch]()
    model.load_state_dict(torch.load(args.init, weights_only=True, map_location="cpu"))
    return model.to(device)


def evaluate(args, device):
    """Print and return the test accuracy of the ``--init`` weights."""
    images, labels = load_data(args, splits=("test",))["test"]
    model = load_init(args, device)
    acc = accuracy(predict(model, images.to(device)), labels.to(device))
    print(f"test accuracy {acc:.4f} on {len(labels)} images ({args.arch}, {args.init})",
          flush=True)
    return acc


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seed_everything(args.seed)
    device = pick_device(args.device)
    if args.evaluate:
        return evaluate(args, device)
    data = load_data(args)
    print(f"train {len(data['train'][1])} images, test {len(data['test'][1])} images, "
          f"loaded in {time.perf_counter() - started:.1f}s", flush=True)
    data = {split: (images.to(device), labels.to(device)) for split, (images, labels) in data.items()}

    if args.init is not None:  # the saved format: batch norm already folded for vgg
        model = load_init(args, device)
        acc = accuracy(predict(model, data["test"][0]), data["test"][1])
        print(f"initial test acc {acc:.4f} ({args.init})", flush=True)
    else:
        model = FRESH_MODELS[args.arch]().to(device)
    if args.curvature_penalty:
        value, count = held_out_penalty(model, *data["test"], args.curvature_beta, seed=args.seed)
        print(f"hessian penalty (softplus beta {args.curvature_beta:g}) on {count} test images "
              f"before training: {value:.1f}", flush=True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    epochs, train_seconds, acc = train(model, data, args, device)

    if args.curvature_penalty:
        value, count = held_out_penalty(model, *data["test"], args.curvature_beta, seed=args.seed)
        print(f"hessian penalty (softplus beta {args.curvature_beta:g}) on {count} test images "
              f"after training: {value:.1f}", flush=True)
    if args.arch == "vgg" and args.init is None:
        model, acc = fold_and_check(model, *data["test"])
    elif acc is None:  # no evaluation after the last step
        acc = accuracy(predict(model, data["test"][0]), data["test"][1])
    size = save_weights(model, args.out, args.arch)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"final test accuracy {acc:.4f} after {epochs:.2f} epochs; training {train_seconds:.1f}s, "
          f"total {time.perf_counter() - started:.1f}s on {device} ({device_name}); "
          f"saved {args.out} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    try:
        main()
    except ManipBenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
