//! `kms issuer ...` and `kms credential ...`: short-lived machine credentials
//! (`kms.v1.Credentials`, docs/credentials.md). An administrator defines issuers; a caller
//! the issuer lists asks for a credential of the issuer's kind (a JWT-SVID, an X.509-SVID,
//! an OpenSSH certificate); anyone with a client certificate validates a JWT.
//!
//! A token is printed on standard output only, by `credential jwt`, and never in an error
//! or on standard error; `credential validate` reads it from an argument or, better (an
//! argument shows in `ps` and shell history), from standard input.

mod show;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::credentials_client::CredentialsClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::secret::parse_duration;
use crate::{Answer as _, BoxError};

/// The longest token `credential validate` reads (the server refuses over 16 KiB).
const MAX_TOKEN: u64 = 64 << 10;

/// `kms issuer ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum IssuerCommand {
    /// Define an issuer (admin role): of JWT-SVIDs unless --kind says otherwise.
    Create {
        /// 1 to 128 bytes of A-Z a-z 0-9 _ . -
        name: String,
        #[command(flatten)]
        definition: Definition,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an issuer.
    Get {
        /// The issuer's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every issuer.
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Change an issuer (admin role): a list given replaces that list, --clear empties
    /// one; what is not given stays.
    Update {
        /// The issuer's name.
        name: String,
        #[command(flatten)]
        change: Change,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a version to the issuer's key (admin role): published at once, it signs once
    /// it has been published for the issuer's publish-ahead time.
    Rotate {
        /// The issuer's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// x509: a PKCS#10 request for a CA certificate, signed by a version of the issuer's
    /// key, for an outside CA to sign (admin role).
    Csr {
        /// The issuer's name.
        name: String,
        /// The key version (the newest enabled when absent).
        #[arg(long)]
        version: Option<u32>,
        /// Where to write the request (PEM).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// x509: set the CA certificate an outside CA signed for a version of the issuer's
    /// key (admin role): checked, then stored.
    SetCertificate {
        /// The issuer's name.
        name: String,
        /// The key version the certificate is for.
        #[arg(long)]
        version: u32,
        /// A PEM file: the CA certificate, then those above it (up to the root, or not).
        #[arg(long)]
        chain: std::path::PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What an issuer issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// JWT-SVIDs.
    Jwt,
    /// X.509-SVIDs, from PKCS#10 requests.
    X509,
    /// OpenSSH user certificates.
    SshUser,
    /// OpenSSH host certificates.
    SshHost,
}

impl Kind {
    fn pb(self) -> pb::CredentialKind {
        match self {
            Self::Jwt => pb::CredentialKind::Jwt,
            Self::X509 => pb::CredentialKind::X509,
            Self::SshUser => pb::CredentialKind::SshUser,
            Self::SshHost => pb::CredentialKind::SshHost,
        }
    }
}

/// A list `issuer update --clear` empties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum List {
    /// The principals who may ask for themselves.
    Principals,
    /// The audiences.
    Audiences,
    /// The fixed claims.
    Claims,
    /// The delegators.
    Delegators,
    /// The subjects delegators may ask for.
    Subjects,
    /// The SSH principals.
    SshPrincipals,
    /// The SSH critical options.
    SshOptions,
    /// The SSH extensions.
    SshExtensions,
}

/// What `issuer create` defines.
#[derive(Debug, clap::Args)]
pub(crate) struct Definition {
    /// What it issues.
    #[arg(long, value_enum, default_value = "jwt")]
    kind: Kind,
    /// The keyring key that signs: for jwt and x509, ECDSA P-256 or P-384 or RSA; for
    /// ssh-user and ssh-host, ECDSA P-256 or Ed25519.
    #[arg(long)]
    key: String,
    /// Who may ask for a token for themselves: a principal, or a prefix ending in `*`
    /// (repeatable).
    #[arg(long = "principal", value_name = "PRINCIPAL")]
    principals: Vec<String>,
    /// jwt: an audience a token may be asked for (repeatable; at least one).
    #[arg(long = "audience", value_name = "AUDIENCE")]
    audiences: Vec<String>,
    /// A credential's lifetime when the request gives none (e.g. 5m; the server's default:
    /// 5m for tokens, 1h for certificates).
    #[arg(long, value_parser = parse_ttl)]
    default_ttl: Option<u64>,
    /// The longest lifetime a request may ask for (e.g. 1h; the server's default: 1h).
    #[arg(long, value_parser = parse_ttl)]
    max_ttl: Option<u64>,
    /// A claim every token carries, KEY=VALUE (repeatable; each key once).
    #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
    claims: Vec<(String, String)>,
    /// Who may ask on behalf of a subject: a principal, or a prefix ending in `*`
    /// (repeatable).
    #[arg(long = "delegator", value_name = "PRINCIPAL")]
    delegators: Vec<String>,
    /// A subject a delegator may ask for: a SPIFFE ID, or a prefix ending in `*`
    /// (repeatable).
    #[arg(long = "subject", value_name = "SUBJECT")]
    subjects: Vec<String>,
    /// How long a new version of the key is published before it signs (e.g. 10m; the
    /// server's default: 2m).
    #[arg(long, value_parser = parse_duration)]
    publish_ahead: Option<u64>,
    /// x509: kms signs the CA certificate itself, rather than an outside CA (`issuer csr`,
    /// `issuer set-certificate`).
    #[arg(long)]
    self_signed: bool,
    #[command(flatten)]
    ssh: Ssh,
}

/// An ssh issuer's settings (`issuer create` and `issuer update`).
#[derive(Debug, clap::Args)]
pub(crate) struct Ssh {
    /// ssh-user, ssh-host: a principal a certificate may name, a user name or a host name
    /// (repeatable).
    #[arg(long = "ssh-principal", value_name = "NAME")]
    ssh_principals: Vec<String>,
    /// ssh-user: a critical option every certificate carries, NAME=VALUE (repeatable).
    #[arg(long = "ssh-option", value_name = "NAME=VALUE", value_parser = parse_claim)]
    ssh_options: Vec<(String, String)>,
    /// ssh-user: an extension every certificate carries (repeatable; the server's default:
    /// ssh-keygen's).
    #[arg(long = "ssh-extension", value_name = "NAME")]
    ssh_extensions: Vec<String>,
}
/// What `issuer update` changes: `None` is "not given, stays".
#[derive(Debug, clap::Args)]
pub(crate) struct Change {
    /// Replaces the principals (repeatable).
    #[arg(long = "principal", value_name = "PRINCIPAL")]
    principals: Option<Vec<String>>,
    /// Replaces the audiences (repeatable).
    #[arg(long = "audience", value_name = "AUDIENCE")]
    audiences: Option<Vec<String>>,
    /// A token's lifetime when the request gives none (e.g. 5m).
    #[arg(long, value_parser = parse_ttl)]
    default_ttl: Option<u64>,
    /// The longest lifetime a request may ask for (e.g. 1h).
    #[arg(long, value_parser = parse_ttl)]
    max_ttl: Option<u64>,
    /// Replaces the claims, KEY=VALUE (repeatable; each key once).
    #[arg(long = "claim", value_name = "KEY=VALUE", value_parser = parse_claim)]
    claims: Option<Vec<(String, String)>>,
    /// Replaces the delegators (repeatable).
    #[arg(long = "delegator", value_name = "PRINCIPAL")]
    delegators: Option<Vec<String>>,
    /// Replaces the subjects delegators may ask for (repeatable).
    #[arg(long = "subject", value_name = "SUBJECT")]
    subjects: Option<Vec<String>>,
    /// How long a new version of the key is published before it signs (e.g. 10m).
    #[arg(long, value_parser = parse_duration)]
    publish_ahead: Option<u64>,
    /// Replaces the SSH principals (repeatable).
    #[arg(long = "ssh-principal", value_name = "NAME")]
    ssh_principals: Option<Vec<String>>,
    /// Replaces the SSH critical options, NAME=VALUE (repeatable).
    #[arg(long = "ssh-option", value_name = "NAME=VALUE", value_parser = parse_claim)]
    ssh_options: Option<Vec<(String, String)>>,
    /// Replaces the SSH extensions (repeatable).
    #[arg(long = "ssh-extension", value_name = "NAME")]
    ssh_extensions: Option<Vec<String>>,
    /// Empties a list (repeatable); not with the same list given.
    #[arg(long, value_enum, value_name = "LIST")]
    clear: Vec<List>,
}

/// `kms credential ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum CredentialCommand {
    /// Ask an issuer for a JWT-SVID: printed alone on standard output, followed by a
    /// newline (`TOKEN=$(kms credential jwt ...)`). Treat it as a password until it
    /// expires.
    Jwt {
        /// The issuer's name.
        #[arg(long)]
        issuer: String,
        /// One of the issuer's audiences.
        #[arg(long)]
        audience: String,
        /// Another subject than your own SPIFFE ID (the issuer must let you delegate).
        #[arg(long)]
        subject: Option<String>,
        /// The token's lifetime (e.g. 2m; the issuer's default when absent).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Print JSON: the token, its jti, subject, expiry, key version and kid.
        #[arg(long)]
        json: bool,
    },
    /// Ask an ssh-user or ssh-host issuer for an OpenSSH certificate of a public key: written
    /// to --out as ssh-keygen writes id-cert.pub; what it says is printed (on standard
    /// error when the certificate goes to standard output).
    Ssh {
        /// The issuer's name.
        #[arg(long)]
        issuer: String,
        /// The public key to certify (id.pub: one authorized_keys line); `-`: standard
        /// input.
        #[arg(long, value_name = "FILE|-")]
        public_key: String,
        /// Where the certificate goes (id-cert.pub beside id.pub is what ssh reads by
        /// itself); `-`: standard output.
        #[arg(long, value_name = "FILE|-")]
        out: String,
        /// A principal (user or host name) among the issuer's (repeatable; none: all of
        /// them).
        #[arg(long = "principal", value_name = "NAME")]
        principals: Vec<String>,
        /// The certificate's lifetime (e.g. 10m; the issuer's default when absent).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Print what the certificate says as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask an x509 issuer for an X.509-SVID for the key of a PKCS#10 request (yours stays
    /// with you): the certificate and the CA chain are written to files.
    X509 {
        /// The issuer's name.
        #[arg(long)]
        issuer: String,
        /// The request (PEM or DER), e.g. from `openssl req -new`.
        #[arg(long)]
        csr: std::path::PathBuf,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Where to write the CA certificate and those above it (PEM).
        #[arg(long)]
        chain_out: Option<std::path::PathBuf>,
        /// Another subject than your own SPIFFE ID (the issuer must let you delegate).
        #[arg(long)]
        subject: Option<String>,
        /// The certificate's lifetime (e.g. 1h; the issuer's default when absent).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Print JSON: the SPIFFE ID, serial, expiry and key version.
        #[arg(long)]
        json: bool,
    },
    /// Ask the server whether a token is valid for an audience. Exit code 0: valid; 1: not
    /// valid (or an error).
    Validate {
        /// The issuer's name.
        #[arg(long)]
        issuer: String,
        /// The audience you identify with: the token must name it.
        #[arg(long)]
        audience: String,
        /// The token; `-` or absent: standard input (an argument shows in `ps`).
        #[arg(value_name = "TOKEN|-")]
        token: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its jti (the audit record of its issuance names it): `credential
    /// validate` refuses it from then on (admin role).
    Revoke {
        /// The issuer's name.
        #[arg(long)]
        issuer: String,
        /// The token's jti (32 hex digits).
        jti: String,
    },
}

/// A lifetime: whole seconds, at least one (`500ms` would be 0 seconds, which the server
/// reads as "the issuer's default": refused rather than silently longer than asked).
pub(crate) fn parse_ttl(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 5m, 1h)"))?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return Err(
            "a lifetime is a whole number of seconds, at least 1s (e.g. 90s, 5m, 1h)".to_owned(),
        );
    }
    Ok(d.as_secs())
}

/// `KEY=VALUE`, the key not empty (the value may be).
fn parse_claim(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("give KEY=VALUE".to_owned()),
    }
}

/// The pairs given, each key once: a key given twice is refused rather than one value
/// silently winning.
fn pairs(what: &str, pairs: Vec<(String, String)>) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        if map.contains_key(&k) {
            return Err(format!("the {what} {k:?} is given twice"));
        }
        map.insert(k, v);
    }
    Ok(map)
}

