"""`dimscope pairs register LOW HIGH --out DIR` and `dimscope pairs apply TRANSFORM_DIR
OTHER_LOW --out DIR2`: registered LOW/HIGH pairs for cross-modality training
(`dimscope.engines.pairs`).

Exit codes: 0 when at least one pair registered (rejected ones are in the report with their
reasons); 2 when none did (the report is still written, no images) and for bad input (a clear
message naming the file; nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BAD_INPUT = 0, 2
EXIT_NONE_REGISTERED = 2


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _print_pair(entry: dict[str, Any]) -> None:
    res = entry.get("residual_shift_px") or {}
    if entry["status"] == "registered":
        print(f"{entry['name']}: registered  NCC {_fmt(entry['ncc_before'])} -> "
              f"{_fmt(entry['ncc_after'])}  residual shift median {_fmt(res.get('median'))} px,"
              f" p95 {_fmt(res.get('p95'))} px", flush=True)
    else:
        print(f"{entry['name']}: REJECTED  {entry['reason']}", flush=True)


def _bad_input(exc: Exception, out: Any) -> int:
    """Exit 2 with one line: the input's problem, or what could not be written."""
    message = str(exc) if not isinstance(exc, OSError) else f"could not write {out}: {exc}"
    print(f"dimscope: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_pairs_register(args: argparse.Namespace) -> int:
    from dimscope.engines.pairs import PairsError, RegistrationOptions, register_pairs

    try:
        opts = RegistrationOptions(min_ncc=args.min_ncc, max_residual_p95=args.max_residual,
                                   min_coverage=args.min_overlap)
        report = register_pairs(args.low, args.high, args.out,
                                tuple(args.pixel_size) if args.pixel_size else None,
                                opts, on_pair=_print_pair)
    except (PairsError, OSError) as exc:
        return _bad_input(exc, args.out)
    n, ok = len(report["pairs"]), report["registered"]
    unpaired = report["unpaired"]
    if unpaired["low_only"] or unpaired["high_only"]:
        print(f"unpaired: {len(unpaired['low_only'])} LOW-only, "
              f"{len(unpaired['high_only'])} HIGH-only name(s) (listed in the report)")
    print(f"{ok} of {n} pair(s) registered; report: {args.out / 'report.json'}")
    if ok == 0:
        print("dimscope: no pair registered (reasons in the report)", file=sys.stderr)
        return EXIT_NONE_REGISTERED
    return EXIT_OK


def cmd_pairs_apply(args: argparse.Namespace) -> int:
    from dimscope.engines.pairs import PairsError, apply_transforms

    try:
        report = apply_transforms(args.transform_dir, args.other_low, args.out,
                                  on_image=lambda name, path: print(f"{name}: {path}",
                                                                    flush=True))
    except (PairsError, OSError) as exc:
        return _bad_input(exc, args.out)
    print(f"{len(report['applied'])} image(s) resampled into {args.out / 'low'}")
    return EXIT_OK


def add_pairs_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pairs", help="register LOW/HIGH image pairs of the same fields "
                                     "(cross-modality training data)")
    ps = p.add_subparsers(dest="pairs_command", required=True)
    r = ps.add_parser(
        "register", help="register LOW onto HIGH: scale, coarse NCC, affine by mutual "
                         "information, block-wise elastic refinement",
        description="Two files form one pair, whatever their names; between two folders, "
                    "files are paired by name. Writes DIR/low, high, mask, transform, montage "
                    "and report.json. Exit 0 when at least one pair registers, 2 when none "
                    "does or the input is bad.")
    r.add_argument("low", type=Path, help="LOW image (TIFF) or folder of them")
    r.add_argument("high", type=Path, help="HIGH image (TIFF) or folder of them")
    r.add_argument("--out", type=Path, required=True, help="new (or empty) output folder")
    r.add_argument("--pixel-size", nargs=2, type=float, metavar=("LOW_UM", "HIGH_UM"),
                   default=None, help="pixel sizes in µm (default: from the OME metadata)")
    r.add_argument("--min-ncc", type=float, default=0.5,
                   help="reject a pair whose NCC after registration is below this (0.5)")
    r.add_argument("--min-overlap", type=float, default=0.8,
                   help="reject a pair where LOW covers less than this fraction of HIGH's "
                        "field after registration (0.8)")
    r.add_argument("--max-residual", type=float, default=1.0,
                   help="reject a pair whose residual shift p95 exceeds this many px (1.0)")
    r.set_defaults(func=cmd_pairs_register)
    a = ps.add_parser("apply", help="apply saved transforms to another channel of LOW")
    a.add_argument("transform_dir", type=Path,
                   help="a `pairs register` output folder (or its transform/ folder)")
    a.add_argument("other_low", type=Path,
                   help="another channel of LOW: a file, or a folder matched by name")
    a.add_argument("--out", type=Path, required=True, help="new (or empty) output folder")
    a.set_defaults(func=cmd_pairs_apply)
