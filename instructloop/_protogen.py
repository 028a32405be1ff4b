"""Generate Python stubs (messages, gRPC services and .pyi type stubs) from proto/.

Used by the build (setup.py) and, in a source checkout whose stubs are missing or older
than their .proto files, on first import of instructloop.v1. Needs grpcio-tools.
"""

from __future__ import annotations

from pathlib import Path


def stale(proto_root: Path, out_root: Path) -> bool:
    """True when some .proto under proto_root is newer than its generated module."""
    for proto in proto_root.rglob("*.proto"):
        generated = out_root / proto.relative_to(proto_root).with_name(proto.stem + "_pb2.py")
        if not generated.exists() or generated.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def generate(proto_root: Path, out_root: Path) -> None:
    """Run protoc over every .proto under proto_root, writing next to out_root's packages."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos} (see its message above)")