impl Definition {
    fn issuer(self, name: String) -> Result<pb::Issuer, String> {
        Ok(pb::Issuer {
            name,
            key: self.key,
            principals: self.principals,
            audiences: self.audiences,
            default_ttl_seconds: self.default_ttl.unwrap_or(0),
            max_ttl_seconds: self.max_ttl.unwrap_or(0),
            claims: pairs("claim", self.claims)?,
            delegators: self.delegators,
            subjects: self.subjects,
            kind: self.kind.pb().into(),
            publish_ahead_seconds: self.publish_ahead,
            self_signed: self.self_signed,
            ssh_principals: self.ssh.ssh_principals,
            ssh_critical_options: pairs("SSH option", self.ssh.ssh_options)?,
            ssh_extensions: self.ssh.ssh_extensions,
            ..pb::Issuer::default()
        })
    }
}

impl Change {
    fn request(self, name: String) -> Result<pb::UpdateIssuerRequest, String> {
        let clear = self.clear;
        // A list given, or emptied by --clear (not both).
        let list = |v: Option<Vec<String>>, which: List| -> Result<_, String> {
            match (v, clear.contains(&which)) {
                (Some(_), true) => Err(format!(
                    "--clear {} and a value for it: give one or the other",
                    which_name(which)
                )),
                (Some(values), false) => Ok(Some(pb::StringList { values })),
                (None, true) => Ok(Some(pb::StringList::default())),
                (None, false) => Ok(None),
            }
        };
        let map = |v: Option<Vec<(String, String)>>, which: List, what| -> Result<_, String> {
            let pairs = list(
                v.as_ref()
                    .map(|p| p.iter().map(|(k, _)| k.clone()).collect()),
                which,
            )?;
            match (pairs, v) {
                (None, _) => Ok(None),
                (Some(_), None) => Ok(Some(pb::StringMap::default())),
                (Some(_), Some(pairs)) => Ok(Some(pb::StringMap {
                    entries: self::pairs(what, pairs)?,
                })),
            }
        };
        let r = pb::UpdateIssuerRequest {
            name,
            key: None,
            principals: list(self.principals, List::Principals)?,
            audiences: list(self.audiences, List::Audiences)?,
            default_ttl_seconds: self.default_ttl,
            max_ttl_seconds: self.max_ttl,
            claims: map(self.claims, List::Claims, "claim")?,
            delegators: list(self.delegators, List::Delegators)?,
            subjects: list(self.subjects, List::Subjects)?,
            publish_ahead_seconds: self.publish_ahead,
            ssh_principals: list(self.ssh_principals, List::SshPrincipals)?,
            ssh_critical_options: map(self.ssh_options, List::SshOptions, "SSH option")?,
            ssh_extensions: list(self.ssh_extensions, List::SshExtensions)?,
        };
        let unchanged = pb::UpdateIssuerRequest {
            name: r.name.clone(),
            ..pb::UpdateIssuerRequest::default()
        };
        if r == unchanged {
            return Err(
                "nothing to change: give --principal, --audience, --default-ttl, \
                 --max-ttl, --claim, --delegator, --subject, --publish-ahead, --ssh-principal, \
                 --ssh-option, --ssh-extension or --clear"
                    .to_owned(),
            );
        }
        Ok(r)
    }
}

