//! The harness of the end-to-end tests: a private SoftHSM token per test, and the real
//! `kms` binary run as a server and as a CLI against it.
//!
//! Each [`TestHsm`] has its own temporary directory with its own `SOFTHSM2_CONF` and token
//! directory, so tests run in parallel and never touch the system's tokens. The token is
//! made by the `hsm-tool` helper binary (cryptoki directly). Servers listen on 127.0.0.1
//! port 0 and print the port they got.
//!
//! The `kms` binary must be built first (`cargo build -p kms-cli`; scripts/test does it): the
//! harness finds it next to the test executable's directory, as cargo lays them out.

#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kms_pkcs11_conf::softhsm::{CONF_ENV, SoftHsmDir};

pub mod pg;
pub mod pki;

pub use pki::{ClientSpec, Cred, Pki, spiffe};

/// Writes a file only its owner can read and write (0600), as a server's config and TLS
/// key must be: the server refuses a config others can read or its group can write, and a
/// TLS key others can read. A file that existed is made 0600 too.
pub fn write_private(path: &Path, text: impl AsRef<[u8]>) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The path of a binary built by cargo into the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test>-<hash> -> target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p kms-cli -p softhsm-tests --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// The SoftHSM module; the tests fail (not skip) when it is missing.
pub fn softhsm_module() -> PathBuf {
    kms_pkcs11_conf::find_softhsm_module()
        .expect("SoftHSM is not installed: apt-get install softhsm2 (scripts/test installs it)")
}

