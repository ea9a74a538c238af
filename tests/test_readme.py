"""The README and the documentation pages: every Python block runs as written (extracted from the
files, so it cannot drift), the README stays short and starts with the two commands, and the
supported releases it names are the tested ones."""
import re
from pathlib import Path

import pytest

from manip_bench import _compat

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [(page, index, block) for page in PAGES for index, block in
          enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"),
                               re.S | re.M))]


def _name(page, index):
    return f"{page.relative_to(ROOT)} python block {index}"


def test_the_docs_have_python_blocks():
    pages = {page.relative_to(ROOT).as_posix() for page, _, _ in BLOCKS}
    assert {"README.md", "docs/getting-started.md", "docs/attack.md", "docs/attributors.md",
            "docs/check-your-pipeline.md", "docs/defend.md", "docs/geometry.md"} <= pages


def test_the_readme_fits_on_a_few_screens():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_starts_with_the_two_commands():
    """The main job and the test command (.ci/run runs the same test command) come first."""
    text = README.read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip() for block in
                re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
                for line in block.splitlines() if line.strip()]
    assert commands[:2] == ["pip install -e . && manip-bench run --attributor zennit.epsilon",
                            "pip install -e '.[test]' && python -m pytest -q"]
    assert "python -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
@pytest.mark.parametrize("distribution", sorted(_compat.TESTED))
def test_the_docs_name_the_tested_releases(page, distribution):
    text = (ROOT / page).read_text(encoding="utf-8")
    assert f"{distribution} {_compat.tested_range(distribution)}" in text, \
        f"{page} does not say '{distribution} {_compat.tested_range(distribution)}'"


@pytest.mark.slow
@pytest.mark.parametrize("page, index, block", BLOCKS,
                         ids=[_name(page, index) for page, index, _ in BLOCKS])
def test_python_block_runs(page, index, block, tmp_path, monkeypatch):
    """Every ```python block runs; excerpts and minutes-long recipes are fenced ```py and the
    page says so."""
    monkeypatch.chdir(tmp_path)  # blocks that write results write them here
    exec(compile(block, _name(page, index), "exec"), {})