/// A list's name as `--clear` takes it.
fn which_name(which: List) -> String {
    clap::ValueEnum::to_possible_value(&which)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// Runs `kms issuer ...`: the arguments are checked before `connect` is called.
pub(crate) async fn issuer<F, Fut>(command: IssuerCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        IssuerCommand::Create {
            name,
            definition,
            json,
        } => {
            let issuer = definition.issuer(name)?;
            let i = CredentialsClient::new(connect().await?)
                .create_issuer(pb::CreateIssuerRequest {
                    issuer: Some(issuer),
                })
                .answer()
                .await?;
            show::issuer(&i, json);
        }
        IssuerCommand::Get { name, json } => {
            let i = CredentialsClient::new(connect().await?)
                .get_issuer(pb::GetIssuerRequest { name })
                .answer()
                .await?;
            show::issuer(&i, json);
        }
        IssuerCommand::List { json } => {
            let list = CredentialsClient::new(connect().await?)
                .list_issuers(pb::ListIssuersRequest {})
                .answer()
                .await?;
            show::issuers(&list.issuers, json);
        }
        IssuerCommand::Update { name, change, json } => {
            let request = change.request(name)?;
            let i = CredentialsClient::new(connect().await?)
                .update_issuer(request)
                .answer()
                .await?;
            show::issuer(&i, json);
        }
        IssuerCommand::Rotate { name, json } => {
            let i = CredentialsClient::new(connect().await?)
                .rotate_issuer(pb::RotateIssuerRequest { name })
                .answer()
                .await?;
            show::issuer(&i, json);
        }
        IssuerCommand::Csr { name, version, out } => {
            let r = CredentialsClient::new(connect().await?)
                .get_issuer_csr(pb::GetIssuerCsrRequest {
                    issuer: name,
                    key_version: version.unwrap_or(0),
                })
                .answer()
                .await?;
            write_public(&out, &r.csr_pem)?;
            println!(
                "request for a CA certificate for key version {} written to {}",
                r.key_version,
                crate::audit::printable(&out.display().to_string())
            );
        }
        IssuerCommand::SetCertificate {
            name,
            version,
            chain,
            json,
        } => {
            let chain_pem = read_pem(&chain)?;
            let i = CredentialsClient::new(connect().await?)
                .set_issuer_certificate(pb::SetIssuerCertificateRequest {
                    issuer: name,
                    key_version: version,
                    chain_pem,
                })
                .answer()
                .await?;
            show::issuer(&i, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `kms credential ...`: a token to validate is read before `connect` is called.
pub(crate) async fn credential<F, Fut>(
    command: CredentialCommand,
    connect: F,
) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        CredentialCommand::Jwt {
            issuer,
            audience,
            subject,
            ttl,
            json,
        } => {
            let mut r = CredentialsClient::new(connect().await?)
                .issue_jwt(pb::IssueJwtRequest {
                    issuer,
                    audience,
                    subject: subject.unwrap_or_default(),
                    ttl_seconds: ttl.unwrap_or(0),
                })
                .answer()
                .await?;
            let token = Zeroizing::new(std::mem::take(&mut r.token));
            show::issued(&token, &r, json)?;
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::Ssh {
            issuer,
            public_key,
            out,
            principals,
            ttl,
            json,
        } => {
            let key = read_public_key(&public_key)?;
            let r = CredentialsClient::new(connect().await?)
                .issue_ssh(pb::IssueSshRequest {
                    issuer,
                    public_key: key,
                    principals,
                    ttl_seconds: ttl.unwrap_or(0),
                })
                .answer()
                .await?;
            if out == "-" {
                use std::io::Write as _;
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(r.certificate.as_bytes())?;
                stdout.flush()?;
            } else {
                std::fs::write(&out, &r.certificate)
                    .map_err(|e| format!("cannot write the certificate to {out}: {e}"))?;
            }
            show::ssh_certificate(&r, &out, json);
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::X509 {
            issuer,
            csr,
            out,
            chain_out,
            subject,
            ttl,
            json,
        } => {
            let shown = crate::audit::printable(&csr.display().to_string()).into_owned();
            let csr = read_limited(&csr, MAX_CSR)?;
            refuse_private_key(&csr, &shown, "the request (openssl req -new -out app.csr)")?;
            let r = CredentialsClient::new(connect().await?)
                .issue_x509(pb::IssueX509Request {
                    issuer,
                    csr,
                    subject: subject.unwrap_or_default(),
                    ttl_seconds: ttl.unwrap_or(0),
                })
                .answer()
                .await?;
            write_public(&out, &r.certificate_pem)?;
            if let Some(path) = &chain_out {
                write_public(path, &r.chain_pem)?;
            }
            show::issued_x509(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::Validate {
            issuer,
            audience,
            token,
            json,
        } => {
            let token = match token {
                Some(t) if t != "-" => Zeroizing::new(t),
                _ => read_token(&mut std::io::stdin().lock())?,
            };
            let r = CredentialsClient::new(connect().await?)
                .validate_jwt(pb::ValidateJwtRequest {
                    issuer,
                    token: token.to_string(),
                    audience,
                })
                .answer()
                .await?;
            show::validated(&r, json);
            Ok(if r.valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        CredentialCommand::Revoke { issuer, jti } => {
            let r = CredentialsClient::new(connect().await?)
                .revoke_jwt(pb::RevokeJwtRequest { issuer, jti })
                .answer()
                .await?;
            println!(
                "revoked: credential validate refuses it until {}",
                show::time(r.until_unix)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The public key to certify, from a file or standard input (`-`): at most 64 KiB read
/// (the server takes one line of at most 16 KiB and says what is wrong with it).
fn read_public_key(path: &str) -> Result<String, BoxError> {
    let mut text = Zeroizing::new(String::new());
    let read = if path == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_TOKEN)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_TOKEN).read_to_string(&mut text))
    };
    let shown = crate::audit::printable(path).into_owned();
    read.map_err(|e| format!("cannot read the public key from {shown}: {}", e.kind()))?;
    refuse_private_key(text.as_bytes(), &shown, "the public key (id.pub)")?;
    Ok(text.to_string())
}

/// Refuses a file that holds a private key (`id_ed25519` for `id_ed25519.pub`, the key
/// for the request): it is never sent.
fn refuse_private_key(bytes: &[u8], shown: &str, give: &str) -> Result<(), BoxError> {
    let private = bytes
        .windows(b"PRIVATE KEY-----".len())
        .any(|w| w == b"PRIVATE KEY-----");
    if private {
        return Err(format!(
            "{shown} holds a private key, which never leaves your machine: give {give}"
        )
        .into());
    }
    Ok(())
}

/// The largest request `credential x509` reads (the server refuses over 16 KiB).
const MAX_CSR: u64 = 16 << 10;
/// The largest chain `issuer set-certificate` reads (the server refuses over 64 KiB).
const MAX_CHAIN: u64 = 64 << 10;

/// A file's bytes, refused when over `max` bytes.
fn read_limited(path: &std::path::Path, max: u64) -> Result<Vec<u8>, BoxError> {
    let shown = crate::audit::printable(&path.display().to_string()).into_owned();
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {}", e.kind()))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {}", e.kind()))?;
    if bytes.len() as u64 > max {
        return Err(format!("{shown} is over {max} bytes").into());
    }
    Ok(bytes)
}

/// A PEM file's text.
fn read_pem(path: &std::path::Path) -> Result<String, BoxError> {
    String::from_utf8(read_limited(path, MAX_CHAIN)?)
        .map_err(|_| "a PEM file is text (ASCII)".into())
}

/// Writes a public document (a certificate, a request): nothing secret, so the usual
/// permissions.
fn write_public(path: &std::path::Path, text: &str) -> Result<(), BoxError> {
    std::fs::write(path, text).map_err(|e| {
        format!(
            "cannot write {}: {}",
            crate::audit::printable(&path.display().to_string()),
            e.kind()
        )
        .into()
    })
}

/// A token from standard input, without the white space around it (a trailing newline).
/// No error names what was read.
fn read_token(input: &mut impl std::io::Read) -> Result<Zeroizing<String>, BoxError> {
    let mut text = Zeroizing::new(String::new());
    input
        .take(MAX_TOKEN)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the token from standard input: {}", e.kind()))?;
    let token = Zeroizing::new(text.trim().to_owned());
    if token.is_empty() {
        return Err("no token: give it as an argument or on standard input".into());
    }
    Ok(token)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The commands alone, parsed as `kms` parses them.
    #[derive(Debug, Parser)]
    #[allow(clippy::large_enum_variant, reason = "parsed once per test")]
    enum Cli {
        Issuer {
            #[command(subcommand)]
            command: IssuerCommand,
        },
        Credential {
            #[command(subcommand)]
            command: CredentialCommand,
        },
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kms").chain(args.iter().copied()))
    }

    fn create(args: &[&str]) -> Result<pb::Issuer, String> {
        let mut all = vec!["issuer", "create", "jwt", "--key", "k", "--audience", "a"];
        all.extend_from_slice(args);
        match parse(&all).unwrap() {
            Cli::Issuer {
                command:
                    IssuerCommand::Create {
                        name, definition, ..
                    },
            } => definition.issuer(name),
            other => panic!("{other:?}"),
        }
    }

    fn update(args: &[&str]) -> Result<pb::UpdateIssuerRequest, String> {
        let mut all = vec!["issuer", "update", "jwt"];
        all.extend_from_slice(args);
        match parse(&all).unwrap() {
            Cli::Issuer {
                command: IssuerCommand::Update { name, change, .. },
            } => change.request(name),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn claims_are_key_value_pairs_each_key_once() {
        let i = create(&[
            "--claim",
            "team=platform",
            "--claim",
            "eq=a=b",
            "--claim",
            "e=",
        ])
        .unwrap();
        assert_eq!(i.claims["team"], "platform");
        assert_eq!(i.claims["eq"], "a=b");
        assert_eq!(i.claims["e"], "");
        let twice = create(&["--claim", "team=a", "--claim", "team=b"]).unwrap_err();
        assert!(twice.contains("\"team\" is given twice"), "{twice}");
        let twice = update(&["--claim", "team=a", "--claim", "team=a"]).unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
        for bad in ["team", "=x"] {
            assert!(
                parse(&[
                    "issuer",
                    "create",
                    "j",
                    "--key",
                    "k",
                    "--audience",
                    "a",
                    "--claim",
                    bad
                ])
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn credential_ssh_takes_principals_a_ttl_and_an_output() {
        match parse(&[
            "credential",
            "ssh",
            "--issuer",
            "people",
            "--public-key",
            "id.pub",
            "--out",
            "-",
            "--principal",
            "root",
            "--principal",
            "deploy",
            "--ttl",
            "10m",
        ])
        .unwrap()
        {
            Cli::Credential {
                command:
                    CredentialCommand::Ssh {
                        issuer,
                        public_key,
                        out,
                        principals,
                        ttl,
                        json,
                    },
            } => {
                assert_eq!((issuer.as_str(), public_key.as_str()), ("people", "id.pub"));
                assert_eq!((out.as_str(), ttl, json), ("-", Some(600), false));
                assert_eq!(principals, ["root", "deploy"]);
            }
            other => panic!("{other:?}"),
        }
        // Where the certificate goes is never guessed.
        assert!(parse(&["credential", "ssh", "--issuer", "i", "--public-key", "k"]).is_err());
    }

    #[test]
    fn durations_are_sent_in_seconds() {
        let i = create(&["--default-ttl", "5m", "--max-ttl", "1h"]).unwrap();
        assert_eq!((i.default_ttl_seconds, i.max_ttl_seconds), (300, 3600));
        let i = create(&[]).unwrap();
        assert_eq!((i.default_ttl_seconds, i.max_ttl_seconds), (0, 0));
        let bad = parse(&[
            "issuer",
            "create",
            "j",
            "--key",
            "k",
            "--audience",
            "a",
            "--max-ttl",
            "soon",
        ]);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("examples: 90s, 5m, 1h")
        );
        match parse(&[
            "credential",
            "jwt",
            "--issuer",
            "i",
            "--audience",
            "a",
            "--ttl",
            "2m",
        ])
        .unwrap()
        {
            Cli::Credential {
                command: CredentialCommand::Jwt { ttl, .. },
            } => assert_eq!(ttl, Some(120)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn x509_commands_need_their_files_and_version() {
        let x509 = ["credential", "x509", "--issuer", "i", "--csr", "r.csr"];
        assert!(parse(&x509).is_err(), "--out is needed");
        let mut all = x509.to_vec();
        all.extend(["--out", "c.pem", "--ttl", "1h"]);
        match parse(&all).unwrap() {
            Cli::Credential {
                command:
                    CredentialCommand::X509 {
                        ttl,
                        chain_out,
                        subject,
                        ..
                    },
            } => assert_eq!((ttl, chain_out, subject), (Some(3600), None, None)),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["issuer", "set-certificate", "i", "--chain", "c.pem"]).is_err());
        match parse(&["issuer", "csr", "i", "--out", "ca.csr"]).unwrap() {
            Cli::Issuer {
                command: IssuerCommand::Csr { version, .. },
            } => assert_eq!(version, None),
            other => panic!("{other:?}"),
        }
    }

    /// A file over the server's limit is refused before any call, naming the file.
    #[test]
    fn a_request_over_the_limit_is_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.csr");
        std::fs::write(&big, vec![b'A'; (MAX_CSR + 1) as usize]).unwrap();
        let e = read_limited(&big, MAX_CSR).unwrap_err().to_string();
        assert!(e.contains("big.csr") && e.contains("over"), "{e}");
        std::fs::write(&big, b"ok").unwrap();
        assert_eq!(read_limited(&big, MAX_CSR).unwrap(), b"ok");
    }

    #[test]
    fn create_needs_a_key() {
        assert!(parse(&["issuer", "create", "j", "--audience", "a"]).is_err());
        let i = create(&["--principal", "p1", "--principal", "p2*", "--audience", "b"]).unwrap();
        assert_eq!(i.name, "jwt");
        assert_eq!(i.principals, ["p1", "p2*"]);
        assert_eq!(i.audiences, ["a", "b"]);
    }

    #[test]
    fn an_update_sends_only_what_is_given_and_a_list_whole() {
        let r = update(&["--max-ttl", "10m", "--audience", "x", "--audience", "y"]).unwrap();
        assert_eq!(r.max_ttl_seconds, Some(600));
        assert_eq!(r.audiences.unwrap().values, ["x", "y"]);
        assert_eq!(r.principals, None);
        assert_eq!(r.claims, None);
        assert_eq!(r.key, None);
        assert_eq!(r.default_ttl_seconds, None);
        let r = update(&["--claim", "a=1"]).unwrap();
        assert_eq!(r.claims.unwrap().entries["a"], "1");
        assert!(update(&[]).unwrap_err().contains("nothing to change"));
    }

    #[test]
    fn lifetimes_are_whole_seconds_and_private_keys_stay_home() {
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("2m"), Ok(120));
        for bad in ["500ms", "0", "0s", "1500ms", "soon"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        let key = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----\n";
        let e = refuse_private_key(key, "id_ed25519", "the public key (id.pub)")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("id_ed25519 holds a private key") && !e.contains("b3Bl"),
            "{e}"
        );
        assert!(refuse_private_key(b"-----BEGIN EC PRIVATE KEY-----", "k", "x").is_err());
        assert!(refuse_private_key(b"ssh-ed25519 AAAA alice@laptop", "id.pub", "x").is_ok());
    }

    #[test]
    fn clear_empties_a_list_and_not_one_given() {
        let r = update(&[
            "--clear",
            "delegators",
            "--clear",
            "subjects",
            "--clear",
            "claims",
        ])
        .unwrap();
        assert_eq!(r.delegators, Some(pb::StringList::default()));
        assert_eq!(r.subjects, Some(pb::StringList::default()));
        assert_eq!(r.claims, Some(pb::StringMap::default()));
        assert_eq!(r.principals, None);
        let r = update(&["--clear", "ssh-options", "--clear", "ssh-extensions"]).unwrap();
        assert_eq!(r.ssh_critical_options, Some(pb::StringMap::default()));
        assert_eq!(r.ssh_extensions, Some(pb::StringList::default()));
        let both = update(&["--clear", "subjects", "--subject", "spiffe://a/b"]).unwrap_err();
        assert!(both.contains("--clear subjects"), "{both}");
        let both = update(&["--clear", "claims", "--claim", "a=b"]).unwrap_err();
        assert!(both.contains("--clear claims"), "{both}");
        assert!(parse(&["issuer", "update", "j", "--clear", "everything"]).is_err());
    }

    #[test]
    fn kinds_and_their_settings_are_sent() {
        let i = create(&[
            "--kind",
            "ssh-user",
            "--ssh-principal",
            "deploy",
            "--ssh-option",
            "force-command=/bin/true",
            "--ssh-extension",
            "permit-pty",
            "--publish-ahead",
            "10m",
        ])
        .unwrap();
        assert_eq!(i.kind, pb::CredentialKind::SshUser as i32);
        assert_eq!(i.ssh_principals, ["deploy"]);
        assert_eq!(i.ssh_critical_options["force-command"], "/bin/true");
        assert_eq!(i.ssh_extensions, ["permit-pty"]);
        assert_eq!(i.publish_ahead_seconds, Some(600));
        let i = create(&["--kind", "x509", "--self-signed"]).unwrap();
        assert_eq!(i.kind, pb::CredentialKind::X509 as i32);
        assert!(i.self_signed);
        let i = create(&[]).unwrap();
        assert_eq!(i.kind, pb::CredentialKind::Jwt as i32);
        assert_eq!(i.publish_ahead_seconds, None);
        assert!(create(&["--ssh-option", "a=1", "--ssh-option", "a=2"]).is_err());
    }

    #[test]
    fn a_token_is_read_trimmed_and_never_echoed() {
        let t = read_token(&mut &b"aaa.bbb.ccc\n"[..]).unwrap();
        assert_eq!(t.as_str(), "aaa.bbb.ccc");
        let e = read_token(&mut &b" \n"[..]).unwrap_err().to_string();
        assert!(e.contains("no token"), "{e}");
        match parse(&[
            "credential",
            "validate",
            "--issuer",
            "i",
            "--audience",
            "a",
            "-",
        ])
        .unwrap()
        {
            Cli::Credential {
                command: CredentialCommand::Validate { token, .. },
            } => assert_eq!(token.as_deref(), Some("-")),
            other => panic!("{other:?}"),
        }
    }
}
