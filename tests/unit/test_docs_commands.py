"""Every command in README.md and docs/*.md works as written.

Commands are the ``python jobs/...`` and ``python benchmarks/...`` lines of the ```bash / ```sh / ``` blocks (also
after ``ray job submit ... --``, after ``&&``, and with ``$VAR`` set by an earlier line of the block), and the
inline ``python jobs/...`` spans of the prose and tables. For each one: the script exists; every option is one
that the job's ``--help`` lists, or a dotted override ``--section.field`` naming a field of resnet_ray.config
(for a job that takes overrides); ``--config`` names a file under configs/ (or a file the jobs write, such as a
search's best_config.yaml); nothing is a placeholder that a shell would read as a redirect (``<run>``) or an
optional part (``[--flag]``). Benchmark options must appear in the benchmark's source. Each job's ``--help``
runs once, in this process (its ``main()`` with ``--help``: the parser the script builds, without a Python
start per job). Relative links between the pages must resolve, anchors included; the files a page names
(``resnet_ray/...py``, ``configs/...yaml``, ...) must exist, and docs/ARCHITECTURE.md must place every module of
the package and no module that is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import io
import os
import re
import shlex
import sys
import typing
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
JOBS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "jobs", "*.py")))
SHELL_BLOCKS = ("", "bash", "sh", "shell")
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {"<", ">", ">>", "<<", ">&", "<&"}
GENERATED_CONFIGS = {"best_config.yaml"}  # written by jobs/tune.py into the experiment folder
OVERRIDES_EPILOG = "--section.field"  # resnet_ray.cli.parser's epilog: the job takes dotted overrides
# what --local means without --config (jobs/*.py: cli.parse's local_config); evaluate and predict: the model's own
LOCAL_CONFIGS = {"prepare": "configs/local.yaml", "train": "configs/local.yaml", "tune": "configs/tune-local.yaml"}
PATH_MENTION = re.compile(r"(?<![\w/.-])((?:resnet_ray|jobs|benchmarks|configs|tests|docs)/[\w/.-]*\w\.(?:py|yaml|md))")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    words: tuple  # ("python", "jobs/train.py", "--local", ...)

    @property
    def script(self) -> str:
        return self.words[1]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.words)}"


def _code_blocks(text: str):
    """(first line number, language, lines) of every fenced block, and the lines outside any block."""
    blocks, outside, current = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if fence and current is None:
            current = (number + 1, fence.group(1).lower(), [])
        elif fence:
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
        else:
            outside.append((number, line))
    assert current is None, f"a code block opened on line {current[0] - 1} is never closed"
    return blocks, outside


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _expand(line: str, variables: dict) -> str:
    def value(match):
        name = match.group(1) or match.group(2)
        return variables.get(name, f"_{name}_")  # unknown (RAY_ADDRESS, ...): a plain word, still tokenized

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, line)


def _commands_of(words: list[str]):
    """The python commands of one shell line's words (split at && ; |, ray job submit's entrypoint)."""
    command: list[str] = []
    for word in [*words, ";"]:
        if word not in OPERATORS:
            command.append(word)
            continue
        while command and re.fullmatch(r"\w+=.*", command[0]):  # VAR=value command
            command.pop(0)
        if command[:3] == ["ray", "job", "submit"] and "--" in command:
            command = command[command.index("--") + 1 :]
        if len(command) >= 2 and command[0] == "python" and command[1].startswith(("jobs/", "benchmarks/")):
            yield command
        command = []


def _block_commands(page: str, first: int, lines: list[str]):
    variables: dict = {}
    logical, start = "", first
    for number, line in enumerate(lines, first):
        if not logical:
            start = number
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        try:
            words = _tokens(_expand(logical, variables))
        except ValueError as exc:  # an unbalanced quote: fatal in a command, harmless in a sample output line
            if re.search(r"python (jobs|benchmarks)/", logical):
                raise ValueError(f"{page}:{start}: {exc}: {logical}") from None
            words = logical.split()
        logical = ""
        if words and words[0] == "export":
            words = words[1:]
        if words and all(re.fullmatch(r"\w+=.*", w) for w in words):  # assignments only: DATA="--data.source ..."
            variables.update(w.split("=", 1) for w in words)
            continue
        for command in _commands_of(words):
            yield Command(page, start, tuple(command))


def collect_commands() -> list[Command]:
    commands = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            blocks, outside = _code_blocks(f.read())
        for first, language, lines in blocks:
            if language in SHELL_BLOCKS:
                commands.extend(_block_commands(page, first, lines))
        for number, line in outside:  # inline spans: `python jobs/train.py --local` in prose and tables
            for span in re.findall(r"`(python (?:jobs|benchmarks)/[^`]+)`", line):
                commands.extend(Command(page, number, tuple(c)) for c in _commands_of(_tokens(span)))
    return commands


COMMANDS = collect_commands()


def _run_help(job: str) -> str:
    """The --help text of jobs/<job>.py, from its main() in this process (the parser the script builds)."""
    spec = importlib.util.spec_from_file_location(f"_docs_job_{job}", os.path.join(ROOT, "jobs", f"{job}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, argv = io.StringIO(), sys.argv
    sys.argv = [f"jobs/{job}.py", "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            module.main()
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None), f"jobs/{job}.py --help exited with {exit_info.value.code}"
    return out.getvalue()


@functools.cache
def job_help(job: str) -> str:
    """The --help text of jobs/<job>.py, once per job."""
    return _run_help(job)


@functools.cache
def config_fields() -> frozenset:
    """Every ``section.field`` of the config tree."""
    from resnet_ray.config import Config

    hints = typing.get_type_hints(Config)
    return frozenset(
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(hints[section.name])
    )


def _option_value(words: tuple, i: int) -> tuple[str, str | None]:
    name, eq, value = words[i].partition("=")
    if not eq:
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
    return name, value


def problems(command: Command) -> list[str]:
    """What would stop the command as written (empty: nothing)."""
    words = command.words
    if not os.path.isfile(os.path.join(ROOT, command.script)):
        return [f"{command.script} does not exist"]
    found = [
        f"{w!r} would not run as written (a placeholder or an optional part?)"
        for i, w in enumerate(words)
        if w in REDIRECTS
        or (w.startswith("[") or w.endswith("]"))
        and not (words[i - 1].startswith("--") and "." in words[i - 1])  # a quoted YAML list: "[1, 4]"
    ]
    if command.script.startswith("benchmarks/"):
        return found + _benchmark_problems(command)
    job = os.path.basename(command.script)[:-3]
    help_text = job_help(job)
    listed = help_text.partition("\noptions:")[2] or help_text  # the options section, not the description
    options = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)(?![\w.-])", listed))
    for i, word in enumerate(words[2:], 2):
        if not word.startswith("-") or word == "--":
            continue
        name, value = _option_value(words, i)
        if "." in name and OVERRIDES_EPILOG not in help_text:
            found.append(f"jobs/{job}.py takes no config overrides ({name})")
        elif "." in name and name[2:].removeprefix("tune.search_space.") not in config_fields():
            found.append(f"{name} is not a config field (resnet_ray/config.py)")
        elif "." not in name and name not in options:
            found.append(f"jobs/{job}.py has no option {name}; it has {', '.join(sorted(options))}")
        if name == "--config":
            generated = bool(value) and os.path.basename(value) in GENERATED_CONFIGS
            shipped = bool(value) and value.startswith("configs/") and os.path.isfile(os.path.join(ROOT, value))
            if not (generated or shipped):
                found.append(f"--config {value} is not a file under configs/")
    return found or _config_problems(command, job)


def _config_problems(command: Command, job: str) -> list[str]:
    """The config the command would run with, loaded and validated (values in range, a search space that parses).

    Skipped where the config is not in the repository: --resume, a search's best_config.yaml. evaluate and predict
    without --config take the model's config: their overrides are checked against the defaults."""
    from resnet_ray.config_checks import ConfigError
    from resnet_ray.config_files import load_config

    words, overrides, config = command.words, [], None
    for i, word in enumerate(words[2:], 2):
        name, value = _option_value(words, i)
        if name == "--resume" or (name == "--config" and os.path.basename(value) in GENERATED_CONFIGS):
            return []
        if name == "--config":
            config = value
        elif name.startswith("--") and "." in name:
            overrides += [word] if "=" in word else [word, value]
    if config is None and "--local" in words:
        config = LOCAL_CONFIGS.get(job)
    try:
        load_config(os.path.join(ROOT, config) if config else None, overrides)
    except ConfigError as exc:
        return [f"its config does not load: {exc}"]
    return []


