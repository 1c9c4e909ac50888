//! The `kms` binary: the command line (clap) on top of the `kms` library, as rage sits on
//! age. `server` and `dev` run the server (`kms::server::run`); `operator`, `key`, the
//! crypto commands, `audit`, `grant`, `secret`, `issuer`,
//! `credential`, `db`, `lease` and `whoami` are gRPC clients; `pkcs11
//! probe` lists a module's slots and mechanisms. Nothing here is part of the library: its
//! dependencies (clap, rpassword, csv, humantime, rcgen, rustix, tracing-subscriber) are
//! this crate's.
//!
//! Exit codes: 0 success; 1 error; 2 usage error (clap), or `operator status` on a sealed
//! server (as `vault status` does, so scripts can test it).
//!
//! Shares are read at a hidden prompt, or from standard input when it is not a terminal;
//! never from an argument (arguments are visible in `ps` and shell history).

#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kms_proto::v1 as pb;
use kms_proto::v1::system_client::SystemClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use kms::config::Config;

/// HSM-backed key-management service.
#[derive(Debug, Parser)]
#[command(name = "kms", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Server {
        /// The configuration file (TOML; see docs/configuration.md).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Development mode: a private SoftHSM token, init (5 shares, threshold 3), unseal, serve.
    Dev(crate::dev::DevArgs),
    /// Seal lifecycle: init, unseal, seal, status.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Key administration: create, get, list, rotate, update, version states.
    Key {
        #[command(subcommand)]
        command: keys::KeyCommand,
    },
    #[command(flatten)]
    Crypto(crypto::CryptoCommand),
    /// The audit log: export, key-usage report, verify (online or offline).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Backups: take one from the running server, check one, restore one offline.
    Backup {
        #[command(subcommand)]
        command: backup::BackupCommand,
    },
    /// Grants: which principal may use which key for what (admin role).
    Grant {
        #[command(subcommand)]
        command: grant::GrantCommand,
    },
    /// Versioned secrets (Vault KV v2): put, get, patch, list, delete, metadata, grants.
    Secret {
        #[command(subcommand)]
        command: secret::SecretCommand,
    },
    /// Issuers of short-lived machine credentials (JWT-SVIDs): create, get, list, update.
    Issuer {
        #[command(subcommand)]
        command: credential::IssuerCommand,
    },
    /// Short-lived machine credentials: ask an issuer for a JWT-SVID, validate one.
    Credential {
        #[command(subcommand)]
        command: credential::CredentialCommand,
    },
    /// Dynamic database credentials: connections, roles, and logins made on demand
    /// under a lease (`kms db creds ROLE`).
    Db {
        #[command(subcommand)]
        command: database::DbCommand,
    },
    /// The leases of database logins: renew, revoke, revoke-prefix, lookup, list.
    Lease {
        #[command(subcommand)]
        command: database::LeaseCommand,
    },
    /// Show who the server takes you to be, and your roles.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// PKCS#11 tools.
    Pkcs11 {
        #[command(subcommand)]
        command: Pkcs11Command,
    },
    /// Print a shell completion script: `source <(kms completions bash)`, or write it where
    /// your shell loads completions (zsh: a file `_kms` on `$fpath`; fish:
    /// `~/.config/fish/completions/kms.fish`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// How to reach the server.
