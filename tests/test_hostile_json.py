"""JSON files a user hands over or a killed run leaves behind: a clear error naming the file, or a log that
keeps its good records; never a raw JSONDecodeError, AttributeError or UnicodeDecodeError."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from util.errors import ConfigError, MaeError  # noqa: E402

BAD = {
    "not_json": b"{ this is not json",
    "a_list": b"[1, 2, 3]",
    "binary": b"\xff\xfe\x00garbage",
    "nested": b"[" * 100_000,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_deepspeed_config_that_is_no_json_object_names_the_file(tmp_path: Path, kind: str) -> None:
    from util.config import OptimConfig, ParallelConfig
    from util.parallel import deepspeed_config

    path = tmp_path / f"{kind}.json"
    path.write_bytes(BAD[kind])
    with pytest.raises(ConfigError, match="--deepspeed_config") as err:
        deepspeed_config(ParallelConfig(dist="deepspeed", deepspeed_config=str(path)), OptimConfig(), 1, 2)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(ParallelConfig(dist="deepspeed", deepspeed_config=str(tmp_path / "none.json")),
                         OptimConfig(), 1, 2)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_class_prompts_that_are_no_json_object_name_the_file(tmp_path: Path, kind: str) -> None:
    from tasks.videotext_eval import read_class_prompts

    path = tmp_path / "class_prompts.json"
    path.write_bytes(BAD[kind])
    with pytest.raises(MaeError, match="--class_prompts") as err:
        read_class_prompts(path, None)
    assert str(path) in str(err.value)


def test_damaged_log_keeps_its_step_records_on_resume(tmp_path: Path) -> None:
    """truncate_log (called when a run resumes) drops lines that are not step records, keeps the others."""
    from util.logger import truncate_log

    path = tmp_path / "log.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_bytes("\n".join([good[0], "[1, 2]", good[1]]).encode() + b"\n\xff\xfe broken\n"
                     + "\n".join([json.dumps({"step": "x"}), good[2], '"text"', good[3], '{"step": 5, "lo'])
                     .encode())
    truncate_log(str(path), last_step=3)
    assert path.read_text().splitlines() == good[:3]
