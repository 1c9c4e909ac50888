//! The envelope encryption examples of docs/api.md, run as a developer would run them
//! against a real server: `examples/python/envelope.py` (with stubs generated from proto/)
//! and the Rust `kms-proto` example `envelope`. Both encrypt a 10 MB file in 1 MiB chunks
//! under a data key of its own and decrypt it back, each reads the other's files (one
//! documented format), and both refuse a file that was tampered with, reordered, truncated,
//! given another object's data key or another context, leaving no output. Also:
//! `GenerateDataKey` takes only a key's size.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kms_proto::v1 as pb;
use softhsm_tests::{
    ClientSpec, Cred, Server, TestHsm, example, expect_code, python, python_stubs, start_unsealed,
};
use tonic::Code;

const MIB: usize = 1024 * 1024;

/// Reads `x-request-id` from an answer, from an error, and for an id that is not one.
const REQUEST_ID_PY: &str = r#"
import os, grpc
from kms.v1 import keys_pb2, keys_pb2_grpc
read = lambda v: open(os.environ[v], "rb").read()
creds = grpc.ssl_channel_credentials(read("KMS_CACERT"), read("KMS_CLIENT_KEY"), read("KMS_CLIENT_CERT"))
stub = keys_pb2_grpc.KeyManagementStub(
    grpc.secure_channel(os.environ["KMS_ADDR"].removeprefix("https://"), creds))
req = keys_pb2.GenerateDataKeyRequest(key="files")
_, call = stub.GenerateDataKey.with_call(req, metadata=[("x-request-id", "upload-42")], timeout=10)
print(dict(call.initial_metadata())["x-request-id"])
try:
    stub.Decrypt(keys_pb2.DecryptRequest(key="files"), metadata=[("x-request-id", "upload-43")], timeout=10)
except grpc.RpcError as e:
    print(e.code().name, dict(e.trailing_metadata())["x-request-id"])
_, call = stub.GenerateDataKey.with_call(req, metadata=[("x-request-id", "no spaces allowed")], timeout=10)
print(dict(call.initial_metadata())["x-request-id"])
"#;
/// The file's header: magic (8), wrapped key length (2), wrapped key, chunk size (4).
fn header_len(file: &[u8]) -> usize {
    8 + 2 + usize::from(u16::from_be_bytes([file[8], file[9]])) + 4
}

/// One of the two examples.
#[derive(Clone, Copy, Debug)]
enum Lang {
    Python,
    Rust,
}

struct Env<'a> {
    server: &'a Server,
    stubs: &'a Path,
}

