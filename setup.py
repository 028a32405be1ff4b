"""Build hook: generate the protobuf and gRPC stubs from proto/ before packaging.

The stubs (with .pyi type stubs) are build outputs and are not committed. They are
written next to instructloop/v1/__init__.py so that editable and regular installs
both find them as instructloop.v1.*_pb2.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProto(build_py):
    def run(self) -> None:
        import sys

        sys.path.insert(0, str(ROOT / "instructloop"))
        from _protogen import generate  # noqa: PLC0415  (build-time only)

        generate(ROOT / "proto", ROOT)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
