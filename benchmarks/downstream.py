"""The downstream table of one pretrained checkpoint: fine-tuning and frozen-feature probes on the datasets a user
lists, written to one results file.

    python benchmarks/downstream.py --recipe downstream.yaml --checkpoint runs/vit_b_k400 \
        --output_dir runs/downstream --nproc_per_node 8 --results benchmarks/results

The recipe file maps each dataset to its fine-tuning recipe, its lists and the protocols to run (docs/downstream.md):

    ssv2:
      recipe: configs/finetune/vit_b_ssv2.yaml     # a main_finetune.py --config
      data_path: lists/ssv2                        # what datasets.prepare wrote
      protocols: [finetune, attentive]             # finetune, linear (--probe linear), attentive (--probe attentive)
    ucf101:
      recipe: configs/finetune/vit_b_ucf101.yaml
      data_path: lists/ucf101
      splits: [split1, split2, split3]             # DATA_PATH/<split>, one run each; their mean is reported
      protocols: {finetune: [], linear: [--epochs, "90"]}   # per-protocol flags
      args: [--batch_size, "8"]                    # flags of every run of this dataset

Each (dataset, protocol, split) is one run of main_finetune.py (`common.run_script`, a subprocess: the training
code itself) with `--finetune CHECKPOINT` in OUTPUT_DIR/<dataset>/<protocol>[/<split>]. A run whose final test
result is there is reused, and an unfinished one resumes from its own checkpoints, so the table picks up where a
stopped command left it. Flags after `--` go to every run (last wins: they override the recipe). The results
file OUTPUT_DIR/downstream.json holds top-1/top-5 per dataset and protocol (each split and their mean), the test
views and videos scored, the run folders and the checkpoint's weights fingerprint (`util.weights`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from util.config import StrictLoader  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.weights import weights_fingerprint  # noqa: E402

PROTOCOLS = {"finetune": [], "linear": ["--probe", "linear"], "attentive": ["--probe", "attentive"]}
DATASET_KEYS = {"recipe", "data_path", "protocols", "splits", "args"}


def _flags(value: Any, where: str, source: Path) -> list[str]:
    """A list of command-line words from the recipe file (numbers allowed), or a ConfigError naming the entry."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise ConfigError(f"{source}: {where} must be a list of flags, e.g. [--epochs, \"90\"]; got {value!r:.80}")
    return [str(v) for v in value]


