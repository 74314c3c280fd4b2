"""Generate Python stubs for etcd's v3 gRPC API into protos/nanodist/etcd/ (git ignores them).

    python protos/etcd_stubs.py [ETCD_SOURCE_DIR]

The .proto files are etcd's own, from Debian's golang-etcd-server-dev package (the sources of the
etcd-server the image and the tests run, 3.4.23 on bookworm); without ETCD_SOURCE_DIR the package is
downloaded with `apt-get download` and unpacked, never installed. The gogoproto and grpc-gateway
annotations are Go-only and dropped; the stubs are made with the pinned grpcio-tools, so they match
the pinned protobuf (the etcd client libraries on PyPI ship gencode that it refuses).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile

from grpc_tools import protoc

PACKAGE = "golang-etcd-server-dev"
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "nanodist", "etcd")
# Each file's place in the etcd tree, and its name in nanodist/etcd/.
FILES = {
    "mvcc/mvccpb/kv.proto": "kv.proto",
    "auth/authpb/auth.proto": "auth.proto",
    "etcdserver/etcdserverpb/rpc.proto": "rpc.proto",
}


def fetch_sources(into: str) -> str:
    """Unpack the Debian package of etcd's sources into `into`; the etcd tree's root."""
    download = ["apt-get", "download", PACKAGE]
    if subprocess.run(download, cwd=into, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)  # a fresh machine has no package lists
        subprocess.run(download, cwd=into, check=True, capture_output=True)
    (deb,) = glob.glob(os.path.join(into, f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(into, "tree")], check=True)
    return os.path.join(into, "tree", "usr", "share", "gocode", "src", "go.etcd.io", "etcd")


def without_go_annotations(text: str) -> str:
    text = re.sub(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text, flags=re.M)
    text = re.sub(r"^option \(gogoproto\.[^;]*;\n", "", text, flags=re.M)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)
    text = re.sub(r"option \(google\.api\.http\) = \{([^{}]|\{[^{}]*\})*\};", "", text)  # one nesting
    for source, name in FILES.items():
        text = text.replace(f'import "etcd/{source}";', f'import "nanodist/etcd/{name}";')
    return text


def generate(etcd_root: str) -> None:
    with tempfile.TemporaryDirectory() as work:
        include = os.path.join(work, "nanodist", "etcd")
        os.makedirs(include)
        for source, name in FILES.items():
            with open(os.path.join(etcd_root, source)) as f:
                text = without_go_annotations(f.read())
            with open(os.path.join(include, name), "w") as f:
                f.write(text)
        protos = [os.path.join(include, name) for name in FILES.values()]
        out = os.path.dirname(os.path.dirname(OUT))
        args = ["protoc", f"-I{work}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
        if protoc.main([*args, *protos]) != 0:
            raise SystemExit("etcd_stubs: protoc failed on etcd's protos")
    print(f"etcd stubs written to {os.path.relpath(OUT)}")


def main() -> None:
    if len(sys.argv) > 1:
        generate(sys.argv[1])
        return
    with tempfile.TemporaryDirectory() as download:
        generate(fetch_sources(download))


if __name__ == "__main__":
    main()
