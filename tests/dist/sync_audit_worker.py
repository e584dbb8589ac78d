"""Run main_pretrain.py under the host-sync audit; write every event with its stack to OUT/sync_events.json.

usage: python tests/dist/sync_audit_worker.py OUT_DIR [main_pretrain flags]
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from host_sync import HostSyncAudit  # noqa: E402

import main_pretrain  # noqa: E402
from util.config import parse_args  # noqa: E402


def main() -> None:
    out, flags = Path(sys.argv[1]), sys.argv[2:]
    args = parse_args(main_pretrain.get_args_parser(), [*flags, "--output_dir", str(out), "--no-auto_resume"],
                      default_config=main_pretrain.DEMO_CONFIG)
    with HostSyncAudit() as audit:
        main_pretrain.main(args)
    (out / "sync_events.json").write_text(json.dumps([asdict(e) for e in audit.events]))


if __name__ == "__main__":
    main()
