//! `kms dev`: the product in one command, for trying it and for development.
//!
//! It makes a private SoftHSM token store in a directory (temporary unless `--dir` is
//! given), provisions a token `kms-dev` with random SO and user PINs (the user PIN goes to
//! `DIR/hsm-pin`, mode 0600), writes `DIR/kms.toml`, initialises the server with 5 shares and
//! threshold 3, prints the shares, unseals itself with three of them, and serves on
//! loopback until Ctrl-C. It serves mTLS with a development CA and certificates it writes
//! to `DIR/tls` ([`crate::dev_pki`]) and prints the commands to use them as the admin, the
//! auditor and an application; `--plaintext` serves plaintext instead, with a warning.
//!
//! SoftHSM reads `SOFTHSM2_CONF` when the module is initialised, and changing one's own
//! environment is unsound in a threaded program. So `kms dev` writes the SoftHSM
//! configuration, then runs itself again as a child process with `SOFTHSM2_CONF` set, and
//! removes the temporary directory when the child exits.
//!
//! With `--dir` pointing at a directory used before, the token and store are reused: the
//! server comes up sealed (restarting always does) and must be unsealed with
//! `kms operator unseal` and the shares printed the first time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use kms_pkcs11_conf::softhsm::{self, SoftHsmDir};
use kms_pkcs11_conf::token::{self, TokenError};
use secrecy::ExposeSecret;

use crate::dev_pki::DevPki;
use kms::config::Config;

/// The dev token's label.
pub const DEV_TOKEN_LABEL: &str = "kms-dev";

/// `kms dev` arguments.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep the token, store and config in this directory and reuse them on the next run.
    /// Default: a temporary directory, removed on exit.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The listen address (loopback only).
    #[arg(long, default_value = "127.0.0.1:8200")]
    listen: SocketAddr,
    /// The SoftHSM module (default: the Debian package's).
    #[arg(long)]
    module: Option<PathBuf>,
    /// The Vault-compatible HTTPS front's address (Transit, docs/vault-transit.md; loopback
    /// only). Not served with --plaintext: it is mTLS only.
    #[arg(long, default_value = "127.0.0.1:8201")]
    http_listen: SocketAddr,
    /// Serve plaintext gRPC instead of mTLS (every caller is then the principal `loopback`,
    /// which holds the admin and auditor roles). Insecure; prints a warning.
    #[arg(long)]
    plaintext: bool,
    /// Set by `kms dev` for its child: the directory is temporary.
    #[arg(long, hide = true)]
    temporary: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `kms dev`.
