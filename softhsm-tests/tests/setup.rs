//! docs/setup.md, run as written: every block marked `sh setup-test` in one `bash` session
//! (prompts answered in a pseudo-terminal, as an operator types them), against openssl,
//! SoftHSM's `softhsm2-util`, a real PostgreSQL cluster and the `kms` binary; then two
//! `kms server`s on the configuration those commands wrote, the `sh setup-test-running`
//! blocks against them, and an init, unseal and key use with the certificates the page
//! made. A command of the page that stops working fails here.
//!
//! What the test sets, and nothing else: the variables of the page's "Your site" block
//! (temporary directories, `127.0.0.1`, `localhost`, free ports, the cluster's data
//! directory and user), `PATH` (the built `kms` and the cluster's `psql` first), `PAGER=cat`
//! (the pseudo-terminal has no size: psql would page a single row), and the
//! superuser's connection for `psql` (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`: what `sudo
//! -u postgres -i` gives on a database server). The cluster starts with only a superuser and
//! a `pg_hba.conf` that admits only the superuser: the page's own SQL and `pg_hba.conf` line
//! let kms in.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_proto::v1 as pb;
use softhsm_tests::pg::TestPostgres;
use softhsm_tests::{Cred, Out, bin, run_kms_tls, try_channel};

/// The page, from the repository's root.
const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/setup.md");

