"""benchmarks/pretrain_helps.py: data split, statistics, and the seed bookkeeping of a real --quick run."""

import json
import math
import os
import random
import statistics
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, pretrain_helps  # noqa: E402
from benchmarks.common import read_result_json  # noqa: E402
from datasets import read_list_file  # noqa: E402
from util.weights import read_weights  # noqa: E402


def test_make_data_keeps_n_labels_per_class_and_a_disjoint_test_set(tmp_path):
    pool, lists = pretrain_helps.make_data(tmp_path, labels_per_class=2, object_scale=2.0, speed_scale=2.0,
                                           num_videos=40)
    # the pool is keyed by its generation settings: the same ones reuse it, another scale never does
    assert pretrain_helps.make_data(tmp_path, 2, 2.0, 2.0, num_videos=40)[0] == pool
    assert pretrain_helps.make_data(tmp_path, 2, 1.0, 2.0, num_videos=40)[0] != pool
    train = read_list_file(str(lists / "train.csv"), str(pool))
    test = read_list_file(str(lists / "test.csv"), str(pool))
    pool_train = read_list_file(str(pool / "train.csv"), str(pool))
    labels = [label for _, label in train]
    assert sorted(labels) == sorted(list(range(8)) * 2)
    assert {p for p, _ in train} <= {p for p, _ in pool_train}  # labelled videos come from the pretraining pool
    assert not {p for p, _ in test} & {p for p, _ in pool_train}  # pretraining never sees a test video
    assert len(test) == 40 - len(pool_train) and all(os.path.exists(p) for p, _ in train + test)


def test_t_quantile_matches_closed_forms_and_the_normal_limit():
    # df 1 (Cauchy) and df 2 have closed-form quantiles; large df tends to the normal quantile
    for p in (0.9, 0.975):
        assert common.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
        assert common.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert common.t_quantile(0.975, 1000) == pytest.approx(z, rel=2e-3)
    s = common.summarize([1.0, 2.0, 6.0])
    half = common.t_quantile(0.975, 2) * statistics.stdev([1.0, 2.0, 6.0]) / math.sqrt(3)
    assert s["mean"] == 3.0 and s["ci95"] == pytest.approx([3.0 - half, 3.0 + half])


def test_gains_pair_runs_by_fine_tuning_seed_not_by_order():
    rng = random.Random(0)
    runs = []
    for p in range(3):
        for s in range(2):
            k = pretrain_helps.finetune_seed(p, s, 2)
            base = rng.uniform(10, 40)
            runs.append(dict(arm="scratch", pretrain_seed=p, seed=k, top1=base, minutes=1.0))
            runs.append(dict(arm="finetuned", pretrain_seed=p, seed=k, top1=base + 10 * p + s, minutes=1.0))
        runs.append(dict(arm="probe_random", pretrain_seed=p, seed=p, top1=12.0, minutes=1.0))
        runs.append(dict(arm="probe_pretrained", pretrain_seed=p, seed=p, top1=12.0 + p, minutes=1.0))
    rng.shuffle(runs)  # records arrive in any order
    report = pretrain_helps.build_report(runs, seeds=3)
    assert report["gain_per_seed"] == {str(p): [pytest.approx(10 * p), pytest.approx(10 * p + 1)] for p in range(3)}
    assert report["gain"]["mean"] == pytest.approx(10.5) and report["gain"]["std"] == pytest.approx(10.0)
    assert report["probe_gain"]["mean"] == pytest.approx(1.0)
    assert report["target"] == {"mean_gain_ge_10": True, "every_seed_positive": True, "probe_gain_ge_5": False,
                                "seeds_ge_3": True}
    assert not report["target_met"]
    assert len({pretrain_helps.finetune_seed(p, s, 2) for p in range(3) for s in range(2)}) == 6


def _config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)


# ~60 s for the ten runs of the smaller case: both are slow tests, run by .ci/run.
@pytest.mark.slow
@pytest.mark.parametrize("finetune_seeds", [1, 2])
def test_quick_run_pairs_seeds_and_reuses_finished_runs(tmp_path, finetune_seeds):
    # every step for real (main_pretrain.py / main_finetune.py subprocesses) on a tiny pool for a few steps;
    # the default suite runs 2 pretraining seeds x 1 fine-tuning seed (10 runs), the slow one 2 x 2 (14 runs)
    m = finetune_seeds
    args = ["--quick", "--seeds", "2", "--finetune_seeds", str(m), "--out", str(tmp_path)]
    report = pretrain_helps.main([*args, "--results", str(tmp_path / "results")])
    written = list((tmp_path / "results").glob("pretrain_helps-quick_*.md"))
    assert len(written) == 1 and json.dumps(read_result_json(written[0])) == json.dumps(report, default=str)
    runs = report["runs"]
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in
              ("pretrain", "scratch", "finetuned", "probe_random", "probe_pretrained")}
    assert {arm: len(rs) for arm, rs in by_arm.items()} == {"pretrain": 2, "scratch": 2 * m, "finetuned": 2 * m,
                                                           "probe_random": 2, "probe_pretrained": 2}
    pretrain_dir = {r["pretrain_seed"]: r["dir"] for r in by_arm["pretrain"]}
    for r in runs:  # each run really used the seed and the weights it is booked under
        cfg = _config(r["dir"])
        assert cfg["seed"] == r["seed"]
        if r["arm"] in ("finetuned", "probe_pretrained"):
            assert cfg["finetune"] == pretrain_dir[r["pretrain_seed"]]
        elif r["arm"] != "pretrain":
            assert cfg["finetune"] == ""
        if r["arm"] != "pretrain":
            assert r["top1"] == json.loads(open(os.path.join(r["dir"], "eval_test.json")).read())["top1"]
    assert sorted(r["seed"] for r in by_arm["scratch"]) == sorted(r["seed"] for r in by_arm["finetuned"]) == list(
        range(2 * m))
    assert {r["seed"] // m for r in by_arm["finetuned"] if r["pretrain_seed"] == 1} == {1}
    # two pretraining seeds give two different encoders
    first, second = (read_weights(pretrain_dir[p]) for p in (0, 1))
    assert not torch.equal(first["patch_embed.proj.weight"], second["patch_embed.proj.weight"])
    scratch = {r["seed"]: r["top1"] for r in by_arm["scratch"]}
    for p in (0, 1):
        expect = [r["top1"] - scratch[r["seed"]] for r in sorted(by_arm["finetuned"], key=lambda r: r["seed"])
                  if r["pretrain_seed"] == p]
        assert report["gain_per_seed"][str(p)] == pytest.approx(expect)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["gain"] == pytest.approx(report["gain"], nan_ok=True)
    assert len(saved["data_fingerprint"]) == 16
    # a second call reuses every finished run and reports the same numbers
    again = pretrain_helps.main(args)  # (without --results: nothing more is written)
    assert len(list((tmp_path / "results").iterdir())) == 1
    assert all(r["minutes"] != r["minutes"] for r in again["runs"])  # nan: reused
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in runs]