pub fn run(args: DevArgs) -> Result<ExitCode, BoxError> {
    let module = match &args.module {
        Some(m) => m.clone(),
        None => kms_pkcs11_conf::find_softhsm_module()
            .ok_or("SoftHSM is not installed (looked in the usual places): apt-get install softhsm2, or give --module")?,
    };
    let (dir, _temp) = match &args.dir {
        Some(d) => {
            // 0700, as the temporary one: it holds the token, the PIN and the TLS keys, and
            // the server refuses a config in a directory its group can write (a umask of
            // 002 would make one).
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
            (std::path::absolute(d)?, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("kms-dev-").tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let softhsm_dir = SoftHsmDir::create(&dir.join("softhsm"))?;
    let in_child =
        std::env::var_os(softhsm::CONF_ENV).is_some_and(|v| Path::new(&v) == softhsm_dir.conf);
    if !in_child {
        let mut child = std::process::Command::new(std::env::current_exe()?);
        child
            .arg("dev")
            .arg("--dir")
            .arg(&dir)
            .arg("--listen")
            .arg(args.listen.to_string())
            .arg("--module")
            .arg(&module)
            .env(softhsm::CONF_ENV, &softhsm_dir.conf);
        if args.plaintext {
            child.arg("--plaintext");
        }
        child.arg("--http-listen").arg(args.http_listen.to_string());
        if _temp.is_some() {
            child.arg("--temporary");
        }
        let success = supervise(child)?;
        // `_temp` is removed here, after the child has stopped.
        return Ok(if success {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if !args.http_listen.ip().is_loopback() {
        return Err("--http-listen: a loopback address".into());
    }
    let http_listen = (!args.plaintext).then_some(args.http_listen);
    let config_path = prepare(&dir, &module, args.listen, args.plaintext, http_listen)?;
    let config = Config::load(&config_path)?;
    crate::show::init_logging(config.log);
    crate::rlimit::disable_core_dumps();
    crate::rlimit::raise_open_file_limit();
    let (plaintext, temporary) = (args.plaintext, args.temporary);
    kms::server::run(
        config,
        Some(Box::new(move |opened, bound| {
            bootstrap(opened, &dir, bound, &config_path, plaintext, temporary)
        })),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the child until it exits, forwarding SIGINT and SIGTERM to it so that it seals and
/// stops cleanly (and the parent can then remove the temporary directory).
fn supervise(command: std::process::Command) -> Result<bool, BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stop = kms::server::shutdown_signal();
        let mut child = tokio::process::Command::from(command).spawn()?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        tokio::select! {
            status = child.wait() => return Ok(status?.success()),
            () = stop => {}
        }
        if let Some(pid) = pid {
            // The child may have got the same SIGINT from the terminal; a second signal is
            // harmless (it is already shutting down) and a gone child is fine too.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        Ok(child.wait().await?.success())
    })
}

/// Provisions the token (first run) and writes the config. Returns the config's path.
fn prepare(
    dir: &Path,
    module: &Path,
    listen: SocketAddr,
    plaintext: bool,
    http_listen: Option<SocketAddr>,
) -> Result<PathBuf, BoxError> {
    let pin_path = dir.join("hsm-pin");
    let pkcs11 = token::load(module)?;
    match token::find_token(&pkcs11, DEV_TOKEN_LABEL) {
        Ok(_) => {}
        Err(TokenError::TokenNotFound { .. }) => {
            let so_pin = softhsm::random_pin()?;
            let user_pin = softhsm::random_pin()?;
            softhsm::provision_token(&pkcs11, DEV_TOKEN_LABEL, &so_pin, &user_pin)?;
            crate::dev_pki::write_private(&pin_path, user_pin.expose_secret().as_bytes())?;
            tracing::info!(
                token = DEV_TOKEN_LABEL,
                "provisioned a SoftHSM token (random SO and user PINs)"
            );
        }
        Err(e) => return Err(e.into()),
    }
    pkcs11.finalize()?;
    let config_path = dir.join("kms.toml");
    let access = if plaintext {
        format!(
            "[tls]\n\
             # INSECURE: plaintext on loopback; every caller is `{loopback}`.\n\
             plaintext_loopback = true\n\n\
             [roles]\n\
             admin = [\"{loopback}\"]\n\
             auditor = [\"{loopback}\"]\n",
            loopback = kms::policy::LOOPBACK
        )
    } else {
        let pki = DevPki::at(dir);
        if pki.ensure()? {
            tracing::info!(dir = %pki.dir.display(), "wrote a development CA and certificates");
        }
        format!(
            "[tls]\n\
             cert = \"tls/server.pem\"\n\
             key = \"tls/server-key.pem\"\n\
             client_ca = \"tls/ca.pem\"\n\n\
             [roles]\n\
             admin = [\"{}\"]\n\
             auditor = [\"{}\"]\n\
             custodian = [\"{}\"]\n",
            DevPki::principal("admin"),
            DevPki::principal("auditor"),
            DevPki::principal("custodian"),
        )
    };
    let text = format!(
        "# Written by `kms dev`. See docs/configuration.md.\n\
         listen = \"{listen}\"\n\n\
         [storage]\n\
         path = \"kms.redb\"\n\n\
         [hsm]\n\
         module = \"{}\"\n\
         token_label = \"{DEV_TOKEN_LABEL}\"\n\
         pin_file = \"hsm-pin\"\n\
         master_key_label = \"{}\"\n\n\
         {access}{http}",
        module.display(),
        kms_pkcs11_conf::DEFAULT_MASTER_KEY_LABEL,
        http = http_listen.map_or_else(String::new, |a| format!("\n[http]\nlisten = \"{a}\"\n")),
    );
    // Private, as the server requires of any config (`Config::load`).
    crate::dev_pki::write_private(&config_path, text.as_bytes())?;
    Ok(config_path)
}

/// Initialises and unseals on the first run; says what to do on later runs.
fn bootstrap(
    opened: &kms::server::Opened,
    dir: &Path,
    bound: kms::server::Bound,
    config_path: &Path,
    plaintext: bool,
    temporary: bool,
) -> Result<(), BoxError> {
    let addr = bound.grpc;
    let hints = Hints::new(dir, bound, plaintext);
    if plaintext {
        println!(
            "kms dev: WARNING: plaintext gRPC: no TLS, no client certificates; anyone who can \
             connect to {addr} is admin and auditor. Development only."
        );
    }
    if opened.seal.status().initialized {
        hints.print_reuse();
        return Ok(());
    }
    init_and_unseal(opened)?;
    hints.print_ready(config_path, temporary);
    Ok(())
}

/// Runs the init ceremony with 5 shares, threshold 3, prints them, and unseals with the
/// first three, each step audited as principal `kms-dev`.
fn init_and_unseal(opened: &kms::server::Opened) -> Result<(), BoxError> {
    let seal = &opened.seal;
    let event = |operation| kms::audit::AuditEvent::internal("kms-dev", "kms.dev", operation);
    let commit = |_: &kms::seal::InitOutput, writes| {
        opened
            .audit
            .append_with(event("Init"), writes)
            .map(|_| ())
            .map_err(|_| kms::seal::SealError::AuditUnavailable)
    };
    let out = seal.init(5, 3, None, &[], &commit)?;
    println!("kms dev: DEVELOPMENT MODE. Do not keep real keys in this server.\n");
    crate::show::print_init(&(&out).into(), false)?;
    for share in out.shares.iter().take(usize::from(out.threshold)) {
        seal.unseal(share, None)?;
        if let Err(e) = opened.audit.append(event("Unseal")) {
            let _ = seal.seal();
            return Err(e.into());
        }
    }
    Ok(())
}

/// `  export PATH=DIR:$PATH` when this `kms` is not the one `PATH` finds (as when run by
/// `scripts/dev` from target/debug), so that the `kms ...` lines printed next work as
/// pasted; empty otherwise.
fn path_line() -> String {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return String::new();
    };
    let on_path =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d == dir));
    if on_path {
        String::new()
    } else {
        format!("  export PATH={}:$PATH\n", dir.display())
    }
}

/// What `kms dev` tells its user: the address and the environment that reaches it.
struct Hints<'a> {
    dir: &'a Path,
    pki: DevPki,
    plaintext: bool,
    /// `http://` or `https://` and the address.
    url: String,
    /// The Vault-compatible HTTPS front's address, when it is served.
    http: Option<SocketAddr>,
    /// The `export` lines for the CA and the admin's certificate (empty in plaintext).
    env: String,
}

impl<'a> Hints<'a> {
    fn new(dir: &'a Path, bound: kms::server::Bound, plaintext: bool) -> Self {
        let addr = bound.grpc;
        let pki = DevPki::at(dir);
        let (url, mut env) = if plaintext {
            (format!("http://{addr}"), String::new())
        } else {
            (
                format!("https://{addr}"),
                format!(
                    "  export KMS_CACERT={}\n  export KMS_CLIENT_CERT={} KMS_CLIENT_KEY={}\n",
                    pki.ca().display(),
                    pki.cert("admin").display(),
                    pki.key("admin").display()
                ),
            )
        };
        env.push_str(&path_line());
        Hints {
            dir,
            pki,
            plaintext,
            url,
            http: bound.http,
            env,
        }
    }

    /// A later run: the server came up sealed; how the custodian unseals it.
    fn print_reuse(&self) {
        let (dir, pki) = (self.dir.display(), &self.pki);
        if self.plaintext {
            println!(
                "kms dev: reusing {dir}: serving PLAINTEXT gRPC on {}, and the server is sealed \
                 (every restart is); unseal shares are accepted over TLS only: restart without \
                 --plaintext and run `kms operator unseal`.",
                self.url,
            );
        } else {
            println!(
                "kms dev: reusing {dir}: serving mTLS on {url}, and the server is sealed (every restart is). \
                 Unseal it with the shares from its first run, as the custodian:\n\
                 \n  export KMS_ADDR={url}\n{}  KMS_CLIENT_CERT={} KMS_CLIENT_KEY={} kms operator unseal",
                self.env,
                pki.cert("custodian").display(),
                pki.key("custodian").display(),
                url = self.url,
            );
        }
    }

    /// What a program written for Vault runs against the Transit front, as the application:
    /// a `curl` line and an `hvac` snippet (each works as pasted once the admin's lines
    /// above made the key and the grant; `softhsm-tests/tests/dev_mode.rs` runs them).
    fn vault_lines(&self, http: SocketAddr) -> String {
        let pki = &self.pki;
        let (ca, cert, key) = (
            pki.ca().display().to_string(),
            pki.cert("app").display().to_string(),
            pki.key("app").display().to_string(),
        );
        format!(
            "Vault-compatible HTTPS (Transit, docs/vault-transit.md) on https://{http}, as the application:\n  \
             curl -sS --cacert {ca} --cert {cert} --key {key} https://{http}/v1/transit/encrypt/payments -d '{{\"plaintext\": \"aGVsbG8=\"}}'\n  \
             python3 -c 'import hvac; v = hvac.Client(url=\"https://{http}\", cert=(\"{cert}\", \"{key}\"), verify=\"{ca}\"); \
             print(v.secrets.transit.encrypt_data(name=\"payments\", plaintext=\"aGVsbG8=\")[\"data\"][\"ciphertext\"])'   # pip install hvac\n"
        )
    }

    /// The first run: unsealed; what the admin, the application and the auditor can run.
    fn print_ready(&self, config_path: &Path, temporary: bool) {
        let pki = &self.pki;
        let (as_app, app) = if self.plaintext {
            (String::new(), kms::policy::LOOPBACK.to_owned())
        } else {
            let as_app = format!(
                "\nAs the application (needs the grant above):\n  \
                 KMS_CLIENT_CERT={} KMS_CLIENT_KEY={} kms encrypt --key payments --in {} --base64\n\
                 As the auditor:\n  \
                 KMS_CLIENT_CERT={} KMS_CLIENT_KEY={} kms audit verify\n",
                pki.cert("app").display(),
                pki.key("app").display(),
                config_path.display(),
                pki.cert("auditor").display(),
                pki.key("auditor").display(),
            );
            let as_app = match self.http {
                Some(http) => as_app + &self.vault_lines(http),
                None => as_app,
            };
            (as_app, DevPki::principal("app"))
        };
        println!(
            "\nkms dev: unsealed with shares 1-3 and serving {} on {url}\n\
             \nAs the admin:\n  export KMS_ADDR={url}\n{env}  kms whoami\n  kms operator status\n  \
             kms key create payments --algorithm aes-256-gcm\n  kms grant create payments {app} --operations encrypt,decrypt\n{as_app}\
             \nState: {} (config {}){}\nStop with Ctrl-C.",
            if self.plaintext {
                "PLAINTEXT gRPC"
            } else {
                "mTLS"
            },
            self.dir.display(),
            config_path.display(),
            if temporary { ", removed on exit" } else { "" },
            url = self.url,
            env = self.env,
        );
    }
}
