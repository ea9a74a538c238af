"""Every sub-command's ``--help`` answers without importing torch (issue 29), and the names it
lists are the registries' own."""
import subprocess
import sys

from manip_bench import attributors, data, defaults, losses
from manip_bench.attack import PRESETS

COMMANDS = ("run", "list", "bench", "report", "smooth", "defend", "check", "patterns",
            "geometry")


def test_sub_command_help_does_not_import_torch():
    code = ("import sys\n"
            "from manip_bench import cli\n"
            f"for command in {COMMANDS!r}:\n"
            "    try:\n"
            "        cli.main([command, '--help'])\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, command\n"
            "print('torch' in sys.modules, 'rich' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    *helps, loaded = done.stdout.strip().splitlines()
    assert loaded == "False False", "sub-command help imported (torch, rich): " + loaded
    text = " ".join(" ".join(helps).split())
    for words in ("usage: manip-bench run", "usage: manip-bench geometry",
                  "center_of_mass | target_map | topk", "integrated_gradients | lrp | cifar10",
                  "(gradient, lrp, cam, transformer, all;", "cifar-10-batches-py", "$MANIP_BENCH_DATA"):
        assert words in text, words


def test_the_names_in_the_help_are_the_registries():
    assert defaults.PRESET_NAMES == tuple(PRESETS)
    assert defaults.EXPLANATION_LOSSES == tuple(sorted(
        name for name in losses.LOSSES if losses.get_class(name).explanation))
    assert defaults.ATTRIBUTOR_GROUPS == tuple(attributors.GROUPS)
    assert (defaults.CIFAR10, defaults.CIFAR10_FOLDER, defaults.DATA_ROOT_ENV) == \
        (data.CIFAR10, data.CIFAR10_FOLDER, data.DATA_ROOT_ENV)
