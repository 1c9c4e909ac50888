//! The Vault-compatible HTTPS front at the connection level, against a real server: it
//! speaks HTTP/1.1 only (a client that opens with HTTP/2's preface, which would otherwise
//! get hyper's default stream and header limits rather than ours, is refused), and a client
//! that trickles a request's head is cut off after the head's timeout (10 s), as is one
//! that never finishes its body (30 s) — a slowloris holds no connection for long.
//!
//! The client is Python's `ssl` with the test's mTLS certificate, so the bytes on the wire
//! are exactly the ones written here.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

use softhsm_tests::{TestHsm, python};

/// Opens an mTLS connection (no ALPN) to the front, sends `first`, waits `pause` seconds,
/// sends `then`, and prints what the server answered before it closed (at most 64 KiB,
/// within 60 s) as JSON: `{"answer": "...", "closed": bool, "after": seconds}`.
const CLIENT: &str = r#"
import json, socket, ssl, sys, time
port, ca, cert, key, first, pause, then = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
raw = socket.create_connection(("127.0.0.1", int(port)))
s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
start = time.monotonic()
s.sendall(first.encode().decode("unicode_escape").encode("latin-1"))
time.sleep(float(pause))
try:
    s.sendall(then.encode().decode("unicode_escape").encode("latin-1"))
except OSError:
    pass
s.settimeout(60)
got, closed = b"", False
while len(got) < 65536:
    try:
        chunk = s.recv(4096)
    except (socket.timeout, OSError):
        break
    if not chunk:
        closed = True
        break
    got += chunk
print(json.dumps({"answer": got.decode("latin-1"), "closed": closed,
                  "after": time.monotonic() - start}))
"#;

fn talk(
    hsm: &TestHsm,
    port: u16,
    ca: &std::path::Path,
    first: &str,
    pause: u32,
    then: &str,
) -> serde_json::Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(CLIENT)
        .arg(port.to_string())
        .arg(ca)
        .arg(&hsm.admin.cert)
        .arg(&hsm.admin.key)
        .arg(first)
        .arg(pause.to_string())
        .arg(then)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_front_speaks_http1_only_and_cuts_off_slow_clients() {
    let hsm = TestHsm::new("vault-transit-conn");
    let (server, _shares, port) = softhsm_tests::start_with_http(&hsm, "");

    // A whole request is answered (the client's certificate is the identity).
    let ok = talk(
        &hsm,
        port,
        &server.ca,
        "GET /v1/sys/health HTTP/1.1\\r\\nHost: kms\\r\\nConnection: close\\r\\n\\r\\n",
        0,
        "",
    );
    let answer = ok["answer"].as_str().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{ok}");

    // HTTP/2 with prior knowledge: refused as a malformed HTTP/1.1 request, never served
    // as HTTP/2 (whose first frame would be SETTINGS: type 0x04 in its fourth byte).
    let h2 = talk(
        &hsm,
        port,
        &server.ca,
        "PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n",
        1,
        "\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00",
    );
    let answer = h2["answer"].as_str().unwrap();
    assert!(h2["closed"] == true, "{h2}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"),
        "the front answered HTTP/2's preface with something else than an HTTP/1.1 refusal: {h2}"
    );
    assert!(answer.as_bytes().get(3) != Some(&4), "{h2}");

    // A head trickled past the head's timeout: the connection is closed (with a 408) long
    // before the client would finish, and the late rest of the head is never served.
    let slow = talk(
        &hsm,
        port,
        &server.ca,
        "GET /v1/sys/health HTTP/1.1\\r\\nHost: kms\\r\\n",
        14,
        "X-Late: 1\\r\\n\\r\\n",
    );
    assert!(slow["closed"] == true, "{slow}");
    assert!(
        !slow["answer"].as_str().unwrap().contains(" 200 "),
        "a head sent over 14 s was served: {slow}"
    );

    // A body that never comes: refused 408 after the body's timeout, and closed.
    let body = talk(
        &hsm,
        port,
        &server.ca,
        "POST /v1/transit/random/16 HTTP/1.1\\r\\nHost: kms\\r\\nContent-Length: 100\\r\\n\\r\\n{",
        0,
        "",
    );
    let answer = body["answer"].as_str().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{body}");
    let after = body["after"].as_f64().unwrap();
    assert!((29.0..59.0).contains(&after), "{body}");
    drop(server);
}