#[derive(Debug, Args)]
struct Conn {
    /// The server's address: `https://HOST:PORT` (or `http://` for a plaintext loopback
    /// server, written out: shares and PINs never go in clear by default). Without a
    /// scheme, https.
    #[arg(
        long,
        env = "KMS_ADDR",
        default_value = "https://127.0.0.1:8200",
        global = true
    )]
    addr: String,
    /// The CA certificate(s) that signed the server's certificate (PEM).
    #[arg(long, env = "KMS_CACERT", global = true, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Your client certificate (PEM), for mTLS.
    #[arg(
        long,
        env = "KMS_CLIENT_CERT",
        global = true,
        value_name = "PEM",
        requires = "cert_key"
    )]
    cert: Option<PathBuf>,
    /// Your client certificate's private key (PEM). (`--key` names keys elsewhere.)
    #[arg(
        long,
        env = "KMS_CLIENT_KEY",
        global = true,
        value_name = "PEM",
        requires = "cert"
    )]
    cert_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Initialise the server (once): prints the unseal shares, which are stored nowhere.
    Init {
        /// How many shares to make (2..=255).
        #[arg(long, default_value_t = 5)]
        shares: u32,
        /// How many shares unseal needs (2..=shares).
        #[arg(long, default_value_t = 3)]
        threshold: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// A custodian's age X25519 recipient (`age1...`), or a file holding one; once per
        /// share, in share order. Share i is then printed encrypted to recipient i, and no
        /// operator sees it in clear.
        #[arg(long = "recipient", value_name = "AGE1_OR_FILE")]
        recipients: Vec<String>,
        /// With recipients: write the sealed shares as `DIR/share-<i>.age`.
        #[arg(long, value_name = "DIR", requires = "recipients")]
        out_dir: Option<PathBuf>,
    },
    /// Submit your unseal share (hidden prompt; or one share per line on standard input).
    /// Exits 0 when every share was accepted, sealed or not (as Vault's unseal does: the
    /// server may wait for other custodians' shares); 1 when a share was refused. `status`
    /// exits 2 while sealed.
    Unseal {
        /// Forget the shares submitted so far in this attempt.
        #[arg(long)]
        reset: bool,
        /// Only contribute to the attempt with this nonce (from `status`).
        #[arg(long)]
        nonce: Option<String>,
    },
    /// Seal the server: it forgets every key until the next unseal.
    Seal,
    /// New shares for the same root key: when custodians change or a share may be lost.
    Rekey {
        #[command(subcommand)]
        command: ceremony::RekeyCommand,
    },
    /// Move the root key's HSM wrapping to a new master key (admin, unsealed): generated in
    /// the token, or an existing key adopted by label. The shares stay valid; the old key is
    /// destroyed.
    RotateMasterKey {
        /// Adopt this existing token key (made by the HSM's administrators) instead.
        #[arg(long, value_name = "LABEL")]
        adopt_label: Option<String>,
    },
    /// A copy restored from a backup takes over the HSM objects of the instance it was
    /// restored from (admin, unsealed): only after a disaster, once that instance is gone
    /// for good. Until then the copy destroys nothing that instance made (docs/operations.md).
    TakeOver,
    /// Prove your share is intact and current, without unsealing (hidden prompt, or one
    /// share per line on standard input). Audited; failures count against the unseal limit.
    VerifyShare,
    /// Show the seal status (exit code 2 when sealed).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Pkcs11Command {
    /// List the module's slots, tokens and the mechanisms kms needs. Needs no PIN.
    Probe {
        /// Read the module and token label from this configuration file.
        #[arg(long, short, conflicts_with = "module")]
        config: Option<PathBuf>,
        /// The PKCS#11 module to probe.
        #[arg(long)]
        module: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Any error the CLI prints.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

mod audit;
mod backup;
mod byok;
mod ceremony;
mod credential;
mod crypto;
mod database;
mod dev;
mod dev_pki;
mod grant;
mod keys;
mod report;
mod rlimit;
mod secret;
mod share_files;
mod show;

use kms::error_chain;

/// `kms server`'s exit status when starting again cannot help (sysexits' `EX_CONFIG`): the
/// configuration, a file's mode, the HSM's PIN, the TLS files. The packaged unit does not
/// restart on it (`RestartPreventExitStatus=78`): a restart loop on a wrong PIN would lock
/// a real HSM's token after its few tries.
const EX_CONFIG: u8 = 78;

/// The exit status of a server that did not start: [`EX_CONFIG`] when only a person can
/// fix what stopped it, 1 when it may pass (a port in use, a database or HSM not there yet).
fn start_exit_code(e: &kms::server::StartError) -> u8 {
    use kms::hsm::HsmError;
    use kms::server::StartError;
    use kms::store::StoreError;
    match e {
        StartError::Hsm(HsmError::Login { .. } | HsmError::Pin(_))
        | StartError::Tls(_)
        | StartError::Kubernetes(
            kms::kubernetes::SocketError::UnsafeDirectory { .. }
            | kms::kubernetes::SocketError::NotASocket(_),
        )
        | StartError::Store(StoreError::TooOpen { .. } | StoreError::DirTooOpen { .. })
        | StartError::RestoreInterrupted => EX_CONFIG,
        _ => 1,
    }
}

/// Prints why the server did not start (as `main` prints any error) and the status to exit
/// with.
fn refused_start(e: &(dyn std::error::Error + 'static), code: u8) -> ExitCode {
    eprintln!("error: {}", error_chain(e));
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    match cli.command {
        Command::Server { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return Ok(refused_start(&e, EX_CONFIG)),
            };
            show::init_logging(config.log);
            rlimit::disable_core_dumps();
            rlimit::raise_open_file_limit();
            match kms::server::run(config, None) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => Ok(refused_start(&e, start_exit_code(&e))),
            }
        }
        Command::Dev(args) => crate::dev::run(args),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "kms", &mut script);
            // A reader that stops early (`| head`) is not an error.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Operator { command } => runtime()?.block_on(operator(cli.conn, command)),
        Command::Key { command } => runtime()?.block_on(async {
            let channel = connect(&cli.conn).await?;
            keys::run_key(channel, command).await
        }),
        Command::Crypto(command) => runtime()?.block_on(async {
            let channel = connect(&cli.conn).await?;
            crypto::run_crypto(channel, command).await
        }),
        Command::Audit { command } => {
            runtime()?.block_on(audit::run(command, || connect(&cli.conn)))
        }
        Command::Backup { command } => {
            runtime()?.block_on(backup::run(command, || connect(&cli.conn)))
        }
        Command::Grant { command } => runtime()?.block_on(async {
            let channel = connect(&cli.conn).await?;
            grant::run(channel, command).await
        }),
        Command::Secret { command } => {
            runtime()?.block_on(secret::run(command, || connect(&cli.conn)))
        }
        Command::Issuer { command } => {
            runtime()?.block_on(credential::issuer(command, || connect(&cli.conn)))
        }
        Command::Credential { command } => {
            runtime()?.block_on(credential::credential(command, || connect(&cli.conn)))
        }
        Command::Db { command } => {
            runtime()?.block_on(database::db(command, || connect(&cli.conn)))
        }
        Command::Lease { command } => {
            runtime()?.block_on(database::lease(command, || connect(&cli.conn)))
        }
        Command::Whoami { json } => runtime()?.block_on(async {
            let channel = connect(&cli.conn).await?;
            grant::whoami(channel, json).await
        }),
        Command::Pkcs11 {
            command: Pkcs11Command::Probe { config, module },
        } => {
            let (module, label) = match (config, module) {
                (Some(c), _) => {
                    let c = Config::load(&c)?;
                    (c.hsm.module, Some(c.hsm.token_label))
                }
                (None, Some(m)) => (m, None),
                (None, None) => match kms_pkcs11_conf::find_softhsm_module() {
                    Some(m) => (m, None),
                    None => {
                        return Err(
                            "give --config or --module (no SoftHSM module found either)".into()
                        );
                    }
                },
            };
            let report = kms_pkcs11_conf::token::probe(&module, label.as_deref())?;
            println!("{report}");
            Ok(if report.is_usable() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Reads a PEM file the CLI was given.
fn read_pem(flag: &str, path: &std::path::Path) -> Result<Zeroizing<Vec<u8>>, BoxError> {
    Ok(Zeroizing::new(std::fs::read(path).map_err(|e| {
        format!("{flag} {}: cannot read it: {e}", path.display())
    })?))
}

/// Creates (or truncates) a file only its owner can read, as backups are: exports, reports
/// and decrypted data hold what a backup holds, or more. A file that existed is made 0600
/// too.
pub(crate) fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Connects to the server named by `--addr` / `KMS_ADDR`: over TLS (with `--ca`, and the
/// client certificate `--cert`/`--cert-key` for mTLS) unless the address says `http://`.
/// An address without a scheme is https: the CLI sends shares and PINs, and never does so
/// in clear unless told to in so many words.
async fn connect(conn: &Conn) -> Result<Channel, BoxError> {
    let addr = server_address(&conn.addr)?;
    let mut endpoint = Channel::from_shared(addr.clone())
        .map_err(|_| format!("--addr {addr:?} is not a valid address"))?;
    if addr.starts_with("https://") {
        let ca = conn.ca.as_deref().ok_or(
            "an https address needs the CA that signed the server's certificate: --ca FILE or KMS_CACERT",
        )?;
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(read_pem("--ca", ca)?.as_slice()),
        );
        if let (Some(cert), Some(key)) = (&conn.cert, &conn.cert_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read_pem("--cert", cert)?.as_slice(),
                read_pem("--cert-key", key)?.as_slice(),
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS settings: {}", error_chain(&e)))?;
    } else if conn.cert.is_some() || conn.ca.is_some() {
        return Err(format!(
            "--addr {addr} is plaintext (http://) but TLS files were given: use https://"
        )
        .into());
    }
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot reach the kms server at {addr}: {}", error_chain(&e)))?;
    Ok(channel)
}

/// The port a server listens on unless configured otherwise (`server.listen`).
const DEFAULT_PORT: u16 = 8200;

/// `--addr` as the CLI dials it: https unless a scheme is written out, and port 8200
/// unless one is given (not the scheme's 443 or 80: kms listens on 8200).
fn server_address(given: &str) -> Result<String, BoxError> {
    let with_scheme = if given.contains("://") {
        given.to_owned()
    } else {
        format!("https://{given}")
    };
    let bad = || format!("--addr {given:?} is not an address: give https://HOST:PORT");
    let uri: tonic::codegen::http::Uri = with_scheme.parse().map_err(|_| bad())?;
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(bad().into());
    };
    if uri.port().is_some() {
        return Ok(with_scheme);
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    let path = if path == "/" { "" } else { path };
    Ok(format!("{scheme}://{host}:{DEFAULT_PORT}{path}"))
}

/// A unary call's answer: the response's message, or the status as the CLI prints it.
trait Answer<T> {
    /// Awaits the call.
    async fn answer(self) -> Result<T, RpcError>;
}

impl<T, F> Answer<T> for F
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    async fn answer(self) -> Result<T, RpcError> {
        self.await
            .map(tonic::Response::into_inner)
            .map_err(RpcError)
    }
}

/// A gRPC status as the CLI prints it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}", code_name(.0.code()), .0.message())]
pub struct RpcError(pub tonic::Status);

use kms::code_name;

async fn operator(conn: Conn, command: OperatorCommand) -> Result<ExitCode, BoxError> {
    let client = &mut SystemClient::new(connect(&conn).await?);
    match command {
        OperatorCommand::Init {
            shares,
            threshold,
            json,
            recipients,
            out_dir,
        } => {
            let recipients = ceremony::recipients(&recipients)?;
            init(client, shares, threshold, json, recipients, out_dir).await
        }
        OperatorCommand::Rekey { command } => ceremony::rekey(client, command).await,
        OperatorCommand::VerifyShare => ceremony::verify_share(client).await,
        OperatorCommand::RotateMasterKey { adopt_label } => {
            let r = client
                .rotate_master_key(pb::RotateMasterKeyRequest {
                    adopt_label: adopt_label.unwrap_or_default(),
                })
                .answer()
                .await?;
            println!(
                "Master key rotated: the root key is wrapped under {} (id {}).",
                r.master_key_label, r.master_key_id
            );
            if r.previous_destroyed {
                println!(
                    "The previous master key {} (id {}) was destroyed.",
                    r.previous_master_key_label, r.previous_master_key_id
                );
            } else {
                println!(
                    "The previous master key {} (id {}) was not destroyed: the server destroys it at its next start if this instance made it; if it did not (a key adopted from the HSM's administrators, or made by the instance this copy was restored from), destroying it is for its owner (the server's log says which).",
                    r.previous_master_key_label, r.previous_master_key_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        OperatorCommand::TakeOver => {
            let r = client.take_over(pb::TakeOverRequest {}).answer().await?;
            println!(
                "Instance {} now owns the HSM objects of {}{}: it destroys them as its schedule says from now on.",
                r.instance_id,
                if r.adopted_instance_ids.is_empty() {
                    "no other instance".to_owned()
                } else {
                    format!("instance(s) {}", r.adopted_instance_ids.join(", "))
                },
                if r.owns_untagged {
                    ", and those made before objects named their instance"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        OperatorCommand::Unseal { reset: true, .. } => {
            let s = client
                .unseal(pb::UnsealRequest {
                    reset: true,
                    ..Default::default()
                })
                .answer()
                .await?;
            println!("Unseal progress reset.");
            show::print_status(&s, false)?;
            Ok(ExitCode::SUCCESS)
        }
        OperatorCommand::Unseal { nonce, .. } => unseal(client, nonce).await,
        OperatorCommand::Seal => {
            let s = client.seal(pb::SealRequest {}).answer().await?;
            println!("The server is sealed.");
            show::print_status(&s, false)?;
            Ok(ExitCode::SUCCESS)
        }
        OperatorCommand::Status { json } => {
            let s = client.status(pb::StatusRequest {}).answer().await?;
            show::print_status(&s, json)?;
            Ok(if s.sealed {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// `kms operator init`: asks for the HSM PIN first when the server keeps it in the shares.
async fn init(
    client: &mut SystemClient<Channel>,
    shares: u32,
    threshold: u32,
    json: bool,
    recipients: Vec<String>,
    out_dir: Option<PathBuf>,
) -> Result<ExitCode, BoxError> {
    let status = client.status(pb::StatusRequest {}).answer().await?;
    let hsm_pin = if status.hsm_pin_in_shares && !status.initialized {
        read_hsm_pin()?
    } else {
        Zeroizing::new(String::new())
    };
    // Everything writing the shares needs is checked and reserved before the server makes
    // them: it makes them once.
    let files = out_dir
        .as_deref()
        .map(|dir| share_files::ShareDir::prepare(dir, shares as usize))
        .transpose()?;
    let resp = client
        .init(pb::InitRequest {
            shares,
            threshold,
            hsm_pin: hsm_pin.to_string(),
            recipients: recipients.clone(),
        })
        .answer()
        .await?;
    if resp.master_key_reused {
        eprintln!(
            "Note: the token already held a master key labelled {} (id {}): this init wraps the new root key under it instead of making one. (A store emptied to start over does this; if you did not expect it, see \"Starting over\" in docs/ceremony.md.)",
            resp.master_key_label, resp.master_key_id
        );
    }
    if resp.shares_sealed && !json {
        // The fingerprint is printed whatever became of the files.
        let saved = ceremony::print_sealed(&resp.shares, &recipients, files);
        println!(
            "Share set {}: {} of these {} shares unseal the server.\n\
             Audit checkpoint key fingerprint: {} (record it).",
            resp.share_set_id,
            resp.threshold,
            resp.shares.len(),
            resp.audit_key_fingerprint
        );
        saved?;
        return Ok(ExitCode::SUCCESS);
    }
    // (`--json`: the JSON holds every share and the fingerprint, whatever became of the
    // files.)
    let saved = files.map(|f| f.save(&resp.shares, &mut std::io::stderr().lock()));
    show::print_init(&(&resp).into(), json)?;
    saved.transpose()?;
    Ok(ExitCode::SUCCESS)
}

/// `kms operator unseal`: each share read (hidden prompt, or one per line of standard
/// input) is submitted in turn; exit 0 once every share was accepted, whether or not the
/// threshold was reached (the progress is printed); an error (exit 1) on a refused share.
async fn unseal(
    client: &mut SystemClient<Channel>,
    nonce: Option<String>,
) -> Result<ExitCode, BoxError> {
    let shares = read_shares("Unseal share (input is hidden): ")?;
    let before = client.status(pb::StatusRequest {}).answer().await?;
    if before.initialized && !before.sealed {
        println!("The server is already unsealed: your share was not needed, and was not sent.");
        return Ok(ExitCode::SUCCESS);
    }
    for (i, share) in shares.iter().enumerate() {
        let s = client
            .unseal(pb::UnsealRequest {
                share: share.to_string(),
                reset: false,
                nonce: nonce.clone().unwrap_or_default(),
            })
            .answer()
            .await?;
        if s.sealed {
            println!(
                "Share accepted. Unseal progress: {}/{} (attempt {})",
                s.progress, s.threshold, s.nonce
            );
        } else {
            println!("The server is unsealed.");
            let left = shares.len() - i - 1;
            if left > 0 {
                println!("The other {left} share(s) given were not needed, and were not sent.");
            }
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads shares: one at a hidden prompt on a terminal, else one per line of standard input.
fn read_shares(prompt: &str) -> Result<Vec<Zeroizing<String>>, BoxError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let share = Zeroizing::new(rpassword::prompt_password(prompt)?);
        if share.trim().is_empty() {
            return Err("no share entered".into());
        }
        return Ok(vec![share]);
    }
    let mut shares = Vec::new();
    for line in stdin.lock().lines() {
        let line = Zeroizing::new(line?);
        if !line.trim().is_empty() {
            shares.push(Zeroizing::new(line.trim().to_owned()));
        }
    }
    if shares.is_empty() {
        return Err("no share on standard input".into());
    }
    Ok(shares)
}

/// Reads the HSM PIN for an init that puts it in the shares: at a hidden prompt, twice, on
/// a terminal; else the first line of standard input.
fn read_hsm_pin() -> Result<Zeroizing<String>, BoxError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("This server keeps its HSM PIN in the unseal shares: init needs it once.");
        let pin = Zeroizing::new(rpassword::prompt_password(
            "HSM user PIN (input is hidden): ",
        )?);
        let again = Zeroizing::new(rpassword::prompt_password("HSM user PIN again: ")?);
        if *pin != *again {
            return Err("the two PINs differ".into());
        }
        return Ok(pin);
    }
    let mut line = Zeroizing::new(String::new());
    stdin.lock().read_line(&mut line)?;
    let pin = Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_owned());
    if pin.is_empty() {
        return Err(
            "this server keeps its HSM PIN in the unseal shares: give the PIN on standard input"
                .into(),
        );
    }
    Ok(pin)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::server_address;

    #[test]
    fn a_start_only_a_person_can_fix_exits_78_and_a_passing_one_1() {
        use kms::server::StartError;
        let kubernetes = |e| super::start_exit_code(&StartError::Kubernetes(e));
        assert_eq!(super::start_exit_code(&StartError::RestoreInterrupted), 78);
        assert_eq!(
            kubernetes(kms::kubernetes::SocketError::NotASocket("/run/k".into())),
            78
        );
        // Another server still serves the socket, or holds the port: it may go.
        assert_eq!(
            kubernetes(kms::kubernetes::SocketError::InUse("/run/k".into())),
            1
        );
        let bind = StartError::Bind {
            addr: "127.0.0.1:8200".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert_eq!(super::start_exit_code(&bind), 1);
    }

    #[test]
    fn an_address_without_a_port_dials_8200() {
        for (given, dialed) in [
            ("127.0.0.1", "https://127.0.0.1:8200"),
            ("https://kms.example", "https://kms.example:8200"),
            ("http://127.0.0.1", "http://127.0.0.1:8200"),
            ("[::1]", "https://[::1]:8200"),
            ("https://[::1]:9000", "https://[::1]:9000"),
            ("kms.example:443", "https://kms.example:443"),
            ("https://127.0.0.1:8200", "https://127.0.0.1:8200"),
        ] {
            assert_eq!(server_address(given).unwrap(), dialed, "{given}");
        }
        assert!(server_address("https://").is_err());
        assert!(server_address("not an address").is_err());
    }
}
