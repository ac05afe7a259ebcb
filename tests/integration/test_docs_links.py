"""README.md and docs/*.md point at things that exist.

Static checks, no subprocess: every relative link (and its ``#anchor``, where it points into a Markdown page) resolves;
every command of a ```bash block, and every inline-code command, names a script, file, ``segcompress`` command and
options that exist; every repository path the pages name (``recipes/*.yaml``, ``benchmarks/...``, ``tests/...::test``,
``lightning_segcompress/...``, and code spans that are one bare file name such as ``loading.py`` or
``quickstart.yaml``) exists. A failure lists ``page:line: what -> why``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from support.common import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# files of other projects the pages name on purpose (ExecuTorch's partitioner configs)
EXTERNAL_FILES = {"generic_node_configs.py"}
# the LightningCLI commands' top-level options (LightningCLI's own, and SegCompressCLI's --weights /
# --network_attribute)
LIGHTNING_OPTIONS = {"help", "config", "print_config", "seed_everything", "trainer", "model", "data", "optimizer",
                     "lr_scheduler", "ckpt_path", "weights", "network_attribute"}
# what jsonargparse adds to every tool
TOOL_OPTIONS = {"help", "config", "print_config"}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"}
REPO_PATH = re.compile(r"(?<![\w./<-])((?:lightning_segcompress|tests|benchmarks|examples|recipes|scripts|docs|\.ci)"
                       r"/[\w./*{},-]*)(::\w+)?")


@dataclass
class Page:
    path: Path
    text: str
    prose: str  # the text with every fenced block blanked out (line numbers kept)
    fences: list[tuple[int, str, list[str]]]  # (line of the opening fence, language, lines)

    @property
    def name(self) -> str:
        return self.path.relative_to(REPO).as_posix() if self.path.is_relative_to(REPO) else self.path.name

    def text_line(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1

    def prose_line(self, offset: int) -> int:
        return self.prose.count("\n", 0, offset) + 1


@cache
def page(path: Path) -> Page:
    text = path.read_text()
    prose, fences, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence = (number, line.strip()[3:].strip(), [])
            else:
                fences.append(fence)
                fence = None
            prose.append("")
        elif fence is not None:
            fence[2].append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{path.relative_to(REPO)}:{fence[0]}: this ``` block is never closed"
    return Page(path, text, "\n".join(prose), fences)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    found, counts = set(), {}
    for match in re.finditer(r"^#{1,6} +(.+?)(?: +#+)? *$", page(path).prose, flags=re.M):
        base = slug(match.group(1))
        found.add(f"{base}-{counts[base]}" if counts.get(base) else base)  # a repeated heading gets -1, -2, ...
        counts[base] = counts.get(base, 0) + 1
    return frozenset(found)


@cache
def repo_files() -> dict[str, list[Path]]:
    """Every file of the working tree (not .venv, .git, caches) by base name."""
    names: dict[str, list[Path]] = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for file in files:
            names.setdefault(file, []).append(Path(root) / file)
    return names


def expand_braces(path: str) -> list[str]:
    """``a.{md,json}`` -> ``a.md``, ``a.json``."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def path_problem(path: str, base: Path = REPO) -> str | None:
    """Why ``path`` (relative to ``base``; globs and braces allowed) names nothing in the repository, or None."""
    for candidate in expand_braces(path):
        if "*" in candidate:
            if not list(base.glob(candidate)):
                return f"no file matches {candidate}"
        elif not (base / candidate).exists():
            return f"no such file or folder: {candidate}"
        elif candidate.endswith("/") and not (base / candidate).is_dir():
            return f"not a folder: {candidate}"
    return None


# ---------------------------------------------------------------------------------------------------- links


def links(doc: Page) -> Iterator[tuple[int, str]]:
    # outside fenced blocks; the link text may span lines and hold `code`
    for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", doc.prose):
        yield doc.prose_line(match.start()), match.group(1)