/// The second PKCS#11 module, kryoptic (docs/hsm.md), as `scripts/test` builds it and names
/// it in `KMS_TEST_KRYOPTIC`; the tests that need it fail (not skip) without it.
pub fn kryoptic_module() -> PathBuf {
    let path = std::env::var_os("KMS_TEST_KRYOPTIC").map(PathBuf::from).expect(
        "KMS_TEST_KRYOPTIC is not set: scripts/test builds kryoptic (scripts/lib.sh ensure_kryoptic) and sets it",
    );
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// Which PKCS#11 module a [`TestHsm`] runs.
pub enum Module {
    /// SoftHSM 2 (Debian's softhsm2).
    SoftHsm,
    /// Kryoptic, at this path ([`kryoptic_module`]).
    Kryoptic(PathBuf),
}

/// A private token store with one token, of SoftHSM or another module.
pub struct TestHsm {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The variable that names the module's configuration (`SOFTHSM2_CONF`,
    /// `KRYOPTIC_CONF`).
    pub conf_env: &'static str,
    /// The module's configuration file.
    pub conf: PathBuf,
    /// The module.
    pub module: PathBuf,
    /// The token label.
    pub label: String,
    /// The user PIN.
    pub pin: String,
    /// A 0600 file holding the user PIN.
    pub pin_file: PathBuf,
    /// The test CA, which signs the server's certificate and the clients'.
    pub pki: Pki,
    /// A client holding the admin role (`spiffe://test.kms/admin`).
    pub admin: Cred,
    /// A client holding the auditor role (`spiffe://test.kms/auditor`).
    pub auditor: Cred,
    /// A key custodian's client (`spiffe://test.kms/custodian`): unseals.
    pub custodian: Cred,
}

impl TestHsm {
    /// Makes a SoftHSM token store and a token labelled `label` with a random user PIN.
    pub fn new(label: &str) -> Self {
        Self::with_module(label, Module::SoftHsm)
    }

    /// Makes a token store of `module` and a token labelled `label` with a random user PIN.
    pub fn with_module(label: &str, module: Module) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kms-test-")
            .tempdir()
            .unwrap();
        let (conf, conf_env, module) = match module {
            Module::SoftHsm => (
                SoftHsmDir::create(&dir.path().join("softhsm"))
                    .unwrap()
                    .conf,
                CONF_ENV,
                softhsm_module(),
            ),
            Module::Kryoptic(path) => {
                // One slot, its token in a SQLite file of this directory.
                let conf = dir.path().join("kryoptic.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
                        dir.path().join("kryoptic.sql").display()
                    ),
                )
                .unwrap();
                (conf, "KRYOPTIC_CONF", path)
            }
        };
        let pin = {
            use secrecy::ExposeSecret;
            kms_pkcs11_conf::softhsm::random_pin()
                .unwrap()
                .expose_secret()
                .to_owned()
        };
        let pin_file = dir.path().join("hsm-pin");
        std::fs::write(&pin_file, &pin).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pki = Pki::new(&dir.path().join("tls"), "kms");
        let admin = pki.client("admin", &ClientSpec::spiffe("admin"));
        let auditor = pki.client("auditor", &ClientSpec::spiffe("auditor"));
        let custodian = pki.client("custodian", &ClientSpec::spiffe("custodian"));
        let hsm = Self {
            dir,
            conf_env,
            conf,
            module,
            label: label.to_owned(),
            pin,
            pin_file,
            pki,
            admin,
            auditor,
            custodian,
        };
        let out = hsm.tool(&["provision"], &[]);
        assert!(
            out.status.success(),
            "provisioning failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        hsm
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `hsm-tool CMD MODULE LABEL PIN_FILE EXTRA...`.
    pub fn tool(&self, cmd: &[&str], extra: &[&str]) -> std::process::Output {
        Command::new(bin("hsm-tool"))
            .args(cmd)
            .arg(&self.module)
            .arg(&self.label)
            .arg(&self.pin_file)
            .args(extra)
            .env(self.conf_env, &self.conf)
            .output()
            .unwrap()
    }

    /// Every token object whose label starts with `prefix`, as `(label, CKA_ID in hex)`,
    /// sorted (`hsm-tool ids`: the token's own answer).
    pub fn ids(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.tool(&["ids"], &[prefix]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut ids: Vec<(String, String)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (label, id) = l.rsplit_once(' ').unwrap();
                (label.to_owned(), id.to_owned())
            })
            .collect();
        ids.sort();
        ids
    }

    /// Every token object as OpenSC's `pkcs11-tool --list-objects` reports it (a PKCS#11
    /// client that shares no code with kms), as `(label, CKA_ID in hex)`, sorted: the same
    /// shape as [`TestHsm::ids`].
    pub fn pkcs11_tool_objects(&self) -> Vec<(String, String)> {
        let pin = std::fs::read_to_string(&self.pin_file).unwrap();
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", &self.label, "--login", "--pin", pin.trim()])
            .arg("--list-objects")
            .env(self.conf_env, &self.conf)
            .output()
            .expect("pkcs11-tool (Debian's opensc; scripts/test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each object starts with a line `... Object; ...`, then `label:` and `ID:` lines.
        let mut objects = Vec::new();
        let mut current: Option<(String, String)> = None;
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            if line.contains("Object;") {
                objects.extend(current.replace((String::new(), String::new())));
            } else if let Some((label, id)) = current.as_mut() {
                let line = line.trim();
                if let Some(l) = line.strip_prefix("label:") {
                    *label = l.trim().to_owned();
                } else if let Some(i) = line.strip_prefix("ID:") {
                    *id = i.trim().to_ascii_lowercase();
                }
            }
        }
        objects.extend(current);
        objects.sort();
        objects
    }

    /// A proof from the token itself of which key is the audit checkpoint key: a fresh
    /// random challenge signed (Ed25519, `CKM_EDDSA`) with the token's one private key
    /// labelled `<master key label>-audit-<share set id>` (docs/audit.md), by OpenSC's
    /// `pkcs11-tool` (no kms code). kms keeps no public object on the token (the public half
    /// is read and destroyed at generation), so an auditor holding the PIN proves the key
    /// this way: a public key that verifies this signature is the token's key, whatever an
    /// export claims. `share_set` picks one when the token holds several.
    pub fn audit_key_proof(&self, share_set: Option<&str>) -> TokenProof {
        let pin = std::fs::read_to_string(&self.pin_file).unwrap();
        let pkcs11_tool = |args: &[&str]| {
            let out = Command::new("pkcs11-tool")
                .arg("--module")
                .arg(&self.module)
                .args(["--token-label", &self.label, "--login", "--pin", pin.trim()])
                .args(args)
                .env(self.conf_env, &self.conf)
                .output()
                .expect("pkcs11-tool (Debian's opensc; scripts/test installs it)");
            assert!(
                out.status.success(),
                "pkcs11-tool {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let listing = pkcs11_tool(&["--list-objects", "--type", "privkey"]);
        let labels: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:"))
            .map(str::trim)
            .filter(|l| l.contains("-audit-") && share_set.is_none_or(|s| l.ends_with(s)))
            .collect();
        let [label] = labels[..] else {
            panic!("not exactly one audit private key on the token: {labels:?}\n{listing}");
        };
        let mut nonce = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").unwrap(),
            &mut nonce,
        )
        .unwrap();
        let proof = TokenProof {
            challenge: self.path().join(format!("{label}.challenge")),
            signature: self.path().join(format!("{label}.sig")),
        };
        std::fs::write(&proof.challenge, nonce).unwrap();
        pkcs11_tool(&[
            "--sign",
            "--mechanism",
            "EDDSA",
            "--type",
            "privkey",
            "--label",
            label,
            "--input-file",
            proof.challenge.to_str().unwrap(),
            "--output-file",
            proof.signature.to_str().unwrap(),
        ]);
        proof
    }

    /// HMAC-SHA256 of `data` with the token's secret key labelled `key` (`hsm-tool hmac`),
    /// in hex: what an insider holding the PIN can compute.
    pub fn hmac(&self, key: &str, data: &[u8]) -> String {
        let mut child = Command::new(bin("hsm-tool"))
            .args(["hmac"])
            .arg(&self.module)
            .arg(&self.label)
            .arg(&self.pin_file)
            .arg(key)
            .env(self.conf_env, &self.conf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The labels of the token's objects whose label starts with `prefix` (`hsm-tool list`).
    pub fn labels(&self, prefix: &str) -> Vec<String> {
        let out = self.tool(&["list"], &[prefix]);
        assert!(
            out.status.success(),
            "hsm-tool list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// How many of the token's objects have a label that starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.labels(prefix).len()
    }

    /// The master key's attributes as the token reports them (via `hsm-tool inspect`).
    pub fn inspect_key(&self, key_label: &str) -> serde_json::Value {
        let out = self.tool(&["inspect"], &[key_label]);
        assert!(
            out.status.success(),
            "inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every secret and private key of the token whose label starts with `prefix`, with
    /// its attributes as the token reports them (`hsm-tool inspect-all`): `label`, `class`
    /// (`secret` or `private`), `sensitive`, `always_sensitive`, `extractable`,
    /// `never_extractable`, `token`, `private`, `modifiable`, `derive`, `wrap`, ...
    pub fn inspect_all(&self, prefix: &str) -> Vec<serde_json::Value> {
        let out = self.tool(&["inspect-all"], &[prefix]);
        assert!(
            out.status.success(),
            "inspect-all failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Writes a config file `name` whose `[hsm]` table is `hsm_table` (use
    /// [`TestHsm::hsm_table`] for the normal one) and returns its path.
    pub fn config_with(&self, name: &str, hsm_table: &str) -> PathBuf {
        self.config_full(name, hsm_table, "")
    }

    /// As [`TestHsm::config_with`], with more TOML after the `[hsm]` table (e.g. a
    /// `[keyring]` table). Unless `extra` has its own `[tls]` table, the server gets
    /// [`TestHsm::tls_tables`].
    pub fn config_full(&self, name: &str, hsm_table: &str, extra: &str) -> PathBuf {
        let path = self.path().join(name);
        let tls = if extra.contains("[tls]") {
            String::new()
        } else {
            self.tls_tables()
        };
        // A `[storage]` table in `extra` (PostgreSQL) replaces the default redb file.
        let storage = if extra.contains("[storage]") {
            String::new()
        } else {
            format!(
                "[storage]\npath = \"{}\"\n",
                self.path().join("kms.redb").display()
            )
        };
        let text =
            format!("listen = \"127.0.0.1:0\"\n{storage}[hsm]\n{hsm_table}\n{extra}\n{tls}\n");
        write_private(&path, text);
        path
    }

    /// The normal `[tls]`, `[roles]`, `[unseal]` and `[limits]` tables: the test CA's
    /// server certificate, client certificates from the test CA, admin, auditor and
    /// custodian roles for the harness's clients, lenient limits on failed unseal shares and
    /// refused calls (tests refuse many calls on purpose from one address; access.rs and
    /// hardening.rs test the limits).
    pub fn tls_tables(&self) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nreload_check_seconds = 1\n\
             [roles]\nadmin = [\"{}\"]\nauditor = [\"{}\"]\ncustodian = [\"{}\"]\n\
             [unseal]\nmax_failed_shares = 1000\n\
             [limits]\nrefused_calls_per_minute = 100000\n",
            self.pki.server.cert.display(),
            self.pki.server.key.display(),
            self.pki.ca.display(),
            self.admin.principal,
            self.auditor.principal,
            self.custodian.principal,
        )
    }

    /// The normal `[hsm]` table: this token, PIN from the file.
    pub fn hsm_table(&self) -> String {
        self.hsm_table_with(
            &self.module.display().to_string(),
            &self.label,
            &format!("pin_file = \"{}\"", self.pin_file.display()),
        )
    }

    /// An `[hsm]` table with the given module, token label, and PIN line (e.g.
    /// `pin_env = "X"`).
    pub fn hsm_table_with(&self, module: &str, label: &str, pin_line: &str) -> String {
        format!("module = \"{module}\"\ntoken_label = \"{label}\"\n{pin_line}\n")
    }

    /// The normal config.
    pub fn config(&self) -> PathBuf {
        self.config_with("kms.toml", &self.hsm_table())
    }

    /// The server log file (standard error of every server started here, appended).
    pub fn log_path(&self) -> PathBuf {
        self.path().join("server.log")
    }

    /// The server logs so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `kms server --config CONFIG` and waits until it listens.
    pub fn start(&self) -> Server {
        self.try_start(&self.config(), &[])
            .unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Starts the server with a given config and extra environment; `Err` carries its
    /// exit status and standard error when it exits instead of listening.
    pub fn try_start(&self, config: &Path, env: &[(&str, &str)]) -> Result<Server, String> {
        self.start_command(self.server_command(config, env))
    }

    /// As [`TestHsm::try_start`], with the server's open-file limit (`RLIMIT_NOFILE`) set
    /// to `soft` and `hard` before it starts (by util-linux's `prlimit`, which then runs
    /// the server in its own process), as a service manager sets it (systemd's default soft
    /// limit is 1024).
    pub fn try_start_with_open_files(
        &self,
        config: &Path,
        soft: u64,
        hard: u64,
    ) -> Result<Server, String> {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={soft}:{hard}"));
        self.start_under(config, cmd)
    }

    /// As [`TestHsm::try_start`], as user and group `uid` with no supplementary groups (by
    /// util-linux's `setpriv`), as a service manager starts a server under its own user.
    /// The caller makes the files the server reads that user's.
    pub fn try_start_as(&self, config: &Path, uid: u32) -> Result<Server, String> {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups");
        self.start_under(config, cmd)
    }

    /// Starts the server of `config` as the last arguments of `wrapper` (a command that
    /// runs another: `prlimit`, `setpriv`), with the server's environment.
    fn start_under(&self, config: &Path, mut wrapper: Command) -> Result<Server, String> {
        let kms = self.server_command(config, &[]);
        wrapper
            .arg("--")
            .arg(kms.get_program())
            .args(kms.get_args())
            .envs(
                kms.get_envs()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
            )
            .stdin(Stdio::null());
        self.start_command(wrapper)
    }

    fn start_command(&self, mut command: Command) -> Result<Server, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("kms listening on ") || line.starts_with("kms metrics on ") {
                    let _ = tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut metrics = None;
        let addr = loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                if let Some(url) = line.strip_prefix("kms metrics on ") {
                    metrics = Some(url.to_owned());
                    continue;
                }
                break line.trim_start_matches("kms listening on ").to_owned();
            }
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("exited with {status}: {}", self.logs()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("did not listen within 30 s: {}", self.logs()));
            }
        };
        Ok(Server {
            child: Some(child),
            addr: format!("https://{addr}"),
            metrics,
            ca: self.pki.ca.clone(),
            admin: self.admin.clone(),
            auditor: self.auditor.clone(),
            custodian: self.custodian.clone(),
        })
    }

    /// Runs the server expecting it to fail at start-up; returns (exit status, its stderr).
    pub fn start_failure(&self, config: &Path, env: &[(&str, &str)]) -> (ExitStatus, String) {
        let out = self.server_command(config, env).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, stderr)
    }

    /// `kms server --config CONFIG` with this token store's `SOFTHSM2_CONF` and `env`.
    fn server_command(&self, config: &Path, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(bin("kms"));
        cmd.arg("server")
            .arg("--config")
            .arg(config)
            .env(self.conf_env, &self.conf)
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        cmd
    }
}

/// Starts a server with `config`, initialises it (3 shares, threshold 2) and unseals it.
/// Returns the server and the shares.
pub fn start_unsealed(hsm: &TestHsm, config: &Path) -> (Server, Vec<String>) {
    let server = hsm
        .try_start(config, &[])
        .unwrap_or_else(|e| panic!("server did not start: {e}"));
    let out = server.init(3, 2, "");
    assert_eq!(out.code, Some(0), "{out:?}");
    let shares = out.shares();
    server.unseal_with(&shares);
    (server, shares)
}

/// Starts a server with the HTTPS front on a free port of 127.0.0.1 (`extra`: more lines
/// of the `[http]` table, then any other tables), initialised and unsealed as
/// [`start_unsealed`]. Returns the server, the shares and the HTTPS front's port.
pub fn start_with_http(hsm: &TestHsm, extra: &str) -> (Server, Vec<String>, u16) {
    let port = free_port();
    let config = hsm.config_full(
        "kms.toml",
        &hsm.hsm_table(),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}"),
    );
    let (server, shares) = start_unsealed(hsm, &config);
    (server, shares, port)
}

/// A gRPC client of `kms.v1.KeyManagement`.
pub type KeysClient =
    kms_proto::v1::key_management_client::KeyManagementClient<tonic::transport::Channel>;

/// A running `kms server`. Killed on drop.
pub struct Server {
    child: Option<Child>,
    /// `https://127.0.0.1:PORT`.
    pub addr: String,
    /// `http://127.0.0.1:PORT/metrics`, when `[metrics] listen` is set.
    pub metrics: Option<String>,
    /// The CA of the server's certificate.
    pub ca: PathBuf,
    /// The harness's admin client.
    pub admin: Cred,
    /// The harness's auditor client.
    pub auditor: Cred,
    /// The harness's key custodian client.
    pub custodian: Cred,
}

/// Encrypts `pt` under `key` with the associated data `ctx`; the ciphertext.
pub async fn encrypt_ctx(
    c: &mut KeysClient,
    key: &str,
    pt: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    c.encrypt(kms_proto::v1::EncryptRequest {
        key: key.into(),
        plaintext: pt.to_vec(),
        associated_data: b"ctx".to_vec(),
    })
    .await
    .map(|r| r.into_inner().ciphertext)
}

/// Decrypts what [`encrypt_ctx`] made; the plaintext.
pub async fn decrypt_ctx(
    c: &mut KeysClient,
    key: &str,
    ct: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(kms_proto::v1::DecryptRequest {
        key: key.into(),
        ciphertext: ct.to_vec(),
        associated_data: b"ctx".to_vec(),
    })
    .await
    .map(|r| r.into_inner().plaintext)
}

/// A gRPC client of `kms.v1.Access`.
pub type AccessClient = kms_proto::v1::access_client::AccessClient<tonic::transport::Channel>;

/// Connects to `addr` over TLS trusting `ca`, presenting `cred` if given.
pub async fn try_channel(
    addr: &str,
    ca: &Path,
    cred: Option<&Cred>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    try_channel_from(addr, ca, cred, None).await
}

/// As [`try_channel`], from the local address `from` (e.g. 127.0.0.2, so that a test can
/// be a stranger at another address than the harness's clients on the loopback).
pub async fn try_channel_from(
    addr: &str,
    ca: &Path,
    cred: Option<&Cred>,
    from: Option<std::net::IpAddr>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(c) = cred {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&c.cert).unwrap(),
            std::fs::read(&c.key).unwrap(),
        ));
    }
    tonic::transport::Channel::from_shared(addr.to_owned())
        .unwrap()
        .tls_config(tls)?
        .local_address(from)
        .connect()
        .await
}

