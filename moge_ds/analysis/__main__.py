"""``python -m moge_ds.analysis EXPORT --out DIR``: the expert report (``moge_ds.analysis.report``).

``python -m moge_ds.analysis EXPORT --invariance [--out DIR] [--images N]``: accuracy and routing
under shifts and rotations of the test images, expert diversity and specialisation of a ViT export
(``moge_ds.analysis.invariance``), written to ``DIR/invariance.json`` (DIR defaults to EXPORT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moge_ds.analysis.invariance import InvarianceError, invariance_of_export
from moge_ds.analysis.report import main as report_main
from moge_ds.checkpoint import CheckpointError
from moge_ds.data.documents import DataError
from moge_ds.distributed import single_process_group


def invariance_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m moge_ds.analysis EXPORT --invariance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="a ViT export directory (python -m moge_ds.export)")
    parser.add_argument("--invariance", action="store_true", required=True)
    parser.add_argument("--out", type=Path, help="directory for invariance.json (default: the export)")
    parser.add_argument("--images", type=int, help="the first N test images (default: the whole test split)")
    parser.add_argument("--seed", type=int, default=0, help="token sample for diversity; capacity-drop draws")
    args = parser.parse_args(argv)
    out = args.out or args.export
    if (out / "invariance.json").exists():  # an earlier measurement: never replaced without a word
        parser.exit(2, f"error: {out / 'invariance.json'} already holds a measurement: give another --out or "
                       f"remove it (nothing is overwritten)\n")
    try:
        with single_process_group():
            result = invariance_of_export(args.export, args.images, args.seed)
    except (CheckpointError, DataError, InvarianceError) as err:
        parser.exit(2, f"error: {err}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "invariance.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'invariance.json'}: clean accuracy {result['clean_accuracy']:.4f}, rotated "
          f"{result['rotated_accuracy']:.4f}, shifted {result['shifted_accuracy']:.4f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--invariance" in argv:
        invariance_main(argv)
        return
    if "-h" in argv or "--help" in argv:
        print(__doc__)  # the report's own help below does not know the --invariance mode
    report_main(argv)


if __name__ == "__main__":
    main()
