"""Fuzzed inputs: a few hundred mutated caption lists, tokenizer files, YAML configs and checkpoint folders.

Mutations are seeded (the same files every run): truncations, byte flips, inserted and deleted
bytes, random bytes, values of the wrong type, and for checkpoints FIFOs and symlinks out of the
folder. Every input goes through the loader the project uses for it. Each one either loads or fails
with one of the project's own error types (`util.errors.MaeError`) whose message names the file;
nothing blocks (a FIFO is never opened; the alarm is a safety net) and no file outside the test's
folder changes.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import make_backend, make_model  # noqa: E402

from datasets.captions import read_caption_list, write_caption_list  # noqa: E402
from datasets.text_tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from main_pretrain import get_args_parser  # noqa: E402
from util.checkpoint import find_resumable, read_trainer_state, save_checkpoint  # noqa: E402
from util.config import parse_args  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.errors import MaeError  # noqa: E402
from util.safe_load import verify_checkpoint_dir  # noqa: E402
from util.weights import read_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
HOSTILE_VALUES = ["null", "[1, 2]", "{a: 1}", ".nan", "-.inf", "''", "x" * 300, "!!binary aGVsbG8=", "&a 1", "*a",
                  "1e400", "-1", "0", "true", "[[[[[]]]]]", "'\\x00'"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded damage: truncate, flip bytes, insert or delete bytes, or random bytes."""
    kind = rng.randrange(5)
    if kind == 0 or not data:
        return data[: rng.randrange(len(data) + 1)]
    if kind == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
        return bytes(out)
    at = rng.randrange(len(data))
    if kind == 2:
        return data[:at] + rng.randbytes(rng.randint(1, 64)) + data[at:]
    if kind == 3:
        return data[:at] + data[at + rng.randint(1, 64):]
    return rng.randbytes(rng.randint(0, 2 * len(data)))


def expect_clean(load: Callable[[object], object], path: object, names: object = None) -> str:
    """Run `load(path)`: it succeeds, or fails with a MaeError naming `names` (default: `path`); 'ok' or the type."""
    names = str(path if names is None else names)
    try:
        load(path)
    except MaeError as exc:
        assert names in str(exc), f"{type(exc).__name__} without {names}: {exc}"
        return type(exc).__name__
    return "ok"