def _benchmark_problems(command: Command) -> list[str]:
    sources = ""
    for name in (command.script, "benchmarks/_common.py"):
        with open(os.path.join(ROOT, name)) as f:
            sources += f.read()
    found = []
    for word in command.words[2:]:
        if word == "--":  # what follows goes to the job the benchmark runs
            break
        name = word.partition("=")[0]
        if word.startswith("-") and f'"{name}"' not in sources:
            found.append(f"{command.script} defines no option {name}")
    return found


def test_the_pages_hold_commands_for_every_job():
    readme = {c.script for c in COMMANDS if c.page == "README.md"}
    missing = [job for job in JOBS if f"jobs/{job}.py" not in readme]
    assert not missing, f"README.md has no command for jobs {missing}"
    assert any(c.page.startswith("docs/") for c in COMMANDS), "no command found in docs/*.md"


def test_readme_keeps_the_set_up_and_ci_commands():
    """CI (.ci/run) runs the README's test command; the set-up block is the product's first impression."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks, _ = _code_blocks(f.read())
    lines = {line.strip() for _, language, body in blocks if language in SHELL_BLOCKS for line in body}
    assert 'pip install -e ".[test]" && python jobs/train.py --local' in lines
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
    assert ci and all(line in lines for line in ci), f"README.md lacks CI's test command {ci}"


@pytest.mark.parametrize("job", JOBS)
def test_every_job_answers_help(job: str):
    assert "usage:" in job_help(job)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_works_as_written(command: Command):
    assert not problems(command), f"{command}: " + "; ".join(problems(command))


def test_the_check_is_not_a_rubber_stamp():
    page = """\
