"""Generate the Python protobuf/gRPC code from proto/tap/v1/*.proto.

    python -m tap_core.proto.generate            # rewrite tap_core/proto/tap/v1/
    python -m tap_core.proto.generate --out DIR  # write elsewhere (tests compare)

grpcio-tools writes ``from tap.v1 import ...``; the import is rewritten to the
package path so the generated code works as ``tap_core.proto.tap.v1``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = Path(__file__).resolve().parent


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "tap" / "v1").glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", *protos])
    if code != 0:
        raise RuntimeError(f"protoc failed with status {code}")
    written = sorted((out / "tap" / "v1").glob("*_pb2*.py*"))
    for path in written:
        text = re.sub(r"^from tap\.v1 import", "from tap_core.proto.tap.v1 import", path.read_text(), flags=re.M)
        path.write_text(text)
    for package in (out / "tap", out / "tap" / "v1"):
        (package / "__init__.py").touch()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
