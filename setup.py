"""Build hook: compile protos/*.proto into protos/*_pb2*.py so generated code is never hand-edited.

Runs for regular and editable installs (`pip install -e .`); compiled from the repo root with `-I .`
so the stubs import each other as `from protos import ..._pb2`.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def compile_protos() -> None:
    from grpc_tools import protoc

    for proto in sorted((ROOT / "protos").glob("*.proto")):
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}", str(proto.relative_to(ROOT))]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


if __name__ == "__main__":   # setuptools runs this file as __main__; `make protos` imports it
    setup(cmdclass={"build_py": BuildPyWithProtos})
