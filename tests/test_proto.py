"""The committed protobuf/gRPC code is exactly what proto/tap/v1/*.proto generates."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tap_core" / "proto" / "tap" / "v1"


def pinned_grpcio_tools() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"grpcio-tools==([^"]+)"', text)
    assert match, "pyproject.toml's test extra must pin grpcio-tools (regeneration must be reproducible)"
    return match.group(1)


def test_generated_code_matches_the_proto(tmp_path):
    try:
        installed = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        pytest.skip("grpcio-tools is not installed (pip install -e '.[test]')")
    pinned = pinned_grpcio_tools()
    if installed != pinned:
        pytest.skip(
            f"grpcio-tools {installed} is installed, but the committed code was generated with {pinned} "
            f"(the version pinned in pyproject's test extra)"
        )
    result = subprocess.run(
        [sys.executable, "-m", "tap_core.proto.generate", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    generated = tmp_path / "tap" / "v1"
    names = sorted(p.name for p in generated.glob("*_pb2*.py*"))
    committed = sorted(p.name for p in COMMITTED.glob("*_pb2*.py*"))
    assert names == committed == ["federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py"]
    for name in names:
        assert (generated / name).read_bytes() == (COMMITTED / name).read_bytes(), (
            f"tap_core/proto/tap/v1/{name} differs from what proto/tap/v1/*.proto generates: "
            "run `python -m tap_core.proto.generate` and commit the result"
        )


def test_every_proto_has_generated_code():
    protos = sorted(p.stem for p in (ROOT / "proto" / "tap" / "v1").glob("*.proto"))
    assert protos and all((COMMITTED / f"{stem}_pb2.py").is_file() for stem in protos)