/// Runs `store-tool CMD STORE ARGS...`, which edits the store offline as someone with disk
/// access would; its standard output.
fn store_tool(cmd: &str, store: &Path, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(bin("store-tool"))
        .arg(cmd)
        .arg(store)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Replaces the first occurrence of `from` with `to` in one stored value (`store-tool
/// replace`; `from` must occur).
pub fn store_replace(store: &Path, table: &str, key: &str, from: &str, to: &str) {
    store_tool(
        "replace",
        store,
        &[table.as_ref(), key.as_ref(), from.as_ref(), to.as_ref()],
    );
}

/// One stored value (`store-tool get`).
pub fn store_get(store: &Path, table: &str, key: &str) -> Vec<u8> {
    store_tool("get", store, &[table.as_ref(), key.as_ref()])
}

/// Stores `value` as one entry (`store-tool put`).
pub fn store_put(store: &Path, table: &str, key: &str, value: &[u8]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), value).unwrap();
    store_tool(
        "put",
        store,
        &[table.as_ref(), key.as_ref(), file.path().as_os_str()],
    );
}

/// Removes one entry (`store-tool delete`).
pub fn store_delete(store: &Path, table: &str, key: &str) {
    store_tool("delete", store, &[table.as_ref(), key.as_ref()]);
}

