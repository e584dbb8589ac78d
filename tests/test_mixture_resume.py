"""Data mixtures in checkpoints and frame-folder sources: a checkpoint records the mixture's fingerprint and a
resume on another mixture is refused (or let through by --allow_mixture_change); a source may be a frame-folder
list (`data_format: frames`) beside video lists. Slow: a videos + frames mixture trains and saves through
main_pretrain.py, a resume with a changed weight is refused, and with the flag it goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.mixture import fingerprint_changes, load_mixture, mixture_fingerprint
from util.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_frame_folder import make_release  # noqa: E402


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 40-frame videos at 30 fps, and the same as PNG frame folders (videos.csv, png.csv)."""
    root = tmp_path_factory.mktemp("release")
    make_release(root, 30)
    return root


def write_mix(path: Path, root: Path, frames_weight: float = 1.0, extra: str = "") -> Path:
    """A mixture of the videos (each once) and their frame folders (weighted), blocks of 2."""
    path.write_text(f"""block_size: 2
weighted_items: 2
sources:
  - name: videos
    list_file: {root}/videos.csv
    weight: once
  - name: frames
    list_file: {root}/png.csv
    data_format: frames
    frame_template: img_{{:05d}}.png
    frame_fps: 30
    weight: {frames_weight}
{extra}""")
    return path


def test_fingerprint_follows_contents_not_paths_and_names_each_change(release: Path, tmp_path: Path) -> None:
    """The same lists elsewhere are the same mixture; a weight, a list's contents or the block size is a change."""
    fp = mixture_fingerprint(load_mixture(str(write_mix(tmp_path / "a.yaml", release))))
    moved = tmp_path / "moved"
    shutil.copytree(release, moved)
    assert fingerprint_changes(fp, mixture_fingerprint(load_mixture(str(write_mix(tmp_path / "b.yaml", moved))))) == []
    assert fp["sources"][1]["data_format"] == "frames" and fp["sources"][0]["list_lines"] == 2
    (moved / "png.csv").write_text((moved / "png.csv").read_text() + "png0 1 40 0\n")
    text = (tmp_path / "b.yaml").read_text().replace("weight: 1.0", "weight: 2.0").replace("block_size: 2", "block_size: 4")
    (tmp_path / "b.yaml").write_text(text)
    changes = fingerprint_changes(fp, mixture_fingerprint(load_mixture(str(tmp_path / "b.yaml"))))
    assert changes == ["block_size 2 -> 4", "source 'frames': list file contents changed (2 -> 3 lines)",
                       "source 'frames': weight 1.0 -> 2.0"]
    renamed = json.loads(json.dumps(fp).replace('"videos"', '"clips"'))
    assert fingerprint_changes(fp, renamed) == ["source 'videos' removed", "source 'clips' added"]


@pytest.mark.parametrize("extra, message", [
    ("data_format: tar", "source 'x'.data_format: expected video"),
    ("frame_fps: 25", "source 'x': frame_fps applies to frame folders only"),
    ("data_format: frames\n    frame_fps: 0", r"source 'x'.frame_fps: expected a number > 0"),
    ("data_format: frames\n    frame_start_index: -1", r"source 'x'.frame_start_index: expected an integer >= 0"),
])
def test_bad_source_formats_are_refused_naming_the_key(tmp_path: Path, extra: str, message: str) -> None:
    (tmp_path / "l.csv").write_text("f 1 4 0\n")
    (tmp_path / "m.yaml").write_text(f"block_size: 2\nsources:\n  - name: x\n    list_file: l.csv\n    weight: once\n"
                                     f"    {extra}\n")
    with pytest.raises(ConfigError, match=message):
        load_mixture(str(tmp_path / "m.yaml"))


def pretrain_args(mix: Path, out: Path, *extra: str) -> list[str]:
    """A micro model on 4 x 32^2 clips, 2 videos per batch, one data worker process: seconds per step."""
    return ["--data_mixture", str(mix), "--output_dir", str(out), "--input_size", "32", "--num_frames", "4",
            "--pred_t_dim", "2", "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--decoder_embed_dim",
            "32", "--decoder_depth", "1", "--model", "mae_vit_micro_patch8", "--vis_every", "0", "--precision",
            "fp32", "--repeat_aug", "1", "--sampling_rate", "2", *extra]


def trainer_for(argv: list[str]):
    """The Trainer main_pretrain.py builds for these flags (nothing built or run yet)."""
    import main_pretrain
    import tasks
    from util.config import flag_values, run_config
    from util.trainer import Trainer

    args = tasks.parse("pretrain", argv)
    return Trainer(run_config(args), main_pretrain.build_task(args),
                   flag_values(args, main_pretrain.get_args_parser(["--objective", "mae"])))


