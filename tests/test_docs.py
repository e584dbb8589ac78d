"""README.md and docs/ against the tree and the parsers.

Promises are literal: a path the docs name exists, a flag they name is accepted by some parser, and
every command of a fenced ``bash`` block is either run by a named test or listed below with why not.
The README stays a user's guide: short, and without measurement provenance (dates, loads, issue
numbers), which lives in benchmarks/results/.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
README_FORBIDDEN = {
    "a date": rf"\b\d{{1,2}} ({MONTHS}) 20\d\d\b|\b20\d\d-\d\d-\d\d\b|\b({MONTHS}) 20\d\d\b",
    "a load average": r"(?i)load average|\bload \d",
    "'no GPU was available'": r"(?i)no GPU was available",
    "an issue number": r"(?i)\bissue \d+|#\d+\b",
    "a machine story": r"(?i)\b2-core machine\b|an hour earlier|hours earlier",
}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- (a) the README is a user's guide

def test_readme_is_short_and_has_no_measurement_provenance() -> None:
    text = _text(README)
    lines = text.count("\n")
    assert lines <= 320, f"README.md has {lines} lines; the limit is 320 (mechanisms go to docs/)"
    found = [f"{what}: {m.group(0)!r}" for what, rx in README_FORBIDDEN.items() for m in re.finditer(rx, text)]
    assert not found, "README.md holds measurement provenance (move it to benchmarks/results/):\n" + "\n".join(found)


def test_readme_keeps_the_two_quick_start_commands_and_what_they_end_with() -> None:
    text = _text(README)
    for command in ("pip install -r requirements.txt && python main_pretrain.py",
                    "pip install -r requirements.txt && python -m pytest"):
        assert f"\n{command}\n" in text, f"README.md lost the quick-start command {command!r}"
    for image in ("benchmarks/figures/demo_loss.png", "benchmarks/figures/demo_reconstruction.png"):
        assert f"]({image})" in text, f"README.md no longer shows {image}"
    ci = _text(ROOT / ".ci" / "run")
    assert "pip install -r requirements.txt && python -m pytest" in ci, ".ci/run must run the README's test command"


# ---------------------------------------------------------------- (b) every named path exists

TOP = ("benchmarks", "configs", "datasets", "docs", "launchers", "models", "tasks", "tests", "util", ".ci")
_TOPS = "|".join(re.escape(t) for t in TOP)
PATH_RX = re.compile(r"(?<![\w./-])((?:" + _TOPS + r")/[\w./{},*-]*[\w/}*])")
TOP_FILE_RX = re.compile(r"(?<![\w./-])((?:main_pretrain|main_finetune)\.py|requirements(?:-bench)?\.txt|pyproject\.toml)\b")
MODULE_RX = re.compile(r"python -m ((?:datasets|util|benchmarks|launchers|models|tasks)(?:\.\w+)+)")
LINK_RX = re.compile(r"\]\(([^)\s]+)\)")
# Paths of *other* repositories that the docs cite as sources (wgcban/adamae, OpenGVLab/VideoMAEv2,
# mae_st, PySlowFast's configs/masked_ssl/), and docs/tasks.md's example task, which
# tests/test_tasks.py writes into a temporary copy.
EXTERNAL_PATHS = {"models/pretrain/vit.py", "models/modeling_pretrain.py", "util/misc.py", "util/kinetics.py",
                  "tasks/frame_mae.py"}
EXTERNAL_PREFIXES = ("configs/masked_ssl", "configs/SSv2")  # PySlowFast's config folders


def _named_paths(text: str) -> set[str]:
    found = set()
    for m in PATH_RX.finditer(text):
        path = m.group(1).split("::")[0].rstrip(".")
        if not any(c in path for c in "{}*") and path not in EXTERNAL_PATHS and not path.startswith(EXTERNAL_PREFIXES):
            found.add(path)
    found.update(m.group(1) for m in TOP_FILE_RX.finditer(text))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_named_path_and_link_exists(doc: Path) -> None:
    text = _text(doc)
    missing = [p for p in sorted(_named_paths(text)) if not (ROOT / p).exists()]
    missing += [f"python -m {m}" for m in MODULE_RX.findall(text)
                if not (ROOT / (m.replace(".", "/") + ".py")).exists()]
    for target in LINK_RX.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).resolve().exists():
            missing.append(f"link ({target})")
    assert not missing, f"{_rel(doc)} names what the tree does not hold: {missing}"


def test_every_result_file_is_named_benchmark_hardware_day() -> None:
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    assert results, "benchmarks/results/ holds no result file"
    bad = [r.name for r in results if not re.fullmatch(r"[a-z0-9_-]+_[a-z0-9]+_20\d{6}\.md", r.name)]
    assert not bad, f"result files must be <benchmark>_<hardware>_<yyyymmdd>.md: {bad}"


# ---------------------------------------------------------------- (c) every named flag exists

FLAG_RX = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)(?![\w*-])")  # not `--synthetic_*`
# Flags of other tools that the docs show: torchrun's, docker's, tensorboard's, and mae_st's
# `--bias_wd`, cited as the source of a recipe value in docs/recipes.md; VideoMAE's test-view flags, cited
# as the source of the SSv2 test views in docs/downstream.md; VideoMAE v2's rawframe flags, cited for the
# defaults of --frame_template and --frame_start_index there.
EXTERNAL_FLAGS = {"--fname_tmpl", "--start_idx", "--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
                  "--standalone", "--shm-size", "--logdir", "--bias_wd", "--test_num_segment", "--test_num_crop",
                  "--find-links", "--no-index", "--only-binary", "--platform", "--python-version", "--dry-run"}  # (pip's)
SCRIPT_DIRS = ("benchmarks/*.py", "datasets/*.py", "util/checkpoint*.py")
ADD_ARGUMENT_RX = re.compile(r"add_argument\(\s*((?:[\"']-[^\"']*[\"']\s*,\s*)*[\"']-[^\"']*[\"'])")


@lru_cache(maxsize=1)
def known_flags() -> frozenset[str]:
    import launchers.slurm
    import tasks

    parsers = [tasks.pretrain_parser(["--objective", o]) for o in tasks.PRETRAIN]
    parsers += [tasks.finetune_parser(["--task", t]) for t in tasks.FINETUNE]
    parsers += [launchers.slurm.launcher_parser()]
    flags = {s for p in parsers for s in p._option_string_actions}
    for pattern in SCRIPT_DIRS:  # the scripts' own argparse, read from their source
        for script in ROOT.glob(pattern):
            for group in ADD_ARGUMENT_RX.findall(_text(script)):
                flags.update(re.findall(r"[\"'](--[^\"']+)[\"']", group))
    return frozenset(flags)


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_named_flag_is_accepted_by_a_parser(doc: Path) -> None:
    flags = known_flags()
    unknown = sorted({f for f in FLAG_RX.findall(_text(doc)) if f not in flags and f not in EXTERNAL_FLAGS})
    assert not unknown, f"{_rel(doc)} names flags no parser accepts: {unknown}"


# ---------------------------------------------------------------- (d) every bash command is accounted for

# Commands a test (or .ci/run, for the quick start) runs, as written or at tiny sizes: pattern -> where.
RUN_ELSEWHERE = {
    r"python -m datasets\.shards (write|index) .*": "tests/test_shards.py::test_command_line_writes_and_indexes_shards",
    r"pip install -r requirements\.txt && python main_pretrain\.py":
        "tests/test_pretrain.py::test_demo_writes_logs_checkpoint_tensorboard_and_images",
    r"pip install -r requirements\.txt && python -m pytest": ".ci/run",
    r"python main_pretrain\.py( --objective rho_byol)? --help":
        "tests/test_tasks.py::test_help_lists_the_shared_flags_and_only_that_objectives_own",
    r"python main_pretrain\.py --config configs/pretrain/image_demo\.yaml":
        "tests/test_image_mae.py::test_image_demo_config_trains",
    r"python main_pretrain\.py --config configs/pretrain/videotext_demo\.yaml --videotext_eval \w+":
        "tests/test_videotext.py::test_tiny_run_eval_commands_repeat_its_numbers_and_refuse_an_untrained_folder",
    r"python main_finetune\.py --finetune runs/demo|python main_finetune\.py --config \S+ --output_dir OUT --eval":
        "tests/test_finetune.py::test_finetune_from_pretraining_folder_then_eval_reproduces_accuracy",
    r"python main_finetune\.py --probe attentive .*":
        "tests/test_probe.py::test_main_finetune_attentive_probe_grid_end_to_end",
    r"python -m util\.checkpoint (export|info) .*":
        "tests/test_checkpoint.py::test_export_and_info_cli_on_a_ddp_checkpoint",
    r"python -m datasets\.synthetic .*": "tests/test_data_synthetic.py::test_cli_writes_decodable_videos_and_lists",
    r"python launchers/submitit_pretrain\.py .* --dry_run":
        "tests/test_launch.py::test_dry_run_prints_the_sbatch_directives",
    r"python benchmarks/gpu_report\.py --quick --device cpu":
        "tests/test_gpu_report.py::test_quick_cpu_smoke_run_measures_every_row",
    r"python benchmarks/pretrain_helps\.py --quick":
        "tests/test_pretrain_helps.py::test_quick_run_pairs_seeds_and_reuses_finished_runs",
}

# Commands no test runs: pattern -> why.
NOT_RUN = {
    r"python -m pytest.*": "a test command: it runs the tests themselves",
    r"torchrun --n.*": "needs 8 GPUs or several nodes (tests/test_launch_backends.py runs the same "
                       "launches as 2 CPU processes under -m slow)",
    r"python launchers/submitit_(pretrain|finetune)\.py .*": "submits to a SLURM cluster",
    r"python -m datasets\.resize --src /data/.*": "needs a copy of Kinetics",
    r"(OMP_NUM_THREADS=1 )?python benchmarks/.*": "a benchmark: minutes to hours of measurement, never part of pytest",
    r"pip install -r requirements-bench\.txt": "installs optional packages (Hugging Face transformers)",
    r"pip download .*": "downloads wheels: needs internet (the report's check of what is missing is "
                        "tests/test_gpu_report.py's)",
    r"pip install --no-index --find-links wheels/ .*": "installs the wheels downloaded elsewhere",
    r"python main_pretrain\.py .*": "a CPU demo of minutes, or needs official weights or data; the tests train "
                                    "each objective at tiny sizes instead",
    r"python main_finetune\.py( .*)?": "a CPU demo of minutes, or needs official weights or data",
    r"python -m datasets\.captions .*": "generates 1200 captioned videos (minutes)",
}


def bash_commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", _text(doc), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+", " ", re.sub(r"\s+#.*$", "", line)).strip()
                if command and not command.startswith("#"):
                    out.append((_rel(doc), command))
    return out


def test_every_bash_command_is_run_by_a_test_or_says_why_not() -> None:
    commands = bash_commands()
    assert commands, "no fenced bash block found"
    used: set[str] = set()
    unaccounted = []
    for doc, command in commands:
        match = next((rx for rx in [*RUN_ELSEWHERE, *NOT_RUN] if re.fullmatch(rx, command)), None)
        if match is None:
            unaccounted.append(f"{doc}: {command}")
        used.add(match or "")
    assert not unaccounted, ("commands neither run by a named test nor listed as not run (add them to "
                             "RUN_ELSEWHERE or NOT_RUN in tests/test_docs.py):\n" + "\n".join(unaccounted))
    stale = [rx for rx in [*RUN_ELSEWHERE, *NOT_RUN] if rx not in used]
    assert not stale, f"entries that match no documented command any more: {stale}"


@pytest.mark.parametrize("where", sorted(set(RUN_ELSEWHERE.values())))
def test_the_named_tests_exist(where: str) -> None:
    path, _, name = where.partition("::")
    assert (ROOT / path).is_file(), f"{path} does not exist"
    if name:
        assert re.search(rf"^def {re.escape(name)}\(", _text(ROOT / path), re.M), f"{where} is not defined"
    else:
        pattern = next(rx for rx, w in RUN_ELSEWHERE.items() if w == where)
        assert re.search(pattern.replace(r"\ ", " "), _text(ROOT / path)), f"{path} does not run {pattern!r}"
