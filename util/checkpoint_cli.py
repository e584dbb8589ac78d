"""Offline checkpoint tools (no process group), run as `python -m util.checkpoint`:

    python -m util.checkpoint export OUT/checkpoints/latest weights.pth [--overwrite]
    python -m util.checkpoint info OUT/checkpoints/latest

`export` writes one consolidated `{"model": state_dict}` file any rank count can load
(`util/weights.py:export_weights`); `info` prints what a checkpoint holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from util.checkpoint import STATE_DIR, TRAINER_STATE, read_trainer_state
from util.errors import CheckpointError, MaeError
from util.safe_load import detect_format
from util.weights import export_weights


def describe(ckpt: str | Path) -> str:
    """One-paragraph summary of a checkpoint directory."""
    path = Path(os.path.realpath(ckpt))
    if not os.path.lexists(path / TRAINER_STATE):
        raise CheckpointError(f"{ckpt} is not a checkpoint folder (no {TRAINER_STATE} in it); give "
                              "OUT/checkpoints/step-N or OUT/checkpoints/latest")
    s = read_trainer_state(path)
    keys = ("name", "global_step", "epoch", "step_in_epoch", "backend", "world_size")
    lines = [f"checkpoint: {path}"] + [f"  {k}: {s.get(k)}" for k in keys]
    lines.append(f"  format: {detect_format(path / STATE_DIR)}")
    lines.append(f"  other keys: {sorted(k for k in s if k not in keys and k != 'rng')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: `export CKPT OUT.pth` or `info CKPT`; a refusal is one `error:` line and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m util.checkpoint",
                                     description="Crash-safe checkpoints: OUT/checkpoints/<name>/ plus an atomically "
                                                 "replaced `latest` symlink.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write one consolidated weights file {'model': state_dict}")
    exp.add_argument("checkpoint")
    exp.add_argument("output")
    exp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    info = sub.add_parser("info", help="print what a checkpoint holds")
    info.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "export":
            sd = export_weights(args.checkpoint, args.output, overwrite=args.overwrite)
            print(f"wrote {args.output}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")
        else:
            print(describe(args.checkpoint))
    except MaeError as exc:  # a refusal is a message, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