def saved_checkpoint(path: Path, trainer, fingerprint: dict | None, mixture: str = "x.yaml") -> Path:
    """A checkpoint folder's trainer_state.pt as Trainer.save writes it: config and, with a mixture, its fingerprint."""
    path.mkdir(parents=True)
    state = {"epoch": 0, "global_step": 1, "consumed": 2, "backend": "ddp", "world_size": 1, "name": path.name,
             "config": {**trainer.config_values, "data_mixture": mixture}}
    if fingerprint is not None:
        state["data_mixture"] = fingerprint
    torch.save(state, path / "trainer_state.pt")
    return path


def test_resume_on_another_mixture_is_refused_unless_allowed(release: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A changed weight stops the resume naming it and the flag; --allow_mixture_change makes it a warning; the
    same mixture (from another file) resumes silently; a checkpoint without a mixture is another run's data."""
    mix = write_mix(tmp_path / "mix.yaml", release)
    old = mixture_fingerprint(load_mixture(str(write_mix(tmp_path / "old.yaml", release, frames_weight=3.0))))
    same = mixture_fingerprint(load_mixture(str(mix)))
    ckpt = saved_checkpoint(tmp_path / "ck" / "step-1", trainer_for(pretrain_args(mix, tmp_path / "o")), old)
    with pytest.raises(ConfigError, match=r"trained on another data mixture \(source 'frames': weight 3.0 -> 1.0\).*"
                                          r"--allow_mixture_change"):
        trainer_for(pretrain_args(mix, tmp_path / "o", "--resume", str(ckpt)))._resume_path()
    allowed = trainer_for(pretrain_args(mix, tmp_path / "o", "--resume", str(ckpt), "--allow_mixture_change"))
    with caplog.at_level("WARNING"):
        assert allowed._resume_path() == ckpt
    assert "with another data mixture (--allow_mixture_change): source 'frames': weight 3.0 -> 1.0" in caplog.text
    ok = saved_checkpoint(tmp_path / "ck2" / "step-1", allowed, same, mixture="elsewhere/other.yaml")
    assert trainer_for(pretrain_args(mix, tmp_path / "o", "--resume", str(ok)))._resume_path() == ok
    plain = saved_checkpoint(tmp_path / "ck3" / "step-1", allowed, None, mixture="")
    with pytest.raises(ConfigError, match="the checkpoint was trained without a data mixture"):
        trainer_for(pretrain_args(mix, tmp_path / "o", "--resume", str(plain)))._resume_path()


def test_a_mixture_of_videos_and_frame_folders_gives_both_sources_items(release: Path, tmp_path: Path) -> None:
    """RunContext.mixture_dataset builds a VideoDataset and a FrameFolderDataset; both give clips of the run's
    geometry, each batch-sized block from one source."""
    from datasets.frame_folder import FrameFolderDataset
    from util.distributed import DistInfo
    from util.engine import TrainState
    from util.task import RunContext

    trainer = trainer_for(pretrain_args(write_mix(tmp_path / "mix.yaml", release), tmp_path / "o"))
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    ctx = RunContext(trainer.cfg, one, tmp_path / "o", TrainState(), 1)
    ds = ctx.mixture_dataset(trainer.task.mixture)
    assert [type(d).__name__ for d in ds.datasets] == ["VideoDataset", "FrameFolderDataset"]
    assert isinstance(ds.datasets[1], FrameFolderDataset) and ds.datasets[1].frame_template == "img_{:05d}.png"
    source = ds.draw(0)[0]
    for pos in (int((source == 0).argmax()), int((source == 1).argmax())):
        item = ds[(0, pos)]
        assert item["clips"].shape[1:] == (3, 4, 32, 32) and int(item["source"][0]) == int(source[pos])
    assert "frames: 2 frame folders, 2 items/epoch (weight 1)" in ds.describe()


@pytest.mark.slow  # three main_pretrain.py processes of a few steps: ~1 min on 2 cores
def test_videos_and_frames_mixture_trains_and_a_changed_mixture_resumes_only_when_allowed(release: Path,
                                                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run(mix: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "main_pretrain.py"), *pretrain_args(mix, out, "--save_every", "1", *extra)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = run(write_mix(tmp_path / "mix.yaml", release), "--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert sum(r["items/frames"] for r in steps[-1:]) + steps[-1]["items/videos"] == 4
    saved = torch.load(out / "checkpoints" / "latest" / "trainer_state.pt", weights_only=True)
    assert [s["name"] for s in saved["data_mixture"]["sources"]] == ["videos", "frames"]
    changed = write_mix(tmp_path / "mix2.yaml", release, frames_weight=2.0)
    refused = run(changed, "--max_steps", "3")
    assert refused.returncode != 0 and "source 'frames': weight 1.0 -> 2.0" in refused.stderr
    assert "--allow_mixture_change" in refused.stderr
    allowed = run(changed, "--max_steps", "3", "--allow_mixture_change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resumed from" in allowed.stderr and "with another data mixture" in allowed.stderr
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["step"] == 3
