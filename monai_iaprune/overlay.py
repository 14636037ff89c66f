"""Locate (or copy) the generic prune overlay for MONAI model-zoo bundles.

``python -m monai_iaprune.overlay`` prints the overlay's path, so from a bundle's root::

    python -m monai.bundle run prune \\
        --config_file "['configs/train.json','$(python -m monai_iaprune.overlay)']" --method lrp --ratio 0.5

``python -m monai_iaprune.overlay --copy configs/`` copies it into the bundle as ``configs/prune_overlay.json``
(refusing to replace an existing file unless ``--overwrite``) and prints the new path.

A bundle can also bring the overlay in from its own ``configs/prune.json`` (this project's bundles do): the first
``initialize`` expression ``$monai_iaprune.overlay.include_overlay()`` adds every overlay key the bundle does not
set, so ``--config_file "['configs/train.json','configs/prune.json']"`` runs the overlay's ``prune`` with the
bundle's settings and command-line overrides on top.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

OVERLAY_NAME = "prune_overlay.json"

__all__ = ["OVERLAY_NAME", "copy_overlay", "include_overlay", "main", "overlay_path"]


def overlay_path() -> Path:
    """Path of ``prune_overlay.json`` shipped inside the installed ``monai_iaprune`` package."""
    path = Path(str(resources.files("monai_iaprune") / "configs" / OVERLAY_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"the prune overlay is missing from the installed package ({path}); reinstall monai-iaprune"
        )
    return path


def include_overlay() -> None:
    """Add the overlay's keys that the running bundle config lacks, then re-parse it (a config expression).

    Keys the bundle's files or the command line set win; nothing has been instantiated yet when this runs as the
    first ``initialize`` expression, so the re-parse loses nothing.

    Raises:
        RuntimeError: called outside a running MONAI ``ConfigParser``.
    """
    from monai_iaprune.host_bundle import active_parser

    parser = active_parser()
    if parser is None:
        raise RuntimeError(
            "include_overlay() is a bundle config expression: put it first in the 'initialize' list"
        )
    for key, value in json.loads(overlay_path().read_text()).items():
        if key not in parser:
            parser[key] = value
    parser.parse(reset=True)


def copy_overlay(dest: str | Path, overwrite: bool = False) -> Path:
    """Copy the overlay to ``dest`` (a folder, or a ``.json`` file path) and return the written file.

    Args:
        dest: a folder (the file keeps its name ``prune_overlay.json``) or a target ``.json`` path.
        overwrite: replace an existing file; otherwise ``FileExistsError``.
    """
    dest = Path(dest)
    target = dest if dest.suffix == ".json" else dest / OVERLAY_NAME
    if target.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {target}; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(overlay_path(), target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the overlay path, or copy it with ``--copy DEST``."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_iaprune.overlay",
        description="Print the path of the generic prune overlay for MONAI model-zoo bundles, or copy it.",
    )
    parser.add_argument(
        "--copy", metavar="DEST", help="copy the overlay into this folder (or to this .json path)"
    )
    parser.add_argument("--overwrite", action="store_true", help="with --copy: replace an existing file")
    args = parser.parse_args(argv)
    try:
        path = copy_overlay(args.copy, args.overwrite) if args.copy else overlay_path()
    except (FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
