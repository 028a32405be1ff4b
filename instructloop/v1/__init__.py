"""Generated protobuf and gRPC stubs for the instructloop.v1 wire API (see proto/).

The *_pb2 modules here are build outputs, not committed. In a source checkout they are
regenerated on import when missing or older than the .proto sources.
"""

from pathlib import Path as _Path

_PROTO_ROOT = _Path(__file__).resolve().parents[2] / "proto"
if _PROTO_ROOT.is_dir():
    from instructloop._protogen import generate as _generate
    from instructloop._protogen import stale as _stale

    if _stale(_PROTO_ROOT, _PROTO_ROOT.parent):
        _generate(_PROTO_ROOT, _PROTO_ROOT.parent)
