#!/usr/bin/env python3
"""Envelope encryption with kms: a file of any size, encrypted locally under its own data key.

    envelope.py encrypt --key KEY --context CONTEXT IN OUT
    envelope.py decrypt --key KEY --context CONTEXT IN OUT

The pattern (docs/api.md, "Envelope encryption"):
- One data key per object: GenerateDataKey(key, 32 bytes, associated_data=CONTEXT) gives the
  data key and the same key wrapped under KEY. The plaintext data key is used, then dropped;
  only the wrapped one is stored, beside the data (in OUT's header).
- The data is encrypted locally with AES-256-GCM, in chunks of 1 MiB, so a file of any size
  streams through bounded memory. Chunk i has the nonce u64be(i) | u32be(final) and the
  associated data CONTEXT | u64be(i) | final, so a chunk moved, dropped, or a file cut
  short at a chunk boundary fails to decrypt.
- CONTEXT (say "bucket=invoices;object=2026/04/inv-1.pdf") is bound on both layers: the
  wrapped key opens only with it (kms checks it), and every chunk carries it.
- Decrypting asks kms to Decrypt the wrapped key (a `decrypt` grant on KEY), then opens the
  chunks locally. The output is written to OUT.partial and renamed only when every chunk,
  the last one included, was authentic: a failed decryption leaves no OUT.
- Writers need only `generate-data-key` on KEY and readers only `decrypt`.

The file: "KMSENV1\\0" | u16be(len(wrapped key)) | wrapped key | u32be(chunk size) | chunks,
each chunk the size of its plaintext + 16 (the tag); every chunk but the last is full.

Connection: KMS_ADDR (https://host:port, or host:port), KMS_CACERT, KMS_CLIENT_CERT,
KMS_CLIENT_KEY, as for the kms CLI. The stubs are generated from proto/ (docs/api.md):
    python3 -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/kms/v1/*.proto
and found on PYTHONPATH. Needs grpcio and cryptography (pip).
"""

import argparse
import os
import struct
import sys

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.v1 import keys_pb2, keys_pb2_grpc

MAGIC = b"KMSENV1\0"
CHUNK = 1024 * 1024
TAG = 16


class Refused(Exception):
    """The file is not authentic (tampered, reordered, truncated, wrong context)."""


def connect():
    addr = os.environ["KMS_ADDR"].removeprefix("https://")
    read = lambda var: open(os.environ[var], "rb").read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=read("KMS_CACERT"),
        private_key=read("KMS_CLIENT_KEY"),
        certificate_chain=read("KMS_CLIENT_CERT"),
    )
    return keys_pb2_grpc.KeyManagementStub(grpc.secure_channel(addr, creds))


def nonce(i, final):
    return struct.pack(">QI", i, int(final))


def chunk_aad(context, i, final):
    return context + struct.pack(">QB", i, int(final))


def read_full(f, n):
    """n bytes, or fewer only at the end of the file."""
    out = bytearray()
    while len(out) < n:
        b = f.read(n - len(out))
        if not b:
            break
        out += b
    return bytes(out)


def encrypt(stub, key, context, src, dst):
    # One data key for this object, bound to its context.
    dk = stub.GenerateDataKey(
        keys_pb2.GenerateDataKeyRequest(key=key, length_bytes=32, associated_data=context),
        timeout=30,
    )
    aead = AESGCM(dk.plaintext)
    dk.ClearField("plaintext")  # use the data key, then forget it: only the wrapped one stays
    wrapped = dk.ciphertext
    try:
        with open(src, "rb") as fin, open(dst + ".partial", "wb") as fout:
            fout.write(MAGIC + struct.pack(">H", len(wrapped)) + wrapped + struct.pack(">I", CHUNK))
            i, cur = 0, read_full(fin, CHUNK)
            while True:
                nxt = read_full(fin, CHUNK)
                final = not nxt
                fout.write(aead.encrypt(nonce(i, final), cur, chunk_aad(context, i, final)))
                if final:
                    break
                i, cur = i + 1, nxt
        os.replace(dst + ".partial", dst)
    finally:
        if os.path.exists(dst + ".partial"):
            os.remove(dst + ".partial")


def decrypt(stub, key, context, src, dst):
    with open(src, "rb") as fin:
        try:
            if read_full(fin, len(MAGIC)) != MAGIC:
                raise Refused("not an envelope file")
            (n,) = struct.unpack(">H", read_full(fin, 2))
            wrapped = read_full(fin, n)
            (chunk,) = struct.unpack(">I", read_full(fin, 4))
        except struct.error:
            raise Refused("truncated header")
        if len(wrapped) != n or not 0 < chunk <= 64 * CHUNK:
            raise Refused("malformed header")
        # kms opens the wrapped key only under KEY and with the same context.
        try:
            dk = stub.Decrypt(
                keys_pb2.DecryptRequest(key=key, ciphertext=wrapped, associated_data=context),
                timeout=30,
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise Refused(f"the data key does not open: {e.details()}") from e
            raise
        aead = AESGCM(dk.plaintext)
        dk.ClearField("plaintext")
        try:
            with open(dst + ".partial", "wb") as fout:
                i, cur = 0, read_full(fin, chunk + TAG)
                if not cur:
                    raise Refused("truncated: no chunk")
                while True:
                    nxt = read_full(fin, chunk + TAG)
                    final = not nxt
                    try:
                        fout.write(aead.decrypt(nonce(i, final), cur, chunk_aad(context, i, final)))
                    except InvalidTag:
                        raise Refused(f"chunk {i} is not authentic (tampered, moved or truncated)")
                    if final:
                        break
                    i, cur = i + 1, nxt
            os.replace(dst + ".partial", dst)
        finally:
            if os.path.exists(dst + ".partial"):
                os.remove(dst + ".partial")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["encrypt", "decrypt"])
    p.add_argument("--key", required=True, help="the kms key that wraps the data keys")
    p.add_argument("--context", required=True, help="the object's associated data")
    p.add_argument("input")
    p.add_argument("output")
    a = p.parse_args()
    stub = connect()
    context = a.context.encode()
    try:
        (encrypt if a.mode == "encrypt" else decrypt)(stub, a.key, context, a.input, a.output)
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        sys.exit(2)
    except grpc.RpcError as e:
        print(f"kms: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
