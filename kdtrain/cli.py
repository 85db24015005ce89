"""``kdtrain`` command line: one sub-command per stage, each writing to an artifacts folder."""

from __future__ import annotations

import argparse
import sys

from kdtrain.errors import KDError


def _pipeline(args: argparse.Namespace) -> int:
    from kdtrain.pipeline import run_pipeline

    folder = run_pipeline(args.out, args.stages.split(",") if args.stages else None, args.contracts)
    print(f"artifacts written to {folder.root} ({len(folder.manifest.artifacts)} artifacts in manifest.json)")
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    from kdtrain.tokenizers.fingerprint import tokenizer_fingerprint

    for path in args.paths:
        print(f"{tokenizer_fingerprint(path)}  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kdtrain.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="kdtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline = sub.add_parser("pipeline", help="build the reference artifacts folder end to end")
    pipeline.add_argument("--out", required=True, help="artifacts folder to write")
    pipeline.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    pipeline.add_argument("--contracts", default="contracts", help="contract folder the stages read (shapes, islands, lint rules)")
    pipeline.set_defaults(func=_pipeline)
    for stage in ("export", "convert", "quantize"):
        one = sub.add_parser(stage, help=f"run the {stage} stage alone (same as pipeline --stages {stage})")
        one.add_argument("--out", required=True, help="artifacts folder to update")
        one.add_argument("--contracts", default="contracts")
        one.set_defaults(func=_pipeline, stages=stage)
    fingerprint = sub.add_parser("fingerprint", help="print the meaning fingerprint of tokenizer folders or tokenizer.json files")
    fingerprint.add_argument("paths", nargs="+")
    fingerprint.set_defaults(func=_fingerprint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KDError as exc:
        print(f"kdtrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
