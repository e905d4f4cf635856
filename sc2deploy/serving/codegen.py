"""Regenerate the checked-in Python code for completion.proto: `python -m sc2deploy.serving.codegen`.

protoc writes absolute imports that follow the proto path (`from sc2deploy.v1 import completion_pb2`);
the generated modules live in sc2deploy/serving/v1/, so that one import is rewritten to a relative one.
tests/serving/test_codegen.py regenerates into a temporary folder and checks the files are identical.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent / "protos"
PROTO = "sc2deploy/v1/completion.proto"
OUT = Path(__file__).resolve().parent / "v1"
FILES = ("completion_pb2.py", "completion_pb2.pyi", "completion_pb2_grpc.py")
_ABSOLUTE = "from sc2deploy.v1 import completion_pb2 as"
_RELATIVE = "from . import completion_pb2 as"


def generate(out: Path = OUT) -> list[Path]:
    """Run grpc_tools.protoc on the proto and write FILES into `out`."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("grpcio-tools is not installed: pip install grpcio-tools (it is in the `test` extra)")
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", PROTO]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO}")
        for name in FILES:
            text = (Path(tmp) / "sc2deploy" / "v1" / name).read_text()
            target = out / name
            target.write_text(text.replace(_ABSOLUTE, _RELATIVE))
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(path)
