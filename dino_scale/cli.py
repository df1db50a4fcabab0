"""``dino-scale``: one command for the whole workflow.

    dino-scale synth OUT --flavour coco-like -n 64      # synthetic dataset
    dino-scale prepare-data ...                         # annotation JSON + images -> shards
    dino-scale check-data data/o365/train               # every record against its checksums
    dino-scale pretrain [--data O365] ...               # = python -m pipelines.pretrain_o365
    dino-scale finetune [--init URI] ...                # = python -m pipelines.finetune_coco
    dino-scale evaluate --model URI --data COCO_VAL     # = python -m pipelines.evaluate
    dino-scale predict img.jpg dir/ --model URI --out preds/
    dino-scale registry list | show NAME | promote NAME VERSION [--alias champion]

Every command but ``synth`` forwards its arguments to the module of the same role in
``pipelines/`` (``dino-scale pretrain --help`` shows them all).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# subcommand -> (module, one-line help); their arguments are forwarded untouched.
FORWARDED = {
    "prepare-data": ("pipelines.prepare_data", "convert an annotation JSON + images into Parquet shards"),
    "check-data": ("pipelines.check_data", "read converted datasets in full: records changed since conversion"),
    "pretrain": ("pipelines.pretrain_o365", "Objects365 pretraining -> dino-<preset>-o365@pretrained"),
    "finetune": ("pipelines.finetune_coco", "COCO fine-tuning from a registered model -> dino-<preset>-coco"),
    "evaluate": ("pipelines.evaluate", "COCO AP table of a registry URI, run URI, checkpoint or official .pth"),
    "predict": ("pipelines.predict", "detect objects in images: annotated image files + predictions.json"),
    "registry": ("pipelines.registry", "registered models: list | show NAME | promote NAME VERSION"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="dino-scale",
        description="Train, evaluate and serve the DINO detector at cluster scale "
                    "(Ray Train + DeepSpeed + MLflow registry).",
        epilog="Run 'dino-scale <command> --help' for the options of a command. Errors print one "
               "line; add --debug for the traceback.")
    sub = p.add_subparsers(dest="command", metavar="<command>")
    for name, (_, text) in FORWARDED.items():
        sub.add_parser(name, help=text, add_help=False)

    s = sub.add_parser("synth", allow_abbrev=False, help="generate a synthetic dataset (o365-like or coco-like)",
                       description="Generate a synthetic detection dataset (shards + manifest.json) "
                                   "with the category names of Objects365 or COCO.")
    s.add_argument("out", help="output dataset folder")
    s.add_argument("--flavour", default="coco-like", choices=["coco-like", "o365-like"],
                   help="coco-like: 10 categories with sparse COCO ids (num_classes=91); o365-like: 36 with ids "
                        "1..36 (num_classes=366) (default coco-like)")
    s.add_argument("-n", "--num-images", type=int, default=64, help="images to generate (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed, the same set (default 0)")
    s.add_argument("--debug", action="store_true")

    return p


def _forward(command: str, argv: list[str]) -> int:
    """Run the pipeline module's ``main(argv)``; its usage lines read ``dino-scale <command>``."""
    import importlib

    from pipelines._errors import run_main

    module_name, _ = FORWARDED[command]
    module = importlib.import_module(module_name)
    saved = sys.argv[0]
    sys.argv[0] = f"dino-scale {command}"  # argparse's default prog
    try:
        if hasattr(module, "build_parser"):
            original = module.build_parser

            def parser_with_prog():
                parser = original()
                before, parser.prog = parser.prog, f"dino-scale {command}"
                for action in parser._actions:  # sub-commands took the old name when they were made
                    if isinstance(action, argparse._SubParsersAction):
                        for sub in action.choices.values():
                            sub.prog = sub.prog.replace(before, parser.prog, 1)
                return parser

            module.build_parser = parser_with_prog
            try:
                return run_main(module.main, argv)
            finally:
                module.build_parser = original
        return run_main(module.main, argv)
    finally:
        sys.argv[0] = saved


def _synth(args) -> int:
    from dino_scale.data import synthetic

    from dino_scale.data import convert_coco

    from pipelines._common import UsageError
    from pipelines._flags import check_folder_path

    if args.num_images < 1:
        raise UsageError("-n/--num-images must be >= 1")
    out = Path(args.out).expanduser()  # '~' after '=' or in quotes reaches here unexpanded
    # before generating: images were written into a dataset folder the conversion then refused
    check_folder_path(args.out)
    if (out / "manifest.json").exists() and not (out / "raw" / "annotations.json").exists():
        raise UsageError(f"{args.out} holds a dataset that synth did not make; give a new folder")
    print(f"generating {args.num_images} {args.flavour} images -> {out / 'raw'}", flush=True)
    root, ann = synthetic.generate(out / "raw", flavour=args.flavour, num_images=args.num_images,
                                   seed=args.seed)
    print(f"converting to shards (images embedded) -> {out}", flush=True)
    manifest = convert_coco(ann, root, out, embed_images=True, progress=False)
    print(f"done: {out} ({manifest['num_images']} images, {manifest['num_boxes']} boxes, "
          f"{len(manifest['categories'])} categories)")
    return 0


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    if argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    args = parser.parse_args(argv)
    if args.command == "synth":
        return _synth(args)
    parser.print_help()
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pipelines._errors import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--debug":  # `dino-scale --debug CMD ...` = `dino-scale CMD --debug ...`
        argv = [argv[1], "--debug", *argv[2:]] if len(argv) > 1 else []  # alone: the help, as with no command
    if argv and argv[0] in FORWARDED:
        return _dispatch(argv)  # the pipeline's own handler reports errors
    return run_main(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
