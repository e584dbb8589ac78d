"""Fork-safety check for the re-encoder: the parent uses PyAV (encode + threaded decode), then a 2-worker pool.

usage: python tests/dist/fork_resize.py DIR [MP_CONTEXT]
Prints the summary of `resize_dataset`. With `fork` this deadlocks on PyAV 19 / Python >= 3.12 (FFmpeg
thread pools live in the parent at fork time); the default start method must not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
from test_data_helpers import write_counter_video  # noqa: E402

from datasets.decode import decode_frames  # noqa: E402
from datasets.resize import resize_dataset  # noqa: E402


def main(folder: str, mp_context: str | None) -> None:
    src = Path(folder) / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(4):  # the parent encodes (x264's encoder threads) ...
        write_counter_video(str(src / f"{i}.mp4"), 30, 30, width=96, height=64)
    decode_frames(str(src / "0.mp4"), [0.1, 0.5], threads=4)  # ... decodes with frame threads ...
    with av.open(str(src / "1.mp4")) as c:  # ... and converts to RGB with FFmpeg's automatic threading
        c.streams.video[0].thread_type = "AUTO"
        for frame in c.decode(video=0):
            frame.to_ndarray(format="rgb24")
    kwargs = {} if mp_context is None else {"mp_context": mp_context}
    summary = resize_dataset(str(src), str(Path(folder) / "dst"), short_side=32, workers=2, **kwargs)
    print(f"done={summary['done']} failed={len(summary['failed'])}", flush=True)


if __name__ == "__main__":  # the guard forkserver and spawn workers need
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
