"""benchmarks/pretrain_helps.py data split: balanced few-label subset of the unlabelled pool, held-out test set."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import pretrain_helps  # noqa: E402
from datasets import read_list_file  # noqa: E402


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
