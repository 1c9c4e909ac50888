#!/usr/bin/env python3
"""An audit verifier independent of kms, written from docs/audit.md alone.

kms checks its own chain with `kms audit verify`; a writer and a verifier that share a bug
(a field left out of the hash, the head left out of the signed message) would agree with
each other. This script shares no code with kms: it re-derives every hash, checkpoint
signature and export seal from the formats docs/audit.md defines, under a key the token
itself vouches for: the token's signature (made with pkcs11-tool) of a fresh challenge must
verify under it. The export's word for its key is never enough.

    audit_verify.py --token-challenge C --token-signature S EXPORT.jsonl [--archive DIR]

Exit codes: 0 every check passed; 3 a check failed (the first failure is printed on
stderr, naming the file, line and record); 2 usage or an unreadable input. A crash of the
script itself is Python's 1, so "invalid" is never confused with "broken".
"""

import argparse
import hashlib
import json
import os
import re
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EXIT_INVALID = 3
EXIT_UNREADABLE = 2

EXPORT_FORMAT = "kms-audit-export/v1"
CHECKPOINT_CONTEXT = "kms-audit-checkpoint/v1"
SEAL_CONTEXT = "kms-audit-export-seal/v1"
ZERO_HASH = "0" * 64

# "A record": the fields in the order shown. The last four are absent unless set; the
# table gives grant, ceremony, replay_of and front in this order, "Retention and archives" adds
# `archived` (its place is documented next to the table).
RECORD_FIELDS = ["schema", "seq", "event", "prev_hash", "hash"]
EVENT_FIELDS = [
    "time_ms", "request_id", "principal", "peer", "service", "operation", "key",
    "key_version", "destination_key", "destination_key_version", "outcome",
    "input_bytes", "output_bytes", "batch",
]
EVENT_OPTIONAL = ["grant", "archived", "ceremony", "replay_of", "front"]
# Nested objects whose fields the doc lists, in its order. Maps (batch outcomes and
# versions, the export's filter) are data, kept as written.
NESTED_FIELDS = {
    "batch": ["items", "outcomes", "versions"],
    "grant": ["id", "principal", "operations", "associated_data_constrained"],
    "ceremony": [
        "share_set", "share_index", "step", "new_share_set", "new_shares",
        "new_threshold", "recipients", "master_key", "instance", "backup_sha256",
    ],
    "archived": ["first_seq", "last_seq", "last_hash", "file"],
}
SEAL_FIELDS = [
    "format", "exported_at_ms", "filter", "contiguous", "records", "first_seq",
    "last_seq", "last_hash", "key_fingerprint",
]
SEGMENT_NAME = re.compile(r"^audit-(\d+)-(\d+)\.jsonl$")


class Invalid(Exception):
    """A check failed: the message names the first failure."""


def compact(value):
    """JSON, compact (no spaces), non-ASCII as UTF-8 text, as written."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def ordered(obj, fields, optional, where):
    """`obj` rebuilt with `fields` (all required) then `optional` (when present), in
    that order; any other field is a failure: it would not be covered as documented."""
    if not isinstance(obj, dict):
        raise Invalid(f"{where}: not a JSON object")
    unknown = [k for k in obj if k not in fields and k not in optional]
    if unknown:
        raise Invalid(f"{where}: field(s) {unknown} that docs/audit.md does not define")
    missing = [k for k in fields if k not in obj]
    if missing:
        raise Invalid(f"{where}: missing field(s) {missing}")
    out = {k: obj[k] for k in fields}
    out.update({k: obj[k] for k in optional if k in obj})
    return out


def canonical_record(record, where):
    """The record as the hash covers it: fields in the documented order, `hash` = ""."""
    rec = ordered(record, RECORD_FIELDS, [], where)
    event = ordered(rec["event"], EVENT_FIELDS, EVENT_OPTIONAL, f"{where} event")
    for name, fields in NESTED_FIELDS.items():
        if event.get(name) is not None:
            # Every listed field may be absent (a ceremony names only what it has).
            event[name] = ordered(event[name], [], fields, f"{where} event.{name}")
    rec["event"] = event
    rec["hash"] = ""
    return compact(rec)


def fingerprint(raw_key):
    """First 16 bytes (hex) of SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_key).hexdigest()[:32]


def check_signature(key, signature_hex, message, where):
    try:
        signature = bytes.fromhex(signature_hex)
    except (TypeError, ValueError):
        raise Invalid(f"{where}: signature is not hex")
    try:
        key.verify(signature, message.encode("utf-8"))
    except InvalidSignature:
        raise Invalid(f"{where}: signature invalid under the token's public key")


