"""What many tests share: comparisons, model snapshots, seeding, Captum's own maps, the
"the map moved" check and the CLI's one-line errors (fixtures are in ``conftest.py``)."""
import numpy as np
import torch
from captum import attr as captum_attr

from manip_bench import cli, metrics

#: the bundled photos of the trained-model pair: images and the images whose maps are targets
PAIR_IMAGES, PAIR_TARGETS = ("chelsea", "astronaut"), ("coffee", "rocket")


def relative_error(a, b):
    """``|a - b| / |b|`` (Frobenius norms; ``b == 0`` gives 0 for ``a == 0``, else huge)."""
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()


def seeded(fn, seed=7):
    """``fn()`` after seeding torch and NumPy: two calls draw the same noise."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return fn()


def interrupted_after(count, fn):
    """``fn`` that raises KeyboardInterrupt from its ``count + 1``-th call on (a user's
    Ctrl-C in the middle of a run); ``wrapper.calls`` counts the calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls > count:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    wrapper.calls = 0
    return wrapper


def _hook_counts(module):
    return (len(module._forward_hooks) + len(module._forward_pre_hooks)
            + len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {})))


def snapshot(model):
    """Everything of ``model`` an attributor could change: weights and buffers, module types,
    repr, modes, ``requires_grad`` flags and hooks (compare with :func:`assert_unchanged`)."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "repr": repr(model),
        "types": [type(m) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [_hook_counts(m) for m in model.modules()],
    }


def assert_unchanged(model, before):
    """``model`` is as :func:`snapshot` saw it."""
    after = snapshot(model)
    for key in ("repr", "types", "training", "requires_grad", "hooks"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def _smoothgrad(model):
    return captum_attr.NoiseTunnel(captum_attr.Saliency(model))


#: registry name -> (Captum's object for a model, ``attribute()`` keyword arguments for the
#: images ``x`` and the adapter's options, with the adapter's defaults)
CAPTUM_REFERENCES = {
    "captum.saliency": (captum_attr.Saliency, lambda x, abs=True: {"abs": abs}),
    "captum.input_x_gradient": (captum_attr.InputXGradient, lambda x: {}),
    "captum.integrated_gradients": (
        captum_attr.IntegratedGradients,
        lambda x, steps=30, method="gausslegendre": {"n_steps": steps, "method": method}),
    "captum.smoothgrad": (
        _smoothgrad, lambda x, samples=10, stdev=0.05: {
            "nt_type": "smoothgrad", "nt_samples": samples, "stdevs": stdev}),
    "captum.gradient_shap": (
        captum_attr.GradientShap, lambda x, samples=5, stdev=0.0: {
            "baselines": torch.zeros_like(x[:1]), "n_samples": samples, "stdevs": stdev}),
    "captum.guided_backprop": (captum_attr.GuidedBackprop, lambda x: {}),
    "captum.deconvolution": (captum_attr.Deconvolution, lambda x: {}),
    "captum.deeplift": (captum_attr.DeepLift, lambda x: {}),
    "captum.lrp": (captum_attr.LRP, lambda x: {}),  # Captum's default rules: epsilon 1e-9
}


def captum_reference(name, model, x, target, **options):
    """Captum's own map for registry name ``name`` with the adapter's ``options`` (seeded)."""
    make, arguments = CAPTUM_REFERENCES[name]
    kwargs = arguments(x, **options)
    return seeded(lambda: make(model).attribute(x.clone(), target=target, **kwargs)).detach()


def assert_map_moved(result, by):
    """Every image's target PCC rose by more than ``by`` in the attack ``result``; returns
    the PCCs before and after."""
    before = metrics.map_similarity(result.original_map, result.target_map)["pcc"]
    after = result.metrics["expl_target_pcc"]
    assert all(a > b + by for a, b in zip(after, before)), (before, after)
    return before, after


def assert_cli_error(capsys, argv, *fragments):
    """``manip-bench argv`` exits with 2 and one line on stderr holding every fragment (no
    traceback); returns that line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err