/// The state of version `version` of the key `name`, as `GetKey` says.
pub async fn version_state(c: &mut KeysClient, name: &str, version: u32) -> i32 {
    c.get_key(kms_proto::v1::GetKeyRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .versions
        .iter()
        .find(|v| v.version == version)
        .unwrap()
        .state
}

/// What a CLI run printed.
#[derive(Debug, Clone)]
pub struct Out {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// The shares printed by `kms operator init --json`.
    pub fn shares(&self) -> Vec<String> {
        self.json()["shares"]
            .as_array()
            .unwrap_or_else(|| panic!("no shares: {self:?}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    }

    /// Standard output as JSON lines (one value per line), after checking the exit code
    /// was 0.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        assert_eq!(self.code, Some(0), "{self:?}");
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Standard output parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// The strings of a JSON array (shares in `kms` JSON output).
pub fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// Every CLI output seen by the tests, for the final "no secret anywhere" grep.
pub static TRANSCRIPT: Mutex<String> = Mutex::new(String::new());

impl Server {
    /// Unseals with the first two of `shares`, as the custodian.
    pub fn unseal_with(&self, shares: &[String]) {
        let out = self.custodian(
            &["operator", "unseal"],
            &format!("{}\n{}\n", shares[0], shares[1]),
        );
        assert_eq!(out.code, Some(0), "unseal: {out:?}");
    }

    /// Runs `kms ARGS` as the key custodian (unseal, reset).
    pub fn custodian(&self, args: &[&str], stdin: &str) -> Out {
        self.kms_as(Some(&self.custodian), args, stdin)
    }

    /// A channel to this server over mTLS as `cred` (`None`: TLS without a client
    /// certificate).
    pub async fn channel(&self, cred: Option<&Cred>) -> tonic::transport::Channel {
        try_channel(&self.addr, &self.ca, cred)
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e:?}"))
    }

    /// A gRPC client of the key management service, as the admin (who also gets grants
    /// from [`Server::grant_all`]).
    pub async fn keys(&self) -> KeysClient {
        self.keys_as(Some(&self.admin)).await
    }

    /// A gRPC client of the key management service as `cred`.
    pub async fn keys_as(&self, cred: Option<&Cred>) -> KeysClient {
        KeysClient::new(self.channel(cred).await).max_decoding_message_size(64 << 20)
    }

    /// Creates each key `(name, algorithm, protection level)` as the admin.
    pub async fn create_keys(
        &self,
        keys: &[(
            &str,
            kms_proto::v1::Algorithm,
            kms_proto::v1::ProtectionLevel,
        )],
    ) {
        let mut client = self.keys().await;
        for (name, algorithm, protection) in keys {
            client
                .create_key(kms_proto::v1::CreateKeyRequest {
                    name: (*name).into(),
                    algorithm: *algorithm as i32,
                    protection_level: *protection as i32,
                    ..kms_proto::v1::CreateKeyRequest::default()
                })
                .await
                .unwrap_or_else(|e| panic!("key {name} not created: {e:?}"));
        }
    }

    /// A gRPC client of the access service as the admin.
    pub async fn access(&self) -> AccessClient {
        AccessClient::new(self.channel(Some(&self.admin)).await)
    }

    /// Grants `principal` every operation on `key` (as the admin); returns the grant id.
    pub async fn grant(&self, key: &str, principal: &str) -> String {
        use kms_proto::v1 as pb;
        // Every operation but the deprecated OPERATION_REENCRYPT (3), which allows nothing.
        let operations = (1..=11).filter(|o| *o != 3).collect();
        self.access()
            .await
            .create_grant(pb::CreateGrantRequest {
                key: key.to_owned(),
                principal: principal.to_owned(),
                operations,
                associated_data: None,
            })
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// Creates an AES-256-GCM key at `protection` as the admin, and grants the admin every
    /// operation on it.
    pub async fn create_aes_key(&self, name: &str, protection: kms_proto::v1::ProtectionLevel) {
        self.create_key_of(name, kms_proto::v1::Algorithm::Aes256Gcm, protection)
            .await;
    }

    /// Creates a key of `algorithm` at `protection` as the admin, and grants the admin every
    /// operation on it.
    pub async fn create_key_of(
        &self,
        name: &str,
        algorithm: kms_proto::v1::Algorithm,
        protection: kms_proto::v1::ProtectionLevel,
    ) -> kms_proto::v1::Key {
        let key = self
            .keys()
            .await
            .create_key(kms_proto::v1::CreateKeyRequest {
                name: name.into(),
                algorithm: algorithm as i32,
                protection_level: protection as i32,
                rotation_period_seconds: 0,
                labels: Default::default(),
                origin: 0,
            })
            .await
            .unwrap()
            .into_inner();
        self.grant_all(name).await;
        key
    }

    /// Grants the harness's admin client every operation on `key`.
    pub async fn grant_all(&self, key: &str) -> String {
        self.grant(key, &self.admin.principal.clone()).await
    }

    /// Runs `kms ARGS` against this server as the admin, with `stdin` as standard input.
    pub fn kms(&self, args: &[&str], stdin: &str) -> Out {
        self.kms_as(Some(&self.admin), args, stdin)
    }

    /// Runs `kms ARGS` as `cred` (`None`: TLS without a client certificate).
    pub fn kms_as(&self, cred: Option<&Cred>, args: &[&str], stdin: &str) -> Out {
        run_kms_tls(&self.addr, &self.ca, cred, args, stdin)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        sigterm(&child).unwrap();
        child.wait().unwrap()
    }

    /// Runs `kms operator init --shares N --threshold T --json` with `stdin` (the HSM PIN
    /// when the server keeps it in the shares).
    pub fn init(&self, shares: u32, threshold: u32, stdin: &str) -> Out {
        let (n, t) = (shares.to_string(), threshold.to_string());
        self.kms(
            &[
                "operator",
                "init",
                "--shares",
                &n,
                "--threshold",
                &t,
                "--json",
            ],
            stdin,
        )
    }

    /// `kms operator rekey init --shares N --threshold T` as the admin.
    pub fn rekey_init(&self, shares: u32, threshold: u32) -> Out {
        let (n, t) = (shares.to_string(), threshold.to_string());
        self.kms(
            &[
                "operator",
                "rekey",
                "init",
                "--shares",
                &n,
                "--threshold",
                &t,
            ],
            "",
        )
    }

    /// `kms operator rekey submit --json` as the custodian, one share a line.
    pub fn rekey_submit<S: AsRef<str>>(&self, shares: &[S]) -> Out {
        let stdin: String = shares.iter().map(|s| format!("{}\n", s.as_ref())).collect();
        self.custodian(&["operator", "rekey", "submit", "--json"], &stdin)
    }

    /// Sends SIGHUP (reload the TLS files).
    pub fn sighup(&self) {
        signal(self.child.as_ref().unwrap(), rustix::process::Signal::HUP).unwrap();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the server with SIGKILL (`kill -9`): no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM to a child process (through kill(2): no `kill` binary needed).
pub fn sigterm(child: &Child) -> std::io::Result<()> {
    signal(child, rustix::process::Signal::TERM)
}

/// Sends `sig` to a child process.
fn signal(child: &Child, sig: rustix::process::Signal) -> std::io::Result<()> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other("bad pid"))?;
    rustix::process::kill_process(pid, sig).map_err(std::io::Error::from)
}

/// Runs `kms ARGS` with `KMS_ADDR=addr`, over TLS trusting `ca` as `cred`.
pub fn run_kms_tls(addr: &str, ca: &Path, cred: Option<&Cred>, args: &[&str], stdin: &str) -> Out {
    let mut env = vec![("KMS_CACERT", ca.to_owned())];
    if let Some(c) = cred {
        env.push(("KMS_CLIENT_CERT", c.cert.clone()));
        env.push(("KMS_CLIENT_KEY", c.key.clone()));
    }
    run_kms_env(addr, &env, args, stdin)
}

/// Runs `kms ARGS` with `KMS_ADDR=addr` and no TLS files.
pub fn run_kms(addr: &str, args: &[&str], stdin: &str) -> Out {
    run_kms_env(addr, &[], args, stdin)
}

/// Runs `kms ARGS` with `KMS_ADDR=addr` and `env` (any `KMS_*` of the test's own
/// environment removed).
pub fn run_kms_env(addr: &str, env: &[(&str, PathBuf)], args: &[&str], stdin: &str) -> Out {
    let mut child = Command::new(bin("kms"))
        .args(args)
        .env_remove("KMS_CACERT")
        .env_remove("KMS_CLIENT_CERT")
        .env_remove("KMS_CLIENT_KEY")
        .env("KMS_ADDR", addr)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The CLI may exit before it reads its input (a bad address, say): a closed pipe is
    // then its answer, not the harness's failure.
    match input.write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let out = Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // Record what a user would see, except the output of `init` (which shows the shares
    // by design) and of the shares fed in.
    if args.get(1) != Some(&"init") {
        let mut t = TRANSCRIPT.lock().unwrap_or_else(|p| p.into_inner());
        t.push_str(&out.stdout);
        t.push_str(&out.stderr);
    }
    out
}

/// Alters one byte of a share's secret part and recomputes its checksum, as the share
/// format (docs/ceremony.md) defines it: the result parses as a valid share of the same set
/// but recombines to a wrong key.
pub fn forge_share(share: &str) -> String {
    use sha2::Digest;
    let body: String = share
        .trim()
        .strip_prefix("kms1-")
        .unwrap()
        .chars()
        .filter(|c| *c != '-')
        .collect();
    let mut raw = data_encoding::BASE32_NOPAD.decode(body.as_bytes()).unwrap();
    let n = raw.len();
    raw.truncate(n - 4);
    raw[11] ^= 0x01; // the first byte after version(1) | set(8) | threshold(1) | index(1)
    let digest = sha2::Sha256::new()
        .chain_update(b"kms-share-v1")
        .chain_update(&raw)
        .finalize();
    raw.extend_from_slice(&digest[..4]);
    let encoded = data_encoding::BASE32_NOPAD.encode(&raw);
    format!("kms1-{encoded}")
}

/// `GET url` (plain `http://HOST:PORT/PATH`) with HTTP/1.0, as an independent client would:
/// the status code and the body.
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// A free port on 127.0.0.1 (bound and released: for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Python interpreter with the gRPC packages (grpcio-tools, grpcio-health-checking,
/// grpcio-reflection): `KMS_TEST_PYTHON`, else the virtual environment `target/pyenv` that
/// scripts/test makes. Panics (the test fails, never skips) when neither is there.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KMS_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python3");
    assert!(
        venv.is_file(),
        "no Python with the gRPC packages: run scripts/test (it makes target/pyenv), or set KMS_TEST_PYTHON"
    );
    venv
}

/// Runs a phase of a Python client script beside the tests (`tests/SCRIPT`) with `config`
/// as its JSON argument, under [`python`]; its one JSON line of output. Fails the test when
/// the script exits non-zero (its asserts), with what it printed.
pub fn python_phase(script: &str, phase: &str, config: &serde_json::Value) -> serde_json::Value {
    python_phase_under(Command::new(python()), script, phase, config)
}

/// As [`python_phase`], with `interpreter` the command that runs the script (the
/// interpreter itself, or a command that runs it as another user: `setpriv ... PYTHON`).
pub fn python_phase_under(
    mut interpreter: Command,
    script: &str,
    phase: &str,
    config: &serde_json::Value,
) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = interpreter
        .arg(script)
        .arg(phase)
        .arg(config.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "phase {phase} failed: {stderr}\n{stdout}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A fresh challenge and the token's signature of it ([`TestHsm::audit_key_proof`]).
pub struct TokenProof {
    /// 32 random bytes.
    pub challenge: PathBuf,
    /// Their Ed25519 signature by the token's audit key (64 bytes).
    pub signature: PathBuf,
}

/// Runs the independent audit verifier (`softhsm-tests/audit_verify.py`, written from
/// docs/audit.md alone, sharing no code with kms) on `export` (and the archive segments in
/// `archive`), trusting only the key that the token's signature in `proof` proves. Its exit
/// code: 0 every check passed, 3 a check failed (the first failure on stderr), 2 unreadable
/// input, 1 the script crashed.
pub fn independent_audit_verify(export: &Path, archive: Option<&Path>, proof: &TokenProof) -> Out {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("audit_verify.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg("--token-challenge")
        .arg(&proof.challenge)
        .arg("--token-signature")
        .arg(&proof.signature)
        .arg(export);
    if let Some(dir) = archive {
        cmd.arg("--archive").arg(dir);
    }
    let out = cmd.output().unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exports the whole audit log of `server` (as its auditor) to `dir/name` and checks it with
/// the independent verifier under the audit key read from `hsm`'s token; fails the test
/// unless every check passes. The export's path.
pub fn audit_export_verifies_independently(server: &Server, hsm: &TestHsm, name: &str) -> PathBuf {
    let export = hsm.path().join(name);
    let out = server.kms_as(
        Some(&server.auditor),
        &["audit", "export", "--out", export.to_str().unwrap()],
        "",
    );
    assert_eq!(out.code, Some(0), "kms audit export: {out:?}");
    let proof = hsm.audit_key_proof(None);
    let out = independent_audit_verify(&export, None, &proof);
    assert_eq!(out.code, Some(0), "the independent audit verifier: {out:?}");
    assert!(out.stdout.starts_with("OK: records 1.."), "{out:?}");
    export
}

/// Generates the Python client (`*_pb2.py`, `*_pb2_grpc.py`) from proto/ into `dir` with
/// grpcio-tools' protoc, as docs/api.md tells a developer to.
pub fn python_stubs(dir: &Path) {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto.join("kms/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    python_stubs_of(dir, &proto, &files);
}

/// Generates the Python client of `files` (under the include root `proto`) into `dir` with
/// grpcio-tools' protoc.
pub fn python_stubs_of(dir: &Path, proto: &Path, files: &[PathBuf]) {
    let out = Command::new(python())
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.display()))
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "protoc (grpcio-tools) refused the .proto files:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path of a cargo example built into the same target directory as the running test
/// (`cargo build -p CRATE --examples`; scripts/test does).
pub fn example(name: &str) -> PathBuf {
    let path = bin("kms").with_file_name("examples").join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p kms-proto --examples` first (scripts/test does)",
        path.display()
    );
    path
}

/// Asserts `r` failed with `code` and a message containing `text`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code, text: &str) {
    let e = r.expect_err("expected an error");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(text),
        "{:?} does not contain {text:?}",
        e.message()
    );
}

/// A tmpfs mounted for one test, unmounted when dropped (the tests run as root, as CI
/// does).
pub struct Mount(PathBuf);

impl Mount {
    /// Mounts a tmpfs of `size` (`16m`) at `path`, made if missing.
    pub fn tmpfs(path: &Path, size: &str) -> Self {
        Self::with_options(path, &format!("size={size}"))
    }

    /// Mounts a tmpfs with mount `options` (`ro,size=1m`) at `path`, made if missing. Its
    /// root is 0700 (`mode=0700`): a tmpfs's root is 1777 by default, and the server
    /// refuses a store in a directory everyone can write.
    pub fn with_options(path: &Path, options: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("mode=0700,{options}"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(path.to_owned())
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Fills it: writes until the file system refuses more.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `age-keygen -o FILE`: the identity file; returns its recipient (`age1...`).
pub fn age_identity(path: &Path) -> String {
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(path)
        .output()
        .expect("age-keygen (Debian package age)");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `age --decrypt -i IDENTITY FILE`, as a custodian runs it.
pub fn age_decrypt(identity: &Path, file: &Path) -> Result<String, String> {
    let out = Command::new("age")
        .arg("--decrypt")
        .arg("-i")
        .arg(identity)
        .arg(file)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A unary gRPC call as raw HTTP/2 over mTLS as `cred`: `message` (an encoded protobuf) to
/// `path` (`/kms.v1.KeyManagement/RotateKey`) with `headers`, sent as given (tonic's client
/// would enforce a `grpc-timeout` itself, and answer for the server). Returns the response's
/// headers and trailers merged (read the status with `tonic::Status::from_header_map`),
/// and its body.
pub async fn raw_unary(
    server: &Server,
    cred: &Cred,
    path: &str,
    message: Vec<u8>,
    headers: &[(&str, String)],
) -> (http::HeaderMap, Vec<u8>) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&server.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cred.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cred.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let host_port = server.addr.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&host_port).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::post(format!("https://{host_port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let (response, mut send) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    // The server may answer (and end the stream) before it reads the body.
    let _ = send.send_data(bytes::Bytes::from(framed), true);
    let response = response.await.unwrap();
    let mut merged = response.headers().clone();
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    if let Some(trailers) = body.trailers().await.unwrap() {
        merged.extend(trailers);
    }
    driver.abort();
    (merged, data)
}

/// Every form a share could leak in, as the bytes to look for: its text as given, its body
/// without the prefix and dashes, and its secret part (the y values, past the public
/// header and before the checksum) raw, in hex (both cases) and in base64. Written from
/// the share format (docs/ceremony.md: `kms1-` then base32 of version, share set id,
/// threshold, index, y, and a 4-byte checksum), not from kms's code.
pub fn share_forms(share: &str) -> Vec<(&'static str, Vec<u8>)> {
    let body: String = share
        .trim()
        .strip_prefix("kms1-")
        .unwrap_or_else(|| panic!("not a share: {share:.8}..."))
        .chars()
        .filter(|c| *c != '-')
        .collect();
    let raw = data_encoding::BASE32_NOPAD
        .decode(body.to_ascii_uppercase().as_bytes())
        .unwrap();
    let y = raw[11..raw.len() - 4].to_vec();
    assert!(y.len() >= 16, "a share's secret part: {} bytes", y.len());
    vec![
        ("text", share.trim().as_bytes().to_vec()),
        ("body without dashes", body.clone().into_bytes()),
        (
            "body without dashes, lower case",
            body.to_ascii_lowercase().into_bytes(),
        ),
        ("secret bytes", y.clone()),
        (
            "secret bytes in hex",
            data_encoding::HEXLOWER.encode(&y).into_bytes(),
        ),
        (
            "secret bytes in HEX",
            data_encoding::HEXUPPER.encode(&y).into_bytes(),
        ),
        (
            "secret bytes in base64",
            data_encoding::BASE64.encode(&y).into_bytes(),
        ),
    ]
}

/// Fails if any form of any of `shares` ([`share_forms`]) is in `haystack` (`what`).
pub fn assert_no_share_in(what: &str, haystack: &[u8], shares: &[String]) {
    for (i, share) in shares.iter().enumerate() {
        for (form, needle) in share_forms(share) {
            assert!(
                !haystack
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice()),
                "share {} ({form}) is in the {what}",
                i + 1
            );
        }
    }
}

/// Checks one key that [`TestHsm::inspect_all`] reported against kms's rules for the
/// objects it makes: sensitive, not extractable, token, private, not modifiable, no
/// derivation or wrapping, value unreadable; and, for a key generated in the token (not
/// imported: an unwrapped key's material existed outside it), always sensitive and never
/// extractable.
pub fn assert_kms_key_attributes(o: &serde_json::Value, generated: bool) {
    for (attribute, want) in [
        ("sensitive", true),
        ("extractable", false),
        ("token", true),
        ("private", true),
        ("modifiable", false),
        ("value_readable", false),
        ("always_sensitive", generated),
        ("never_extractable", generated),
    ] {
        assert_eq!(o[attribute], want, "{attribute}: {o}");
    }
    for attribute in ["derive", "wrap", "unwrap"] {
        assert_ne!(o[attribute], true, "{attribute}: {o}");
    }
}