class Chain:
    """The state carried from one record to the next, across segments and the live log."""

    def __init__(self):
        self.last_seq = 0
        self.last_hash = ZERO_HASH
        self.last_time = None
        self.archived = []  # (the `archived` object, where) of each ArchiveSegment record
        self.seen = {}  # seq -> hash, of every record checked so far
        # True at the start of an export after segments, until its first new record.
        self.overlap_allowed = False

    def append(self, record, where):
        """Checks `record` as the chain's next one. A record already checked (a live export
        that still holds records archived since) must be exactly that record."""
        seq = record.get("seq")
        if not isinstance(seq, int):
            raise Invalid(f"{where}: seq is not an integer")
        if self.overlap_allowed and seq <= self.last_seq:
            if seq not in self.seen:
                raise Invalid(f"{where}: record {seq} was not in the archive segments")
            digest = hashlib.sha256(canonical_record(record, where).encode("utf-8")).hexdigest()
            if digest != record.get("hash") or digest != self.seen[seq]:
                raise Invalid(f"{where}: record {seq} differs from the one already checked")
            return
        if seq != self.last_seq + 1:
            raise Invalid(f"{where}: seq {seq} follows {self.last_seq} (expected {self.last_seq + 1})")
        if seq == 1 and record.get("prev_hash") != ZERO_HASH:
            raise Invalid(f"{where}: record 1's prev_hash is not 64 zeros")
        if record.get("prev_hash") != self.last_hash:
            raise Invalid(f"{where}: record {seq}'s prev_hash does not name record {seq - 1}'s hash")
        digest = hashlib.sha256(canonical_record(record, where).encode("utf-8")).hexdigest()
        if digest != record.get("hash"):
            raise Invalid(f"{where}: record {seq}'s hash does not match its content (recomputed {digest})")
        time_ms = record["event"]["time_ms"]
        if not isinstance(time_ms, int):
            raise Invalid(f"{where}: record {seq}'s time_ms is not an integer")
        if self.last_time is not None and time_ms < self.last_time:
            raise Invalid(f"{where}: record {seq}'s time_ms {time_ms} is before its predecessor's {self.last_time}")
        archived = record["event"].get("archived")
        if archived is not None:
            self.archived.append((archived, where))
        self.last_seq, self.last_hash, self.last_time = seq, digest, time_ms
        self.seen[seq] = digest
        self.overlap_allowed = False


