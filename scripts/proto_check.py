#!/usr/bin/env python3
"""Compiles every .proto file with the reference compiler (protoc) and checks the API's
naming conventions (docs/api.md). Our own build uses protox, which accepts some files
protoc refuses; clients in other languages are generated with protoc, so protoc decides.

Usage: proto_check.py PROTO_ROOT PROTOC
Exits 1 and names every violation; prints a summary line otherwise.
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


def upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


# kube-apiserver's KMS v2 plugin API (k8s.io/kms apis/v2/api.proto), kept as published:
# not ours to name, but every name and field number must be the apiserver's.
KUBERNETES_KMS = "k8s/kms/apis/v2/api.proto"
KUBERNETES_SHAPE = {
    "StatusRequest": {},
    "StatusResponse": {"version": 1, "healthz": 2, "key_id": 3},
    "DecryptRequest": {"ciphertext": 1, "uid": 2, "key_id": 3, "annotations": 4},
    "DecryptResponse": {"plaintext": 1},
    "EncryptRequest": {"plaintext": 1, "uid": 2},
    "EncryptResponse": {"ciphertext": 1, "key_id": 2, "annotations": 3},
}
KUBERNETES_RPCS = {
    "Status": ("StatusRequest", "StatusResponse"),
    "Decrypt": ("DecryptRequest", "DecryptResponse"),
    "Encrypt": ("EncryptRequest", "EncryptResponse"),
}


def check_kubernetes(f) -> list[str]:
    where = f.name
    errors = []
    if f.package != "v2":
        errors.append(f"{where}: package must be the apiserver's v2, not {f.package!r}")
    fields = {
        m.name: {fld.name: fld.number for fld in m.field} for m in f.message_type
    }
    if fields != KUBERNETES_SHAPE:
        errors.append(f"{where}: messages and field numbers differ from the apiserver's: {fields}")
    rpcs = {
        m.name: (m.input_type.rsplit(".", 1)[-1], m.output_type.rsplit(".", 1)[-1])
        for s in f.service
        for m in s.method
    }
    if [s.name for s in f.service] != ["KeyManagementService"] or rpcs != KUBERNETES_RPCS:
        errors.append(f"{where}: the service differs from the apiserver's: {rpcs}")
    return errors


def check(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    errors = []
    for f in fds.file:
        where = f.name
        if where == KUBERNETES_KMS:
            errors.extend(check_kubernetes(f))
            continue
        if f.syntax != "proto3":
            errors.append(f"{where}: syntax must be proto3")
        if f.package != "kms.v1":
            errors.append(f"{where}: package must be kms.v1, not {f.package!r}")
        if not f.name.startswith("kms/v1/"):
            errors.append(f"{where}: files live in kms/v1/")
        types = {}

        def walk_messages(msgs, prefix=""):
            for m in msgs:
                name = prefix + m.name
                types[name] = "message"
                if not PASCAL.match(m.name):
                    errors.append(f"{where}: message {name}: PascalCase")
                for fld in m.field:
                    if not SNAKE.match(fld.name):
                        errors.append(f"{where}: {name}.{fld.name}: lower_snake_case")
                walk_enums(m.enum_type, name + ".")
                walk_messages(m.nested_type, name + ".")

        def walk_enums(enums, prefix=""):
            for e in enums:
                name = prefix + e.name
                types[name] = "enum"
                if not PASCAL.match(e.name):
                    errors.append(f"{where}: enum {name}: PascalCase")
                want = upper_snake(e.name) + "_"
                # Values other than zero are not prefixed (as in Google Cloud KMS): protoc
                # itself refuses two enums of the package that share a value name.
                for v in e.value:
                    if not UPPER_SNAKE.match(v.name):
                        errors.append(f"{where}: {name}.{v.name}: UPPER_SNAKE_CASE")
                zero = [v.name for v in e.value if v.number == 0]
                if not zero or not zero[0].endswith(("_UNSPECIFIED", "_DEFAULT")):
                    errors.append(
                        f"{where}: enum {name}: its zero value must be {want}UNSPECIFIED"
                        f" (or {want}DEFAULT when zero is a meaningful default)"
                    )

        walk_messages(f.message_type)
        walk_enums(f.enum_type)
        for s in f.service:
            if not PASCAL.match(s.name):
                errors.append(f"{where}: service {s.name}: PascalCase")
            for m in s.method:
                rpc = f"{s.name}/{m.name}"
                if not PASCAL.match(m.name):
                    errors.append(f"{where}: rpc {rpc}: PascalCase")
                if m.name in types or s.name in types:
                    # protoc resolves the RPC first and refuses the file; protox does not.
                    errors.append(
                        f"{where}: rpc {rpc} shares its name with a {types.get(m.name) or types.get(s.name)}"
                    )
                request = m.input_type.rsplit(".", 1)[-1]
                response = m.output_type.rsplit(".", 1)[-1]
                if not request.endswith("Request"):
                    errors.append(f"{where}: rpc {rpc}: its request {request} must end in Request")
                if response.endswith("Request"):
                    errors.append(f"{where}: rpc {rpc}: its response {response} is a request")
                if request == response:
                    errors.append(f"{where}: rpc {rpc}: request and response are one message")
    return errors


def main() -> int:
    root, protoc = Path(sys.argv[1]), sys.argv[2]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    if not files:
        print(f"no .proto files under {root}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fds.pb"
        run = subprocess.run(
            [protoc, f"-I{root}", f"--descriptor_set_out={out}", "--include_source_info", *files],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(f"protoc refuses the API:\n{run.stderr}", file=sys.stderr)
            return 1
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    errors = check(fds)
    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        print(f"{len(errors)} convention violation(s): see docs/api.md", file=sys.stderr)
        return 1
    services = sum(len(f.service) for f in fds.file)
    rpcs = sum(len(s.method) for f in fds.file for s in f.service)
    print(f"protoc compiles {len(files)} files; {services} services, {rpcs} RPCs follow docs/api.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
