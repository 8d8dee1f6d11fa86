"""Regenerate the committed control-plane stubs from ``pdserve_control.proto``.

    PYTHONPATH=<dir with grpcio-tools==1.62.3> python -m pdserve.engine.control_codegen

The stubs are generated ahead of time (not at import) because grpcio-tools'
bundled protobuf runtime and NIXL's libraries abort when loaded into one
process. grpcio-tools 1.62 emits protobuf 4.25 gencode, which every protobuf
runtime from 4.25 up (checked with 7.36) still imports. ``tests/engine`` checks
that the committed stubs describe the same service as the .proto.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "pdserve_control.proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on a copy laid out as ``pdserve/engine/`` so imports are absolute."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pdserve" / "engine"
        src.mkdir(parents=True)
        shutil.copy(HERE / PROTO, src / PROTO)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}",
                        f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                        f"pdserve/engine/{PROTO}"], check=True)
        made = []
        for name in ("pdserve_control_pb2.py", "pdserve_control_pb2_grpc.py"):
            shutil.copy(src / name, out_dir / name)
            made.append(out_dir / name)
        return made


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}")