def link_problems(path: Path, root: Path = REPO) -> Iterator[str]:
    """Broken links of the page ``path``; a link may point anywhere inside ``root``."""
    doc, root = page(path), root.resolve()
    for line, target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path.resolve()
        where = f"{doc.name}:{line}: link '{target}'"
        if not resolved.is_relative_to(root):
            yield f"{where} -> leaves the repository"
        elif not resolved.exists():
            yield f"{where} -> no such file: {resolved.relative_to(root)}"
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            near = difflib.get_close_matches(anchor, sorted(anchors(resolved)), n=3)
            yield (f"{where} -> no heading with anchor #{anchor} in {resolved.relative_to(root)}"
                   + (f" (similar: {near})" if near else ""))


def test_every_relative_link_and_anchor_resolves():
    problems = [problem for path in PAGES for problem in link_problems(path)]
    assert not problems, "broken links in README.md / docs/:\n" + "\n".join(problems)


def test_the_link_checker_finds_broken_links(tmp_path):
    """The checker itself: the anchors of headings with code, punctuation and duplicates, as GitHub makes them;
    missing files and anchors."""
    assert slug("Structured pruning: `StructuredPruning`") == "structured-pruning-structuredpruning"
    assert slug("Does it buy latency? (`benchmarks/pruning_speedup.py`)") == \
        "does-it-buy-latency-benchmarkspruning_speeduppy"
    assert slug("The full pipeline against the project's goal") == "the-full-pipeline-against-the-projects-goal"
    assert slug("Recovery after a step, and an accuracy budget") == "recovery-after-a-step-and-an-accuracy-budget"
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Top\n")
    (tmp_path / "docs" / "pruning.md").write_text("# Pruning\n\n## Recovery after a step, and an accuracy budget\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("# A\n\n## Same\n\n## Same\n\n```bash\n## not a heading\n```\n\n"
                   "[ok](#same-1), [ok](pruning.md#recovery-after-a-step-and-an-accuracy-budget), [ok](../README.md)\n"
                   "[no file](no_such_page.md), [no anchor](pruning.md#no-such-heading), [no anchor](#same-2),\n"
                   "[outside](../../x.md), [ok](https://example.org/x.md#y)\n")
    assert anchors(doc) == {"a", "same", "same-1"}
    problems = list(link_problems(doc, root=tmp_path))
    assert problems == ["page.md:12: link 'no_such_page.md' -> no such file: docs/no_such_page.md",
                        "page.md:12: link 'pruning.md#no-such-heading' -> no heading with anchor #no-such-heading in "
                        "docs/pruning.md",
                        "page.md:12: link '#same-2' -> no heading with anchor #same-2 in docs/page.md "
                        "(similar: ['same-1', 'same'])",
                        "page.md:13: link '../../x.md' -> leaves the repository"], problems


# ---------------------------------------------------------------------------------------------------- commands


@cache
def tool_options() -> dict[str, set[str] | None]:
    """``segcompress`` command -> the options it takes (None: a LightningCLI command, checked by top-level key)."""
    from lightning_segcompress.cli import LIGHTNING, TOOLS
    from lightning_segcompress.cli.tools import RENAMED

    options: dict[str, set[str] | None] = dict.fromkeys(LIGHTNING)
    for name, (module, function, _) in TOOLS.items():
        parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
        options[name] = set(parameters) | TOOL_OPTIONS | {old.lstrip("-") for old in RENAMED}
    return options


def script_options(script: Path) -> set[str] | None:
    """The ``--options`` an argparse script declares (None where it declares none: its options are not checked)."""
    source = script.read_text()
    if "add_argument" not in source:
        return None
    return set(re.findall(r"""["']--([\w-]+)["']""", source)) | {"help"}


def option_names(words: list[str]) -> Iterator[str]:
    for word in words:
        if word.startswith("--"):
            yield re.split(r"[=.+]", word[2:], maxsplit=1)[0]