def verify_export(path, key, raw_key, chain):
    """One export (or archive segment): its header, records, checkpoints and seal.
    Returns (first_seq, last_seq, last_hash) of its records."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        print(f"cannot read {path}: {e}", file=sys.stderr)
        sys.exit(EXIT_UNREADABLE)
    if not lines:
        raise Invalid(f"{name}: empty")
    parsed = []
    for n, line in enumerate(lines, start=1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise Invalid(f"{name}:{n}: not JSON")
    fp = fingerprint(raw_key)

    header = parsed[0]
    if header.get("format") != EXPORT_FORMAT:
        raise Invalid(f"{name}:1: header format is not {EXPORT_FORMAT}")
    if header.get("checkpoint_public_key") != raw_key.hex():
        raise Invalid(f"{name}:1: the header's checkpoint_public_key is not the token's key")
    if header.get("contiguous") is not True:
        raise Invalid(f"{name}:1: not contiguous (a filtered export is not verifiable)")

    hashes = {}
    first = None
    last = (None, None)
    records = 0
    seal = None
    previous_kind = None
    for n, obj in enumerate(parsed[1:], start=2):
        where = f"{name}:{n}"
        if seal is not None:
            raise Invalid(f"{where}: a line after the export's seal")
        if not isinstance(obj, dict):
            raise Invalid(f"{where}: not a JSON object")
        if "export_seal" in obj:
            seal = (obj, where)
        elif "checkpoint" in obj:
            cp = ordered(obj, ["checkpoint", "head", "time_ms", "key_fingerprint", "signature"], [], where)
            seq = cp["checkpoint"]
            if previous_kind != ("record", seq):
                raise Invalid(f"{where}: checkpoint {seq} is not right after record {seq}")
            if cp["head"] != hashes[seq]:
                raise Invalid(f"{where}: checkpoint {seq}'s head is not record {seq}'s hash")
            if cp["key_fingerprint"] != fp:
                raise Invalid(f"{where}: checkpoint {seq} names key {cp['key_fingerprint']}, not the token's {fp}")
            message = f"{CHECKPOINT_CONTEXT}\n{seq}\n{cp['head']}\n{cp['time_ms']}\n{cp['key_fingerprint']}"
            check_signature(key, cp["signature"], message, f"{where}: checkpoint {seq}")
            previous_kind = ("checkpoint", seq)
        elif "seq" in obj:
            chain.append(obj, where)
            hashes[obj["seq"]] = obj["hash"]
            first = obj["seq"] if first is None else first
            last = (obj["seq"], obj["hash"])
            records += 1
            previous_kind = ("record", obj["seq"])
        else:
            raise Invalid(f"{where}: neither a record, a checkpoint nor a seal")

    if seal is None:
        raise Invalid(f"{name}: no export seal (nothing signed covers the last record)")
    obj, where = seal
    ordered(obj, ["export_seal", "signature"], [], where)
    body = ordered(obj["export_seal"], SEAL_FIELDS, [], f"{where} export_seal")
    expected = {
        "format": EXPORT_FORMAT,
        "contiguous": True,
        "records": records,
        "first_seq": first,
        "last_seq": last[0],
        "last_hash": last[1],
        "key_fingerprint": fp,
        "filter": header.get("filter"),
        "exported_at_ms": header.get("exported_at_ms"),
    }
    for field, value in expected.items():
        if body[field] != value:
            raise Invalid(f"{where}: the seal's {field} is {body[field]!r}, the export's {value!r}")
    check_signature(key, obj["signature"], SEAL_CONTEXT + "\n" + compact(body), f"{where}: export seal")
    return first, last[0], last[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a JSONL export (`kms audit export --out FILE`)")
    parser.add_argument("--token-challenge", required=True, help="random bytes the token signed")
    parser.add_argument("--token-signature", required=True, help="the token's Ed25519 signature of them")
    parser.add_argument("--archive", help="the archive directory: its segments come first")
    args = parser.parse_args()

    # The key: the one the export's header names, trusted only because the token's own
    # signature of a fresh challenge verifies under it (kms keeps no public object on the
    # token; this proves the private key behind it is the token's audit key).
    try:
        with open(args.token_challenge, "rb") as f:
            challenge = f.read()
        with open(args.token_signature, "rb") as f:
            token_signature = f.read()
        with open(args.export, encoding="utf-8") as f:
            header = json.loads(f.readline())
        raw_key = bytes.fromhex(header["checkpoint_public_key"])
        key = Ed25519PublicKey.from_public_bytes(raw_key)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"cannot read the inputs or the export's key: {e!r}", file=sys.stderr)
        return EXIT_UNREADABLE
    if len(challenge) < 16:
        print("the challenge is too short to be fresh", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        key.verify(token_signature, challenge)
    except InvalidSignature:
        print(f"INVALID: {args.export}: the key it names is not the token's audit key", file=sys.stderr)
        return EXIT_INVALID

    chain = Chain()
    try:
        segments = {}
        if args.archive:
            for entry in sorted(os.listdir(args.archive)):
                m = SEGMENT_NAME.match(entry)
                if m:
                    path = os.path.join(args.archive, entry)
                    first, last, last_hash = verify_export(path, key, raw_key, chain)
                    if (first, last) != (int(m.group(1)), int(m.group(2))):
                        raise Invalid(f"{entry}: holds records {first}..{last}, not what its name says")
                    segments[(first, last)] = (entry, last_hash)
            if not segments:
                raise Invalid(f"{args.archive}: no archive segment")
        # The live export continues the chain: an archived history must link into it, and
        # without an archive it must start at record 1.
        chain.overlap_allowed = bool(segments)
        verify_export(args.export, key, raw_key, chain)
        # Nothing removed unarchived: every ArchiveSegment record names a segment that is
        # there, with the same range and last hash.
        for archived, where in chain.archived:
            a = ordered(archived, NESTED_FIELDS["archived"], [], f"{where} archived")
            seg = segments.get((a["first_seq"], a["last_seq"]))
            if seg is None:
                raise Invalid(f"{where}: archived records {a['first_seq']}..{a['last_seq']} but no such segment is there")
            if seg[1] != a["last_hash"]:
                raise Invalid(f"{where}: segment {seg[0]}'s last hash is not the one its ArchiveSegment record names")
            if os.path.basename(a["file"]) != seg[0]:
                raise Invalid(f"{where}: ArchiveSegment names file {a['file']}, the segment is {seg[0]}")
    except Invalid as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"OK: records 1..{chain.last_seq}, {len(segments)} archive segment(s), key {fingerprint(raw_key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