/// The bodies of the page's fenced blocks whose info string is exactly `info`, in order.
fn blocks(page: &str, info: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match current.as_mut() {
            None => {
                if line.trim_start().strip_prefix("```") == Some(info) {
                    current = Some(String::new());
                }
            }
            Some(body) => {
                if line.trim_start() == "```" {
                    found.extend(current.take());
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(current.is_none(), "an unclosed ```{info} block in {PAGE}");
    found
}

/// What to type at a prompt.
enum Answer {
    Text(String),
    /// The first line of a file the session wrote (a PIN or password it made).
    FileLine(PathBuf),
}

/// Runs `script` with `bash` in a pseudo-terminal (util-linux `script`), typing each answer
/// once its prompt has appeared, in order; returns what the terminal showed. Panics when a
/// prompt does not appear, or the session fails.
fn run_in_terminal(env: &[(String, String)], script: &Path, answers: &[(&str, Answer)]) -> String {
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("bash {}", script.display()))
        .arg("/dev/null")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("SHELL", "/bin/bash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux script");
    let shown = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut readers = Vec::new();
    for mut stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let shown = Arc::clone(&shown);
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }));
    }
    let text =
        |shown: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&shown.lock().unwrap()).into_owned();
    let mut stdin = child.stdin.take().unwrap();
    let mut seen = 0;
    for (prompt, answer) in answers {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let found = {
                let bytes = shown.lock().unwrap();
                bytes
                    .get(seen..)
                    .unwrap_or_default()
                    .windows(prompt.len())
                    .position(|w| w == prompt.as_bytes())
            };
            if let Some(at) = found {
                seen += at + prompt.len();
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the session ended ({status}) before the prompt {prompt:?}:\n{}",
                    text(&shown)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no prompt {prompt:?} within 120 s:\n{}",
                text(&shown)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let line = match answer {
            Answer::Text(t) => t.clone(),
            Answer::FileLine(path) => std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .lines()
                .next()
                .unwrap()
                .to_owned(),
        };
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the session did not end within 300 s:\n{}",
            text(&shown)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    for r in readers {
        r.join().unwrap();
    }
    let shown = text(&shown);
    assert!(
        status.success(),
        "the documented commands failed ({status}):\n{shown}"
    );
    shown
}

/// A `kms server --config CONFIG` started as the page says (with `SOFTHSM2_CONF`); killed on
/// drop.
struct Running {
    child: Child,
    addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(config: &Path, softhsm_conf: &Path, log: &Path) -> Running {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(bin("kms"))
        .arg("server")
        .arg("--config")
        .arg(config)
        .env("SOFTHSM2_CONF", softhsm_conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("kms listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Running {
            child,
            addr: format!("https://{addr}"),
        },
        Err(_) => {
            let _ = child.kill();
            panic!(
                "kms server did not listen: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

fn cred(ca_dir: &Path, name: &str, principal: &str) -> Cred {
    Cred {
        cert: ca_dir.join(format!("{name}.pem")),
        key: ca_dir.join(format!("{name}-key.pem")),
        principal: principal.to_owned(),
    }
}

fn status(addr: &str, ca: &Path, who: &Cred) -> serde_json::Value {
    let out = run_kms_tls(addr, ca, Some(who), &["operator", "status", "--json"], "");
    out.json()
}

fn unseal(addr: &str, ca: &Path, custodian: &Cred, shares: &[String]) {
    let out: Out = run_kms_tls(
        addr,
        ca,
        Some(custodian),
        &["operator", "unseal"],
        &format!("{}\n{}\n", shares[0], shares[1]),
    );
    assert_eq!(out.code, Some(0), "unseal: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_setup_works_as_written() {
    let page = std::fs::read_to_string(PAGE).unwrap();
    let setup = blocks(&page, "sh setup-test");
    let running = blocks(&page, "sh setup-test-running");
    // The page's sections: directories, the CA, the server's certificate, the clients', the
    // database's, the token, the password file, the SQL, TLS and pg_hba.conf, the
    // configuration and probe; then the calls.
    assert!(
        setup.len() >= 10,
        "{} setup-test blocks in {PAGE}",
        setup.len()
    );
    assert!(!running.is_empty(), "no setup-test-running block in {PAGE}");

    // The database server: a superuser only, and a pg_hba.conf that admits only it.
    let pg = TestPostgres::start_empty();
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        "host all postgres 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    pg.sql("SELECT pg_reload_conf()");

    let root = tempfile::Builder::new()
        .prefix("kms-setup-")
        .tempdir()
        .unwrap();
    let etc = root.path().join("etc/kms");
    let var = root.path().join("var/lib/kms");
    let ca_dir = root.path().join("kms-ca");
    let (port_a, port_b) = (softhsm_tests::free_port(), softhsm_tests::free_port());
    let trust_domain = "example.org";
    let kms_dir = bin("kms").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        kms_dir.display(),
        pg.bin_dir().display()
    );
    let env: Vec<(String, String)> = [
        ("PATH", path),
        ("HOME", root.path().display().to_string()),
        ("LANG", "C.UTF-8".to_owned()),
        ("TERM", "dumb".to_owned()),
        // The test's pseudo-terminal has no size, so psql would page even one row.
        ("PAGER", "cat".to_owned()),
        ("KMS_ETC", etc.display().to_string()),
        ("KMS_VAR", var.display().to_string()),
        ("KMS_CA", ca_dir.display().to_string()),
        ("KMS_NAME", "localhost".to_owned()),
        ("KMS_IP", "127.0.0.1".to_owned()),
        ("KMS_PORT", port_a.to_string()),
        ("TRUST_DOMAIN", trust_domain.to_owned()),
        ("DB_HOST", "localhost".to_owned()),
        ("DB_PORT", pg.port.to_string()),
        ("PG_CONF_DIR", pg.data_dir().display().to_string()),
        ("PG_OS_USER", TestPostgres::os_user()),
        ("PGHOST", "127.0.0.1".to_owned()),
        ("PGPORT", pg.port.to_string()),
        ("PGUSER", "postgres".to_owned()),
        ("PGPASSWORD", pg.superuser_password().to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    // The setup, as one session.
    let script = root.path().join("setup.sh");
    std::fs::write(&script, format!("set -eu\n{}", setup.concat())).unwrap();
    let so_pin = "so-pin-of-the-setup-test";
    let pin_file = etc.join("hsm-pin");
    let password_file = etc.join("pg-password");
    let shown = run_in_terminal(
        &env,
        &script,
        &[
            ("Please enter SO PIN: ", Answer::Text(so_pin.to_owned())),
            ("Please reenter SO PIN: ", Answer::Text(so_pin.to_owned())),
            (
                "Please enter user PIN: ",
                Answer::FileLine(pin_file.clone()),
            ),
            (
                "Please reenter user PIN: ",
                Answer::FileLine(pin_file.clone()),
            ),
            (
                "Enter new password for user \"kms\": ",
                Answer::FileLine(password_file.clone()),
            ),
            ("Enter it again: ", Answer::FileLine(password_file.clone())),
        ],
    );
    // The probe found the configured token usable; nothing typed was echoed.
    assert!(shown.contains("<- configured token"), "{shown}");
    assert!(shown.contains("verdict: usable by kms"), "{shown}");
    for secret in [
        so_pin.to_owned(),
        std::fs::read_to_string(&pin_file)
            .unwrap()
            .trim()
            .to_owned(),
        std::fs::read_to_string(&password_file)
            .unwrap()
            .trim()
            .to_owned(),
    ] {
        assert!(!shown.contains(&secret), "a secret was shown:\n{shown}");
    }
    // The role's password is stored hashed with SCRAM, and the database is kms's own.
    let stored =
        pg.sql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'kms'");
    assert_eq!(stored.trim(), "t", "{stored}");
    let owner = pg.sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'kms'");
    assert_eq!(owner.trim(), "kms");

    // Two servers on the page's configuration (the second on another port), both running
    // before the init: the second takes up the seal record the first writes
    // (docs/operations.md, "Several servers").
    let config = etc.join("kms.toml");
    let softhsm_conf = etc.join("softhsm2.conf");
    let text = std::fs::read_to_string(&config).unwrap();
    let listen_a = format!("listen = \"127.0.0.1:{port_a}\"");
    assert!(text.contains(&listen_a), "{text}");
    let config_b = etc.join("kms-b.toml");
    softhsm_tests::write_private(
        &config_b,
        text.replace(&listen_a, &format!("listen = \"127.0.0.1:{port_b}\"")),
    );
    let log = root.path().join("server.log");
    let a = start_server(&config, &softhsm_conf, &log);
    let b = start_server(&config_b, &softhsm_conf, &log);
    assert_eq!(a.addr, format!("https://127.0.0.1:{port_a}"));

    // The page's calls, with its certificates, by IP address and by name.
    let calls = root.path().join("calls.sh");
    std::fs::write(&calls, format!("set -eu\n{}", running.concat())).unwrap();
    let out = Command::new("bash")
        .arg(&calls)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = format!("spiffe://{trust_domain}/ops/alice");
    assert_eq!(
        stdout.matches(&format!("Principal      {alice}")).count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("Roles          admin\n").count(),
        2,
        "{stdout}"
    );

    // Every certificate the page made is accepted for its role: the administrator inits,
    // the custodian unseals, the service encrypts with a grant, the auditor verifies.
    let ca = ca_dir.join("ca.pem");
    let admin = cred(&ca_dir, "admin-alice", &alice);
    let custodian = cred(
        &ca_dir,
        "custodian-carol",
        &format!("spiffe://{trust_domain}/custodians/carol"),
    );
    let auditor = cred(
        &ca_dir,
        "auditor-dave",
        &format!("spiffe://{trust_domain}/audit/dave"),
    );
    let service = cred(
        &ca_dir,
        "payments",
        &format!("spiffe://{trust_domain}/services/payments"),
    );
    let init = run_kms_tls(
        &a.addr,
        &ca,
        Some(&admin),
        &[
            "operator",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--json",
        ],
        "",
    );
    assert_eq!(init.code, Some(0), "{init:?}");
    let shares = init.shares();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&b.addr, &ca, &admin)["initialized"] != true {
        assert!(
            Instant::now() < deadline,
            "B did not take up A's init: {}",
            status(&b.addr, &ca, &admin)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = run_kms_tls(
        &b.addr,
        &ca,
        Some(&admin),
        &[
            "operator",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--json",
        ],
        "",
    );
    assert_ne!(again.code, Some(0), "{again:?}");
    assert!(again.stderr.contains("FAILED_PRECONDITION"), "{again:?}");
    for s in [&a, &b] {
        assert_eq!(status(&s.addr, &ca, &admin)["sealed"], true);
        unseal(&s.addr, &ca, &custodian, &shares);
        assert_eq!(status(&s.addr, &ca, &admin)["sealed"], false);
    }
    let mut keys =
        softhsm_tests::KeysClient::new(try_channel(&a.addr, &ca, Some(&admin)).await.unwrap());
    keys.create_key(pb::CreateKeyRequest {
        name: "payments".into(),
        algorithm: pb::Algorithm::Aes256Gcm as i32,
        protection_level: pb::ProtectionLevel::Hsm as i32,
        rotation_period_seconds: 0,
        labels: Default::default(),
        origin: 0,
    })
    .await
    .unwrap();
    let mut access =
        softhsm_tests::AccessClient::new(try_channel(&a.addr, &ca, Some(&admin)).await.unwrap());
    access
        .create_grant(pb::CreateGrantRequest {
            key: "payments".into(),
            principal: service.principal.clone(),
            operations: vec![pb::Operation::Encrypt as i32, pb::Operation::Decrypt as i32],
            associated_data: None,
        })
        .await
        .unwrap();
    let mut on_a =
        softhsm_tests::KeysClient::new(try_channel(&a.addr, &ca, Some(&service)).await.unwrap());
    let mut on_b =
        softhsm_tests::KeysClient::new(try_channel(&b.addr, &ca, Some(&service)).await.unwrap());
    let ct = softhsm_tests::encrypt_ctx(&mut on_a, "payments", b"set up as documented")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pt = loop {
        match softhsm_tests::decrypt_ctx(&mut on_b, "payments", &ct).await {
            Ok(pt) => break pt,
            Err(e) => {
                assert!(Instant::now() < deadline, "B cannot decrypt: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(pt, b"set up as documented");
    let verify = run_kms_tls(&b.addr, &ca, Some(&auditor), &["audit", "verify"], "");
    assert_eq!(verify.code, Some(0), "{verify:?}");
    // And the server's data is where the page put it: in PostgreSQL, over TLS.
    let tables = pg.sql_in("kms", "SELECT count(*) FROM kms_keys");
    assert_eq!(tables.trim(), "1", "{tables}");
    let tls = pg.sql("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'kms'");
    assert_eq!(tls.trim(), "t", "{tls}");
}
