"""The documentation cannot drift from the code: every ```python block of every page runs, and the site builds.

How the pages' code is run (docs/contributing-docs.md says the same for authors):

- Every fenced block whose language is ``python`` in ``docs/**/*.md`` and ``README.md`` is executed. The blocks
  of one page run in order in one namespace, as a notebook would, so a later block may use what an earlier one
  made; each page starts in a fresh temporary working folder (databases, MLflow stores and plots land there).
- A block that cannot run here (it needs a GPU, several machines or a server) is preceded, on the line just
  above its fence, by ``<!-- docs-test: skip, <reason> -->``. The reason is required and the skipped blocks are
  listed in this file (``SKIPPED``), so a new one is a visible change, not a silent one.
- A block that only includes a file (``--8<-- "examples/x.py"``, docs/examples.md) is not executed here: the
  file must exist and be run by a test of its own, which is checked.
- README.md's training-loop snippet uses names it does not define (``model``, ``loader``, ...): ``README_CONTEXT``
  defines them on a real tiny task before the README's blocks run.

``mkdocs build --strict`` runs into a temporary folder: a broken link, anchor, nav entry, docstring reference or
formula fails it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted([*DOCS.rglob("*.md"), REPO / "README.md"])

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*,\s*(?P<reason>\S.*?)\s*-->\s*$")
_MARKER = re.compile(r"<!--\s*docs-test\b")
_INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')

# (page, first line of the block) of every block marked as not runnable here; keep it short.
SKIPPED = {
    ("docs/scaling.md", 'device = "cuda"'),  # float16 autocast and a CUDA GradScaler
    ("docs/scaling.md", "import torch.distributed as dist"),  # DDP under torchrun (tests/test_ddp.py runs it)
    ("docs/scaling.md", "import optuna"),  # a PostgreSQL server on another machine
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when marked not runnable
    includes: tuple[str, ...]  # the files a snippet-include block names

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")


def python_blocks(text: str, page: str = "<string>") -> list[Block]:
    """The fenced ```python blocks of a Markdown text, with their skip markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening or not opening.group("info").strip():
            i += 1
            continue
        fence, indent = opening.group("fence"), opening.group("indent")
        language = opening.group("info").split()[0].lstrip(".{").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{page}:{i + 1}: a fence that is never closed")
        if language == "python":
            above = lines[i - 1] if i > 0 else ""
            marker = _SKIP.match(above)
            if marker is None and _MARKER.search(above):
                raise ValueError(f"{page}:{i}: malformed marker {above.strip()!r}; use <!-- docs-test: skip, why -->")
            includes = [m.group("path") for m in map(_INCLUDE.match, body) if m]
            if includes and len(includes) != sum(1 for line in body if line.strip()):
                raise ValueError(f"{page}:{i + 1}: a block mixes snippet includes and code")
            code = textwrap.dedent("\n".join(body))
            blocks.append(Block(page, i + 1, code, marker and marker.group("reason"), tuple(includes)))
        i = j + 1
    return blocks


def run_blocks(blocks: list[Block], namespace: dict | None = None) -> dict:
    """Execute the runnable blocks in order in one namespace; a failure names the page and the fence's line."""
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    for block in blocks:
        if block.skip or block.includes:
            continue
        try:
            exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the snippet at {block.page}:{block.line} failed: {exc!r}") from exc
    return namespace


# README.md's snippets stand for the reader's own code: these are the names they assume, on a real tiny task.
README_CONTEXT = """
import math
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from hidlr_hpo.tasks import get_task

task = get_task("digits")
loader = DataLoader(TensorDataset(task.train.x[:256], task.train.y[:256]), batch_size=64, shuffle=True)
val_loader = DataLoader(TensorDataset(task.val.x, task.val.y), batch_size=64, shuffle=True)
model = task.make_model(0)
epochs = 2

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)

def evaluate(model, loader):
    with torch.no_grad():
        return sum(float(loss_fn(model, b)) * len(b[1]) for b in loader) / len(loader.dataset)

def objective(trial):
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    weight_decay = trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
    return (math.log10(lr) + 2.0) ** 2 + (math.log10(weight_decay) + 3.0) ** 2
"""


def _page_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


ALL_BLOCKS = {_page_id(p): python_blocks(p.read_text(encoding="utf-8"), _page_id(p)) for p in PAGES}
PAGES_WITH_CODE = [page for page, blocks in ALL_BLOCKS.items() if any(not b.skip and not b.includes for b in blocks)]


@pytest.fixture
def user_defaults(tmp_path, monkeypatch):
    """A reader's session: float32 (the conftest's float64 is for the maths tests), a fresh working folder
    with the repository's examples/ beside it (pages run from the repository root), one intra-op thread (the
    snippets' tiny models only lose to thread start-up on a busy 2-core machine)."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_the_python_snippets_of_a_page_run(page, user_defaults):
    namespace = {"__name__": "__docs__"}
    if page == "README.md":
        exec(compile(README_CONTEXT, "README_CONTEXT", "exec"), namespace)
    run_blocks(ALL_BLOCKS[page], namespace)


def test_the_pages_that_teach_have_code_that_runs():
    """The extractor finds the tutorials' code: a parser that silently found nothing would pass every page."""
    expected = {"README.md", "docs/tutorial.md", "docs/integrations.md", "docs/sampler.md", "docs/groups.md",
                "docs/peft.md", "docs/concepts.md", "docs/reading-a-study.md", "docs/scaling.md"}  # fmt: skip
    assert expected <= set(PAGES_WITH_CODE)
    assert sum(len(blocks) for blocks in ALL_BLOCKS.values()) >= 20


def test_skipped_snippets_are_the_listed_few_with_a_reason():
    skipped = {(b.page, b.first_line) for blocks in ALL_BLOCKS.values() for b in blocks if b.skip}
    assert skipped == SKIPPED
    assert all(len(b.skip) > 10 for blocks in ALL_BLOCKS.values() for b in blocks if b.skip)


def test_included_examples_exist_and_each_example_is_run_by_a_test():
    included = {path for blocks in ALL_BLOCKS.values() for b in blocks for path in b.includes}
    assert included, "docs/examples.md includes the example scripts"
    for path in included:
        assert (REPO / path).is_file(), path
    tests = {p: p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py") if p.name != "test_docs.py"}
    tests["tests/test_docs.py (EXAMPLE_RUNS)"] = " ".join(EXAMPLE_RUNS)
    for script in sorted((REPO / "examples").glob("*.py")):
        runners = [name for name, text in tests.items() if re.search(rf"\b{script.stem}\b", text)]
        assert runners, f"examples/{script.name} is run by no test"
        assert f"examples/{script.name}" in included, f"docs/examples.md does not show examples/{script.name}"


def test_the_extractor_reads_fences_markers_and_failures():
    text = textwrap.dedent(
        """
        ```bash
        echo not python
        ```
        <!-- docs-test: skip, needs a CUDA device -->
        ```python
        raise RuntimeError("never run")
        ```
        - a list item:

          ```python title="x.py"
          x = 1
          ```
        ```python
        x += 1
        ```
        """
    )
    blocks = python_blocks(text)
    assert [(b.skip, b.code.strip()) for b in blocks] == [
        ("needs a CUDA device", 'raise RuntimeError("never run")'),
        (None, "x = 1"),
        (None, "x += 1"),
    ]
    assert run_blocks(blocks)["x"] == 2  # in order, one namespace, the skipped block not run
    with pytest.raises(AssertionError, match=r"<string>:1 failed: ZeroDivisionError"):
        run_blocks(python_blocks("```python\n1 / 0\n```\n"))
    with pytest.raises(ValueError, match="malformed marker"):
        python_blocks("<!-- docs-test: skip -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\npass\n")


def test_mkdocs_builds_the_site_strictly(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (site / "reference" / "controller" / "index.html").read_text(encoding="utf-8")
    assert 'id="hidlr_hpo.controller.HiDLR"' in reference  # the API reference came from the docstrings
    assert "plateau_jump" in reference
    concepts = (site / "concepts" / "index.html").read_text(encoding="utf-8")
    assert "<math" in concepts and "\\(" not in concepts  # the formulas were rendered to MathML at build time
    examples = (site / "examples" / "index.html").read_text(encoding="utf-8")
    assert "--8&lt;--" not in examples and ">wine_task<" in examples  # the example files were included


def test_the_docstring_readings_split_shared_arguments():
    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        from griffe_docstrings import split_shared_arguments
    finally:
        sys.path.remove(str(DOCS / "_hooks"))
    text = "Summary.\n\nArgs:\n    a, b: both\n        more.\n    c: alone\n\nReturns:\n    x, y: not args\n"
    expected = (
        "Summary.\n\nArgs:\n    a: both\n        more.\n    b: See ``a``.\n    c: alone\n\n"
        "Returns:\n    x, y: not args\n"
    )
    assert split_shared_arguments(text) == expected


# The examples added with the site, each run here on a tiny budget (the older ones have tests of their own).
EXAMPLE_RUNS = ["quickstart", "sampler_study", "automatic_peft"]


def _example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_quickstart_trains_and_refits(user_defaults):
    hidlr = _example("quickstart").main(epochs=2, verbose=False)
    assert hidlr.step_count == 2 * 22 and hidlr.n_refits >= 2  # 1400 training images in batches of 64
    assert hidlr.best_validation is not None and hidlr.best_validation < 2.0  # ln(10) = 2.3 at chance


def test_example_sampler_study_resumes_from_its_storage(user_defaults):
    module = _example("sampler_study")
    first = module.main(trials=6, epochs=2, storage="sqlite:///sampler.db", verbose=False)
    again = module.main(trials=2, epochs=2, storage="sqlite:///sampler.db", verbose=False)
    assert len(again.trials) == 8 and again.best_value <= first.best_value
    points = [tuple(t.params.values()) for t in again.trials]
    assert len(set(points)) == len(points)


def test_example_automatic_peft_freezes_within_the_budget(user_defaults):
    hidlr = _example("automatic_peft").main(epochs=2, budget=0.5, verbose=False)
    assert hidlr.frozen_groups and hidlr.trainable_fraction <= 0.5
    assert all(not p.requires_grad and p.grad is None for g in hidlr.param_groups if g["name"] in
               hidlr.frozen_groups for p in g["params"])  # fmt: skip
