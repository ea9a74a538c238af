"""Default values and fixed names, shared by the library and the command line.

Plain data that imports nothing, so ``manip-bench --help`` can show every default without
loading torch. Each module that uses a value takes it from here and keeps offering it
under its own name (``models.DEFAULT_MODEL``, ``bench.DEFAULT_BETAS``...).
"""

#: the zoo model used when none is named (:mod:`manip_bench.models`)
DEFAULT_MODEL = "cifar_vgg"
#: the attack preset: budget-tied self-tuning steps, no per-method tuning
#: (:mod:`manip_bench.attack`)
DEFAULT_PRESET = "auto"
#: the threat model: L-inf 8/255, as in adversarial-robustness benchmarks
#: (:mod:`manip_bench.threat`)
DEFAULT_BUDGET = "linf:8/255"
#: the pairs source made of the bundled photos (:mod:`manip_bench.bench`)
BUNDLED = "bundled"
#: attack iterations of a robustness check (:mod:`manip_bench.robustness`)
CHECK_ITERATIONS = 200
#: target PCC before the attack at or above which an input's own map already agrees with
#: its target: "already similar", not scored (:mod:`manip_bench.manipulability`)
ALREADY_SIMILAR_PCC = 0.9
#: softplus betas of the default sweeps, log-spaced (``manip-bench smooth`` and ``geometry``;
#: ReLU, beta -> inf, is added where a sweep compares with it)
BETAS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: the β of the defence table (``manip-bench defend``), and its fine-tuned zoo model
DEFENCE_BETAS = (3.0, 10.0)
FINETUNED_MODEL = "cifar_vgg_robust"
#: SmoothGrad noise levels, as a fraction of the input range ([0, 1] images: range 1)
SMOOTHGRAD_STDEVS = (0.005, 0.01, 0.02, 0.05)
#: ARPACK's relative tolerance on the Ritz values (:mod:`manip_bench.geometry`)
CURVATURE_TOL = 1e-6
#: which estimate a layer's PatternAttribution pattern gets (:mod:`manip_bench.patterns`)
PATTERN_REGIMES = ("relu", "positive", "negative", "linear")
#: names the command line's help lists without importing torch; each equals its registry's
#: built-in entries (tests/test_cli_help.py checks), plugins add to the registries
PRESET_NAMES = ("auto", "gradient", "integrated_gradients", "lrp", "cifar10")
EXPLANATION_LOSSES = ("center_of_mass", "target_map", "topk")
ATTRIBUTOR_GROUPS = ("gradient", "lrp", "cam", "transformer", "all")
#: the ``--pairs`` value for CIFAR-10's test set, torchvision's folder of it, and the
#: environment variable naming the folder that holds it (:mod:`manip_bench.data`)
CIFAR10 = "cifar10"
CIFAR10_FOLDER = "cifar-10-batches-py"
DATA_ROOT_ENV = "MANIP_BENCH_DATA"