impl Env<'_> {
    /// Runs `lang`'s example as `who`: `mode --key files --context CONTEXT IN OUT`.
    fn run(&self, lang: Lang, who: &Cred, mode: &str, context: &str, i: &Path, o: &Path) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/envelope.py");
        let mut cmd = match lang {
            Lang::Python => {
                let mut c = Command::new(python());
                c.arg(script).env("PYTHONPATH", self.stubs);
                c
            }
            Lang::Rust => Command::new(example("envelope")),
        };
        cmd.args([mode, "--key", "files", "--context", context])
            .arg(i)
            .arg(o)
            .env("KMS_ADDR", &self.server.addr)
            .env("KMS_CACERT", &self.server.ca)
            .env("KMS_CLIENT_CERT", &who.cert)
            .env("KMS_CLIENT_KEY", &who.key)
            .output()
            .unwrap()
    }
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The example refused the file with exit code 2 and `why` in its message, and wrote no
/// output (nor left a partial one).
fn refused(out: &Output, why: &str, output: &Path, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
    assert!(stderr.contains(why), "{what}: {stderr}");
    assert!(!output.exists(), "{what}: output written");
    assert!(
        !PathBuf::from(format!("{}.partial", output.display())).exists(),
        "{what}: partial output left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envelope_examples_round_trip_and_refuse_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    python_stubs(&stubs);
    let hsm = TestHsm::new("kms-envelope");
    let (server, _) = start_unsealed(&hsm, &hsm.config());
    let mut keys = server.keys().await;
    keys.create_key(pb::CreateKeyRequest {
        name: "files".into(),
        algorithm: pb::Algorithm::Aes256Gcm as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    // The writer may only make data keys, the reader only decrypt them (docs/api.md).
    let writer = hsm.pki.client("writer", &ClientSpec::spiffe("uploader"));
    let reader = hsm.pki.client("reader", &ClientSpec::spiffe("downloader"));
    let mut access = server.access().await;
    for (who, op) in [
        (&writer, pb::Operation::GenerateDataKey),
        (&reader, pb::Operation::Decrypt),
    ] {
        access
            .create_grant(pb::CreateGrantRequest {
                key: "files".into(),
                principal: who.principal.clone(),
                operations: vec![op as i32],
                associated_data: None,
            })
            .await
            .unwrap();
    }
    let env = Env {
        server: &server,
        stubs: &stubs,
    };
    let path = |name: &str| dir.path().join(name);

    // 10 MB (not a whole number of chunks), and an empty file.
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(path("big"), &data).unwrap();
    std::fs::write(path("empty"), b"").unwrap();
    let ctx = "bucket=invoices;object=2026/04/inv-1.pdf";
    for (lang, other) in [(Lang::Python, Lang::Rust), (Lang::Rust, Lang::Python)] {
        let sealed = path(&format!("big.{lang:?}.env"));
        ok(
            &env.run(lang, &writer, "encrypt", ctx, &path("big"), &sealed),
            "encrypt",
        );
        let file = std::fs::read(&sealed).unwrap();
        // 10 chunks: nine of 1 MiB and one of the rest, each with its tag.
        assert_eq!(file.len(), header_len(&file) + data.len() + 10 * 16);
        assert!(!file.windows(64).any(|w| data.windows(64).next() == Some(w)));
        for reader_lang in [lang, other] {
            let out = path(&format!("big.{lang:?}.{reader_lang:?}"));
            ok(
                &env.run(reader_lang, &reader, "decrypt", ctx, &sealed, &out),
                "decrypt",
            );
            assert!(
                std::fs::read(&out).unwrap() == data,
                "{lang:?} -> {reader_lang:?}"
            );
        }
        let empty = path(&format!("empty.{lang:?}.env"));
        ok(
            &env.run(lang, &writer, "encrypt", ctx, &path("empty"), &empty),
            "encrypt empty",
        );
        let out = path(&format!("empty.{lang:?}.out"));
        ok(
            &env.run(other, &reader, "decrypt", ctx, &empty, &out),
            "decrypt empty",
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"");
    }

    // Each object has its own data key: the two encryptions of one file share no
    // wrapped key.
    let a = std::fs::read(path("big.Python.env")).unwrap();
    let b = std::fs::read(path("big.Rust.env")).unwrap();
    let (ha, hb) = (header_len(&a), header_len(&b));
    assert_ne!(a[..ha], b[..hb]);

    // What each example must refuse, from the Python-made file.
    let chunk = MIB + 16;
    let chunk_at = |i: usize| ha + i * chunk;
    let mut tampered = a.clone();
    tampered[chunk_at(3) + 100] ^= 1;
    let mut reordered = a.clone();
    reordered[chunk_at(1)..chunk_at(3)].rotate_left(chunk);
    // Cut after a whole chunk (the last full one then claims to be the last) and inside one.
    let cut_at_chunk = a[..chunk_at(9)].to_vec();
    let cut_inside = a[..a.len() - 10].to_vec();
    let header_only = a[..ha].to_vec();
    // Another object's data key with this data.
    let mut swapped_key = b[..hb].to_vec();
    swapped_key.extend_from_slice(&a[ha..]);
    let cases: [(&str, Vec<u8>, &str, &str); 7] = [
        ("tampered", tampered, ctx, "chunk 3 is not authentic"),
        ("reordered", reordered, ctx, "chunk 1 is not authentic"),
        (
            "cut at a chunk",
            cut_at_chunk,
            ctx,
            "chunk 8 is not authentic",
        ),
        (
            "cut inside a chunk",
            cut_inside,
            ctx,
            "chunk 9 is not authentic",
        ),
        ("header only", header_only, ctx, "truncated: no chunk"),
        ("another key", swapped_key, ctx, "chunk 0 is not authentic"),
        (
            "another context",
            a.clone(),
            "bucket=invoices;object=2026/04/inv-2.pdf",
            "the data key does not open: decryption failed",
        ),
    ];
    for (what, bytes, context, why) in cases {
        let input = path("bad.env");
        std::fs::write(&input, &bytes).unwrap();
        for lang in [Lang::Python, Lang::Rust] {
            let out = path("bad.out");
            let r = env.run(lang, &reader, "decrypt", context, &input, &out);
            refused(&r, why, &out, &format!("{what} ({lang:?})"));
        }
    }
    // The writer holds no decrypt grant: it cannot read what it wrote.
    for lang in [Lang::Python, Lang::Rust] {
        let out = path("denied.out");
        let r = env.run(lang, &writer, "decrypt", ctx, &path("big.Python.env"), &out);
        assert_eq!(r.status.code(), Some(1), "{lang:?}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("PermissionDenied")
                || String::from_utf8_lossy(&r.stderr).contains("PERMISSION_DENIED")
                || String::from_utf8_lossy(&r.stderr).contains("permission denied"),
            "{lang:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(!out.exists());
    }
    // The log holds neither the data nor the context.
    assert!(!hsm.logs().contains("inv-1.pdf"));

    // `x-request-id` as docs/api.md tells a Python developer to read it: in the initial
    // metadata of an answer, in the trailers of an error, and replaced when not a sane id.
    let probe = dir.path().join("request_id.py");
    std::fs::write(&probe, REQUEST_ID_PY).unwrap();
    let out = Command::new(python())
        .arg(&probe)
        .env("PYTHONPATH", &stubs)
        .env("KMS_ADDR", &server.addr)
        .env("KMS_CACERT", &server.ca)
        .env("KMS_CLIENT_CERT", &writer.cert)
        .env("KMS_CLIENT_KEY", &writer.key)
        .output()
        .unwrap();
    ok(&out, "request ids");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids[0], "upload-42");
    assert_eq!(ids[1], "PERMISSION_DENIED upload-43");
    assert!(
        ids[2].len() == 32 && ids[2].bytes().all(|b| b.is_ascii_hexdigit()),
        "an invalid id was not replaced: {ids:?}"
    );

    // GenerateDataKey takes a key's size only: 16, 24, 32 or 64 bytes (0: 32).
    let mut admin = server.keys().await;
    server.grant_all("files").await;
    for (asked, got) in [(0, 32), (16, 16), (24, 24), (32, 32), (64, 64)] {
        let r = admin
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "files".into(),
                length_bytes: asked,
                associated_data: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.plaintext.len(), got);
    }
    for asked in [1, 8, 15, 17, 31, 33, 48, 63, 65, 1 << 20] {
        expect_code(
            admin
                .generate_data_key_without_plaintext(pb::GenerateDataKeyRequest {
                    key: "files".into(),
                    length_bytes: asked,
                    associated_data: vec![],
                })
                .await,
            Code::InvalidArgument,
            "length_bytes must be a key's size: 16, 24, 32 or 64 bytes",
        );
    }
}