@pytest.fixture()
def guarded(tmp_path: Path, monkeypatch):
    """A deadline (a blocked call is interrupted), temp files inside tmp_path, and no change outside it."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret.pt").write_bytes(b"outside the checkpoint")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def snapshot() -> dict:
        tree = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in ROOT.rglob("*")
                if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}
        return tree | {p: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in outside.iterdir()}

    def hung(signum, frame):
        raise TimeoutError("a loader blocked for 120 s")

    before = snapshot()
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield outside
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    assert snapshot() == before, "a file outside the test's folder changed"
    shutil.rmtree(outside)


def test_fuzzed_caption_lists_and_tokenizers(tmp_path: Path, guarded: Path) -> None:
    rng = random.Random(0)
    base = tmp_path / "base.csv"
    write_caption_list(str(base), [(f"videos/{i}.mp4", f"a caption, number {i}, with \"quotes\"") for i in range(12)])
    outcomes: list[str] = []
    for i in range(150):
        f = tmp_path / f"cap{i}.csv"
        f.write_bytes(mutate(base.read_bytes(), rng))
        outcomes.append(expect_clean(read_caption_list, str(f)))
    tok = train_tokenizer([f"a red square moves {w} quickly" for w in ("left", "right", "up", "down")] * 5, "bpe", 60)
    good = tok.save(tmp_path / "tokenizer.json").read_bytes()
    for i in range(100):
        f = tmp_path / f"tok{i}.json"
        f.write_bytes(mutate(good, rng) if i % 4 else rng.choice([b"[]", b"{}", b"3", b'"s"', b"null", b"\xff" * 9]))
        outcomes.append(expect_clean(load_tokenizer, f))
    assert outcomes.count("ok") < len(outcomes) // 2 and "DataFileError" in outcomes  # the mutations really broke files


def test_fuzzed_yaml_configs(tmp_path: Path, guarded: Path) -> None:
    rng = random.Random(1)
    sources = [ROOT / "configs" / "pretrain" / name for name in ("demo.yaml", "vit_b_k400.yaml", "vit_b_k400_amt.yaml")]
    outcomes: list[str] = []
    for i in range(120):
        text = rng.choice(sources).read_bytes()
        if i % 2:
            data = mutate(text, rng)
        else:  # a value of the wrong type (or an alias, a tag, a huge number) under a real key
            lines = text.decode().splitlines()
            keyed = [n for n, line in enumerate(lines) if ": " in line and not line.startswith("#")]
            n = rng.choice(keyed)
            lines[n] = lines[n].split(": ")[0] + ": " + rng.choice(HOSTILE_VALUES)
            data = "\n".join(lines).encode()
        f = tmp_path / f"cfg{i}.yaml"
        f.write_bytes(data)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(get_args_parser(["--config", str(f)]), ["--config", str(f), "--output_dir", str(tmp_path / "out")])
            outcomes.append("ok")
        except SystemExit:  # parse_args turns only a ConfigError into this usage error
            message = err.getvalue().splitlines()[-1]
            assert str(f) in message and len(message) < 1000, message
            outcomes.append("error")
    assert 10 < outcomes.count("error") < len(outcomes)


def _checkpoint_mutants(ckpt: Path, outside: Path, rng: random.Random, count: int):
    """(description, mutate-in-place function) pairs for copies of one checkpoint folder."""
    files = [ckpt / "trainer_state.pt", ckpt / "state" / "model.pt"]
    wrong = [[], {}, "text", 3, {"backend": "ddp"}, {"model": {1: torch.zeros(1)}}, {"model": [torch.zeros(1)]}]
    for i in range(count):
        rel = rng.choice(files).relative_to(ckpt)
        kind = i % 10
        if kind < 7:
            seed = rng.random()
            yield f"bytes of {rel}", lambda d, rel=rel, seed=seed: (d / rel).write_bytes(
                mutate((d / rel).read_bytes(), random.Random(seed)))
        elif kind == 7:
            value = rng.choice(wrong)
            yield f"{rel} holding {type(value).__name__}", lambda d, rel=rel, value=value: torch.save(value, d / rel)
        elif kind == 8:
            yield f"{rel} a FIFO", lambda d, rel=rel: ((d / rel).unlink(), os.mkfifo(d / rel))
        else:
            yield f"{rel} a symlink out", lambda d, rel=rel: ((d / rel).unlink(),
                                                             (d / rel).symlink_to(outside / "secret.pt"))


def test_fuzzed_checkpoint_folders(tmp_path: Path, guarded: Path) -> None:
    rng = random.Random(2)
    save_checkpoint(make_backend(make_model(), ALONE), tmp_path / "base", "step-1", {"global_step": 1, "epoch": 0})
    base = tmp_path / "base" / "checkpoints" / "step-1"
    outcomes: list[str] = []
    for i, (what, damage) in enumerate(_checkpoint_mutants(base, guarded, rng, 100)):
        out = tmp_path / f"run{i}"
        ckpt = out / "checkpoints" / "step-1"
        shutil.copytree(base, ckpt)
        (out / "checkpoints" / "latest").symlink_to("step-1")
        damage(ckpt)
        for load, given in ((verify_checkpoint_dir, ckpt), (read_trainer_state, ckpt), (read_weights, ckpt),
                            (read_weights, out), (find_resumable, out)):
            outcomes.append(expect_clean(load, given))  # the error names the path given, or one inside it
        if outcomes[-1] == "ok" and outcomes[-5] != "ok":  # resume never takes a folder the check refuses
            assert find_resumable(out) is None, what
    assert outcomes.count("ok") < len(outcomes) // 2 and "UnsafeCheckpointError" in outcomes