def command_problem(command: str) -> str | None:
    """Why one shell command line of the docs would not find its script, tool or options; None when it would, or
    when it is none of ``bash <script>``, ``[.venv/bin/]python <script>``, ``[.venv/bin/]segcompress <command>``."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError as error:
        return f"cannot be split into words ({error})"
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # HF_HUB_OFFLINE=1 ...
        words = words[1:]
    if not words:
        return None
    program, args = words[0], words[1:]
    if program == "bash" and args:
        return path_problem(args[0])
    if program in ("python", ".venv/bin/python") and args:
        if args[0] == "-m":
            spec = importlib.util.find_spec(args[1].split(".")[0]) if len(args) > 1 else None
            return None if spec else f"no module {args[1:2]}"
        script = REPO / args[0]
        if not script.is_file() and program == "python" and (REPO / "examples" / args[0]).is_file():
            script = REPO / "examples" / args[0]  # the example copied to the device, run from its folder there
        if not script.is_file():
            return f"no such script: {args[0]}"
        declared = script_options(script)
        unknown = sorted(set(option_names(args[1:])) - declared) if declared is not None else []
        return f"{args[0]} has no option {', '.join('--' + u for u in unknown)}" if unknown else None
    if program in ("segcompress", ".venv/bin/segcompress"):
        if not args or args[0].startswith("-"):
            return None  # segcompress --help / --version
        commands = tool_options()
        names = re.split(r"[,/]", args[0].strip("{}"))  # segcompress {fit,validate,...}, validate/test/predict
        if unknown := [name for name in names if name not in commands]:
            return f"segcompress has no command {unknown} (it has {sorted(commands)})"
        for name in names:
            allowed = commands[name] if commands[name] is not None else LIGHTNING_OPTIONS
            if unknown := sorted(set(option_names(args[1:])) - allowed):
                return f"segcompress {name} has no option {', '.join('--' + u for u in unknown)}"
    return None


def commands(doc: Page) -> Iterator[tuple[int, str]]:
    """``(line, command)``: each command of the ```bash blocks (continuation lines joined) and each inline-code span
    in the prose that starts like a command."""
    for start, language, lines in doc.fences:
        if language not in ("bash", "sh", "shell"):
            continue
        pending, first = "", None
        for number, line in enumerate(lines, start + 1):
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            first = first if pending else number
            pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
            if not line.rstrip().endswith("\\"):
                yield first, pending
                pending = ""
    for match in re.finditer(r"`([^`]+)`", doc.prose):
        span = " ".join(match.group(1).split())
        if re.match(r"(?:[A-Z_]+=\S+ )*(?:bash scripts/|(?:\.venv/bin/)?python \S|(?:\.venv/bin/)?segcompress )", span):
            yield doc.prose_line(match.start()), span


def command_problems(path: Path) -> Iterator[str]:
    doc = page(path)
    for line, command in commands(doc):
        if problem := command_problem(command):
            yield f"{doc.name}:{line}: `{command.strip()[:100]}` -> {problem}"


def test_every_command_names_a_script_tool_and_options_that_exist():
    problems = [problem for path in PAGES for problem in command_problems(path)]
    assert not problems, "commands in README.md / docs/ that would fail:\n" + "\n".join(problems)


def test_the_command_checker_finds_broken_commands():
    assert command_problem("bash scripts/quickstart.sh --trainer.max_epochs=2  # comment") is None
    assert command_problem("HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/device_latency.py --size 512") is None
    assert command_problem("segcompress export --ckpt a.ckpt --input_size 512 512 --output model.pte") is None
    assert command_problem("segcompress fit --config recipes/quickstart.yaml --trainer.max_epochs=2") is None
    assert "no such script" in command_problem(".venv/bin/python benchmarks/no_such_benchmark.py")
    assert "no such file" in command_problem("bash scripts/no_such_script.sh")
    assert "has no option --no_such_option" in command_problem(
        "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/device_latency.py --no_such_option 1")
    assert "no command ['exprot']" in command_problem("segcompress exprot --ckpt a.ckpt")
    assert "has no option --checkpont" in command_problem("segcompress benchmark --checkpont a.ckpt")
    assert "has no option --trainr" in command_problem("segcompress fit --trainr.max_epochs=1")


# ---------------------------------------------------------------------------------------------------- paths


def named_paths(doc: Page) -> Iterator[tuple[int, str, str | None]]:
    """``(line, repository path, ::test name or None)`` of every repository path the page names, in prose, code
    spans and fenced blocks; placeholders such as ``tests/unit/<subpackage>/`` are skipped."""
    for match in REPO_PATH.finditer(doc.text):
        path = match.group(1).rstrip(".,")
        if "<" in doc.text[match.end(1):match.end(1) + 1] or path.endswith(("/.", "..")):
            continue
        yield doc.text_line(match.start()), path, (match.group(2) or "")[2:] or None


def path_problems(path: Path) -> Iterator[str]:
    doc = page(path)
    for line, named, test in named_paths(doc):
        problem = path_problem(named)
        if problem is None and test is not None and f"def {test}(" not in (REPO / named).read_text():
            problem = f"{named} has no test {test}"
        if problem:
            yield f"{doc.name}:{line}: {named}{'::' + test if test else ''} -> {problem}"
    for match in re.finditer(r"`(\w+\.(?:py|yaml|sh))`", doc.prose):  # `cli_tools.py`, `quickstart.yaml`
        if match.group(1) not in repo_files() and match.group(1) not in EXTERNAL_FILES:
            yield (f"{doc.name}:{doc.prose_line(match.start())}: {match.group(1)} -> no file of that name in the "
                   "repository (moved or renamed?)")


def test_every_named_repository_path_exists():
    problems = [problem for path in PAGES for problem in path_problems(path)]
    assert not problems, "paths named in README.md / docs/ that do not exist:\n" + "\n".join(problems)


def test_the_path_checker_finds_moved_files(tmp_path):
    """The modules that moved into cli/, state/ and models/ are caught under their old names."""
    doc = tmp_path / "page.md"
    doc.write_text("Loaders: `lightning_segcompress/loading.py`, `lightning_segcompress/cli/tools.py`,\n"
                   "`cli_tools.py`, `compression_state.py`,\n"
                   "tests in `tests/unit/data/test_data.py::test_no_such_test` and `tests/unit/<subpackage>/`;\n"
                   "recipes `recipes/quickstart.yaml`, `recipes/no_such.yaml`, `quickstart.yaml`;\n"
                   "`benchmarks/results/device_latency.{md,json}`, `benchmarks/shunt_*.py`,\n"
                   "```bash\nbash scripts/x.sh   # benchmarks/nothing_*.py\n```\n")
    missing = "no such file or folder:"
    assert list(path_problems(doc)) == [
        f"page.md:1: lightning_segcompress/loading.py -> {missing} lightning_segcompress/loading.py",
        "page.md:3: tests/unit/data/test_data.py::test_no_such_test -> tests/unit/data/test_data.py has no test "
        "test_no_such_test",
        f"page.md:4: recipes/no_such.yaml -> {missing} recipes/no_such.yaml",
        f"page.md:7: scripts/x.sh -> {missing} scripts/x.sh",
        "page.md:7: benchmarks/nothing_*.py -> no file matches benchmarks/nothing_*.py",
        "page.md:2: cli_tools.py -> no file of that name in the repository (moved or renamed?)",
        "page.md:2: compression_state.py -> no file of that name in the repository (moved or renamed?)"]


def test_every_recipe_is_named_in_the_docs():
    """The other way round for recipes: each file of recipes/ appears on some page (a recipe nobody can find)."""
    text = "\n".join(page(path).text for path in PAGES)
    missing = [recipe.name for recipe in sorted((REPO / "recipes").glob("*.yaml")) if recipe.name not in text]
    assert not missing, f"recipes/ files that no page of README.md / docs/ names: {missing}"
