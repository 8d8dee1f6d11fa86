"""The committed control-plane stubs describe exactly the service in the .proto."""

import subprocess
import sys
import textwrap

import pytest


def test_committed_stubs_match_the_proto():
    pytest.importorskip("grpc_tools")
    committed = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from google.protobuf import descriptor_pb2
        from pdserve.engine import pdserve_control_pb2 as pb
        fd = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(fd)
        print(fd.SerializeToString(deterministic=True).hex())
    """)], capture_output=True, text=True, check=True).stdout
    fresh = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import shutil, sys, tempfile
        from pathlib import Path
        import grpc
        from google.protobuf import descriptor_pb2
        import pdserve.engine
        tmp = Path(tempfile.mkdtemp())
        (tmp / "pdserve" / "engine").mkdir(parents=True)
        src = Path(pdserve.engine.__file__).parent / "pdserve_control.proto"
        shutil.copy(src, tmp / "pdserve" / "engine" / "pdserve_control.proto")
        sys.path.insert(0, str(tmp))
        for m in [m for m in sys.modules if m.startswith("pdserve")]:
            del sys.modules[m]
        protos = grpc.protos("pdserve/engine/pdserve_control.proto")
        fd = descriptor_pb2.FileDescriptorProto()
        protos.DESCRIPTOR.CopyToProto(fd)
        print(fd.SerializeToString(deterministic=True).hex())
    """)], capture_output=True, text=True, check=True).stdout
    assert committed == fresh, (
        "engine/pdserve_control_pb2*.py are stale: regenerate with "
        "`python -m pdserve.engine.control_codegen` (grpcio-tools 1.62.3)")
