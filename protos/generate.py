"""Regenerate the Python code for every .proto in this folder.

    python protos/generate.py          # writes protos/*_pb2.py, *_pb2_grpc.py
    python protos/generate.py --check  # exit 1 if the committed code is stale

The .proto files are compiled as if they lived at fedmoe/protos/, so generated modules
import each other as `fedmoe.protos.x_pb2`, never as a top-level `x_pb2`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(HERE.glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-Ifedmoe/protos={HERE}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}"]
        args += [f"fedmoe/protos/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for f in sorted((Path(tmp) / "fedmoe" / "protos").iterdir()):
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if generated files differ from the committed ones")
    args = ap.parse_args()
    if not args.check:
        for p in generate(HERE):
            print(p.relative_to(HERE.parent))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p.name for p in generate(Path(tmp)) if not (HERE / p.name).exists() or (HERE / p.name).read_bytes() != p.read_bytes()]
    if stale:
        print("stale generated protobuf code: " + ", ".join(stale) + " (run: python protos/generate.py)")
        return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