def read_recipe(path: str | Path) -> dict[str, dict]:
    """The datasets of a recipe file, checked: {name: {recipe, data_path, protocols {name: flags}, splits, args}}."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506 - a SafeLoader
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--recipe {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--recipe {path}: expected a mapping of dataset name -> {{recipe, data_path, protocols}} "
                          "(docs/downstream.md)")
    table = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--recipe {path}: dataset name {name!r} must be letters, digits, - or _ (a folder name)")
        if not isinstance(entry, dict) or not {"recipe", "data_path"} <= entry.keys():
            raise ConfigError(f"--recipe {path}: dataset {name} needs `recipe` (a configs/finetune file) and "
                              "`data_path` (its lists)")
        unknown = set(entry) - DATASET_KEYS
        if unknown:
            raise ConfigError(f"--recipe {path}: dataset {name} has unknown keys {sorted(unknown)}; "
                              f"known: {sorted(DATASET_KEYS)}")
        protocols = entry.get("protocols", ["finetune"])
        if isinstance(protocols, list):
            protocols = {p: [] for p in protocols}
        if not isinstance(protocols, dict) or not protocols or not set(protocols) <= set(PROTOCOLS):
            raise ConfigError(f"--recipe {path}: dataset {name}: protocols must be a list or mapping of "
                              f"{sorted(PROTOCOLS)}; got {protocols!r:.80}")
        splits = entry.get("splits") or []
        if not isinstance(splits, list) or not all(isinstance(s, str) and s for s in splits):
            raise ConfigError(f"--recipe {path}: dataset {name}: splits must be a list of sub-folder names of "
                              "data_path, e.g. [split1, split2, split3]")
        recipe = Path(entry["recipe"])
        if not recipe.is_absolute() and not recipe.exists():
            recipe = common.ROOT / recipe  # a recipe named as in the repository
        if not recipe.is_file():
            raise ConfigError(f"--recipe {path}: dataset {name}: recipe {entry['recipe']} is not a file "
                              "(e.g. configs/finetune/vit_b_ssv2.yaml)")
        # runs start in the repository root: paths are made absolute from where this command runs
        table[name] = {"recipe": str(recipe.resolve()), "data_path": str(Path(entry["data_path"]).resolve()),
                       "splits": splits,
                       "protocols": {p: _flags(f, f"{name}.protocols.{p}", path) for p, f in protocols.items()},
                       "args": _flags(entry.get("args"), f"{name}.args", path)}
    return table


def final_result(out: Path) -> dict | None:
    """A finished run's final test result: OUT/eval_<its --eval_split>.json written at the end, or None."""
    try:
        config = yaml.safe_load((out / "config.yaml").read_text())
        result = json.loads((out / f"eval_{config['eval_split']}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    if not str(result.get("tag", "")).startswith("final"):  # an epoch's test during training, not the end
        return None
    return {**result, "split": config["eval_split"],
            "views": f"{config['test_num_temporal_views']} temporal x {config['test_num_spatial_crops']} spatial"}


def plan(table: dict[str, dict], checkpoint: str, out: Path, extra: list[str]) -> list[dict]:
    """One entry per run: dataset, protocol, split, run folder and main_finetune.py's flags."""
    runs = []
    for name, d in table.items():
        for protocol, flags in d["protocols"].items():
            for split in d["splits"] or [""]:
                folder = out / name / protocol / split if split else out / name / protocol
                data = str(Path(d["data_path"]) / split) if split else d["data_path"]
                args = ["--config", d["recipe"], "--data_path", data, "--finetune", checkpoint, *PROTOCOLS[protocol],
                        *d["args"], *flags, *extra]
                runs.append({"dataset": name, "protocol": protocol, "split": split, "out": folder, "args": args})
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """Rows per (dataset, protocol): top-1/top-5 of each split and their mean, views, videos, run folders."""
    rows: dict[tuple[str, str], dict] = {}
    for r in runs:
        res = r["result"]
        row = rows.setdefault((r["dataset"], r["protocol"]), {"dataset": r["dataset"], "protocol": r["protocol"],
                                                              "test_split": res["split"], "views": res["views"],
                                                              "splits": {}, "runs": []})
        row["splits"][r["split"] or "-"] = {k: res[k] for k in ("top1", "top5", "videos", "videos_total")
                                            if k in res} | ({"probe": res["probe"]} if "probe" in res else {})
        row["runs"].append(str(r["out"]))
    for row in rows.values():
        for k in ("top1", "top5"):
            row[k] = sum(s[k] for s in row["splits"].values()) / len(row["splits"])
    return list(rows.values())


def table_text(rows: list[dict]) -> str:
    """The rows as a markdown table (each split's top-1 after the mean when there are several)."""
    lines = ["| dataset | protocol | top-1 | top-5 | splits (top-1) | views | test videos |", "| --- " * 7 + "|"]
    for r in rows:
        per = ", ".join(f"{k} {v['top1']:.2f}" for k, v in r["splits"].items()) if len(r["splits"]) > 1 else "-"
        videos = "+".join(str(v.get("videos", "?")) for v in r["splits"].values())
        lines.append(f"| {r['dataset']} | {r['protocol']} | {r['top1']:.2f} | {r['top5']:.2f} | {per} | "
                     f"{r['views']} | {videos} on {r['test_split']} |")
    return "\n".join(lines)


def claim_output_dir(out: Path, checkpoint: str, fingerprint: str) -> None:
    """Mark OUT as the runs of this checkpoint; refuse an OUT holding runs of other weights (they would be reused)."""
    mark = out / "checkpoint.json"
    if mark.is_file():
        before = json.loads(mark.read_text())
        if before.get("weights_fingerprint") != fingerprint:
            raise ConfigError(f"--output_dir {out} holds the runs of other weights ({before.get('checkpoint')}, "
                              f"fingerprint {before.get('weights_fingerprint')}; now {fingerprint}), which would be "
                              "reused as this checkpoint's: give another --output_dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"checkpoint": checkpoint, "weights_fingerprint": fingerprint}))


def main(argv: list[str] | None = None) -> dict:
    """Run (or reuse) every listed run, print the table, write OUTPUT_DIR/downstream.json; returns its content."""
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="YAML: dataset -> recipe, data_path, protocols, splits, args")
    p.add_argument("--checkpoint", required=True, help="pretrained weights: a run or checkpoint folder, or a file "
                   "(anything main_finetune.py --finetune takes)")
    p.add_argument("--output_dir", required=True, help="runs go to OUT/<dataset>/<protocol>[/<split>]")
    p.add_argument("--nproc_per_node", type=int, default=1, help="processes per run (> 1: under torchrun)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    common.add_results_flag(p)
    a = p.parse_args(own)
    table = read_recipe(a.recipe)
    out = Path(a.output_dir).resolve()
    runs = plan(table, str(Path(a.checkpoint).resolve()), out, extra)
    launcher = ("-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc_per_node)) \
        if a.nproc_per_node > 1 else ()
    if a.dry_run:
        for r in runs:
            print(common.shown_command([sys.executable, *launcher, "main_finetune.py", "--output_dir", str(r["out"]),
                                        *r["args"]]))
        return {"runs": [{**r, "out": str(r["out"])} for r in runs]}
    with common.recording(a.results, "downstream", __file__, argv, device=common.training_device()) as rec:
        fingerprint = weights_fingerprint(a.checkpoint)  # before the runs: a wrong path fails at once
        print(f"checkpoint {a.checkpoint}: weights fingerprint {fingerprint}", flush=True)
        claim_output_dir(out, a.checkpoint, fingerprint)
        minutes = 0.0
        for r in runs:
            run = common.run_script("main_finetune.py", r["out"], r["args"], threads=a.threads, launcher=launcher,
                                    done=lambda o=r["out"]: final_result(o) is not None,
                                    label=f"{r['dataset']}/{r['protocol']}" + (f"/{r['split']}" if r["split"] else ""))
            r["result"], r["command"] = final_result(r["out"]), run.command
            minutes += 0.0 if math.isnan(run.minutes) else run.minutes
        rows = summarize(runs)
        print(table_text(rows))
        data = {"checkpoint": a.checkpoint, "weights_fingerprint": fingerprint, "rows": rows,
                "commands": [r["command"] for r in runs], "minutes_run_now": round(minutes, 2)}
        (out / "downstream.json").write_text(json.dumps(data, indent=1))
        print(f"results: {out / 'downstream.json'}")
        rec.data = data
    return data


if __name__ == "__main__":
    main()
