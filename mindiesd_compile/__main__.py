"""Command line: ``python -m mindiesd_compile export FACTORY OUT_DIR [--target cpu|cuda]``.

FACTORY is ``module:function``; the function returns ``(model, args, kwargs)`` — the model to export and
the example inputs it is traced with (e.g. a diffusers transformer built from its config).
"""
from __future__ import annotations

import argparse
import importlib
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mindiesd_compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="export the optimized graph as an AOTInductor package + manifest")
    exp.add_argument("factory", help="module:function returning (model, args, kwargs)")
    exp.add_argument("out_dir")
    exp.add_argument("--target", choices=["cpu", "cuda", "npu"], default=None)
    args = ap.parse_args(argv)
    module_name, _, function = args.factory.partition(":")
    if not function:
        ap.error(f"factory {args.factory!r} must be module:function")
    sys.path.insert(0, ".")
    model, model_args, model_kwargs = getattr(importlib.import_module(module_name), function)()
    from .lowering.export import export
    package = export(model.eval(), model_args, model_kwargs, args.out_dir, target=args.target)
    print(f"wrote {package} and {package.parent / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