DATA="--data.nosuch 1"
python jobs/train.py --local $DATA
python jobs/train.py --no-such-flag
python jobs/train.py --config configs/no-such.yaml
python jobs/evaluate.py --model ~/resnet_ray_runs/<run>
python jobs/evaluate.py --model run [--split test]
ray job submit --working-dir . -- python jobs/compare.py a b --optim.lr 0.1
aws s3 cp x . && python jobs/no_such_job.py --local
python benchmarks/ingest.py --no-such-flag
python jobs/train.py --local --train.fail_at_epoch 9
python jobs/tune.py --local --tune.search_space.optim.lr "{type: loguniform, low: 1, high: 0.1}"
"""
    commands = list(_block_commands("example.md", 1, page.splitlines()))
    expected = [
        "--data.nosuch is not a config field",
        "has no option --no-such-flag",
        "--config configs/no-such.yaml is not a file under configs/",
        "'<' would not run as written",
        "'[--split' would not run as written",
        "compare.py takes no config overrides",
        "jobs/no_such_job.py does not exist",
        "defines no option --no-such-flag",
        "train.fail_at_epoch: must be in [1, train.epochs)",
        "tune.search_space.optim.lr: needs numeric low < high",
    ]
    assert [c.line for c in commands] == list(range(2, 2 + len(expected)))
    for command, message in zip(commands, expected):
        assert any(message in p for p in problems(command)), (str(command), problems(command))
    good = Command(
        "example.md", 1, ("python", "jobs/train.py", "--local", "--optim.lr=0.01", "--config", "configs/local.yaml")
    )
    assert not problems(good)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path) as f:
        blocks, outside = _code_blocks(f.read())
    return {_anchor(m.group(1)) for _, line in outside if (m := re.match(r"^#{1,6}\s+(.*)$", line))}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str):
    with open(os.path.join(ROOT, page)) as f:
        _, outside = _code_blocks(f.read())
    for number, line in outside:
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            full = (
                os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
            )
            assert os.path.exists(full), f"{page}:{number}: link {target} points to nothing"
            if anchor and full.endswith(".md"):
                assert anchor in _anchors(full), f"{page}:{number}: {os.path.relpath(full, ROOT)} has no #{anchor}"


def test_readme_links_every_docs_page():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    unlinked = [p for p in PAGES[1:] if f"]({p})" not in text and f"]({p}#" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES)
def test_named_files_exist(page: str):
    """The modules, scripts, configs and tests a page names exist (the package is being reorganised)."""
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    named = set(PATH_MENTION.findall(text))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{page} names files that do not exist: {missing}"


def _modules() -> set[str]:
    """The package's modules as the architecture page names them: ``loop.py``, ``data/`` modules by their own name."""
    found = set()
    for folder in ("resnet_ray", os.path.join("resnet_ray", "data")):
        found |= {
            name for name in os.listdir(os.path.join(ROOT, folder)) if name.endswith(".py") and name != "__init__.py"
        }
    return found


def test_the_architecture_map_matches_the_package():
    """docs/ARCHITECTURE.md names every module of resnet_ray/ and resnet_ray/data/, and no module that is gone."""
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")) as f:
        text = f.read()
    named = set(re.findall(r"(?<![\w./-])(\w+\.py)\b", text))  # bare names; paths: test_named_files_exist
    modules = _modules()
    jobs = {name for name in os.listdir(os.path.join(ROOT, "jobs")) if name.endswith(".py")}
    assert not modules - named, f"docs/ARCHITECTURE.md does not place {sorted(modules - named)}"
    assert not named - modules - jobs, (
        f"docs/ARCHITECTURE.md names modules that do not exist: {sorted(named - modules - jobs)}"
    )
