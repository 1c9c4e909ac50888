//! `kms db ...` and `kms lease ...`: dynamic database credentials (`kms.v1.Databases`,
//! docs/databases.md). An administrator defines connections (a PostgreSQL database and the
//! root login kms manages logins with) and roles (how a login is made and dropped, for how
//! long, for whom); a principal a role names asks for a login (`db creds`), which lives
//! under a lease it may renew, look up and revoke.
//!
//! A root password is never an argument (it would show in `ps` and shell history): it is
//! read from a file only its owner can read (`--password-file`), from standard input
//! (`--password-stdin`) or at a hidden prompt. An issued password is printed on standard
//! output once, by `db creds`, and nowhere else; no error of this module holds one.

mod show;
mod statics;

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::databases_client::DatabasesClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::credential::parse_ttl;
use crate::{Answer as _, BoxError};

/// The longest password read from a file or standard input.
const MAX_PASSWORD: u64 = 4 << 10;
/// The largest CA bundle or statements file read (the server bounds both).
const MAX_FILE: u64 = 256 << 10;
/// The page size `lease list` asks for (the server's most).
const PAGE: u32 = 1000;

/// `kms db ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Connections to databases (admin role): put, get, list, delete, rotate-root.
    Connection {
        #[command(subcommand)]
        command: ConnectionCommand,
    },
    /// Roles: how logins are made and dropped, for how long, for whom (admin role).
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// A new login under a role (a principal the role names): its lease id, duration,
    /// username and password, which is shown once and kept nowhere by kms.
    Creds {
        /// The role's name.
        role: String,
        /// The lease's duration (e.g. 15m; the role's default when absent, at most its
        /// maximum).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Print JSON, shaped as Vault's answer: `lease_id`, `lease_duration`,
        /// `renewable`, and `data` with `username` and `password` (also at the top level).
        #[arg(long)]
        json: bool,
    },
    /// Static roles: existing logins whose password kms sets on a schedule and serves
    /// (admin role).
    StaticRole {
        #[command(subcommand)]
        command: statics::StaticRoleCommand,
    },
    /// A static role's login and current password (a principal the static role names).
    StaticCreds {
        /// The static role's name.
        name: String,
        /// Print JSON, shaped as Vault's answer (`data` with `username`, `password`,
        /// `last_vault_rotation`, `rotation_period`, `ttl`).
        #[arg(long)]
        json: bool,
    },
}

/// `kms db connection ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ConnectionCommand {
    /// Create or replace a connection (admin role). The root password comes from
    /// --password-file, --password-stdin, or a hidden prompt on a terminal; with none of
    /// them and no terminal, the stored one is kept (a new connection needs one).
    Put {
        /// 1 to 64 of A-Z a-z 0-9 _ -
        name: String,
        #[command(flatten)]
        definition: ConnectionDefinition,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a connection (never its password).
    Get {
        /// The connection's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every connection.
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Remove a connection: refused while leases of it are live, unless --force (they are
    /// revoked first).
    Delete {
        /// The connection's name.
        name: String,
        /// Revoke its live leases first.
        #[arg(long)]
        force: bool,
    },
    /// Give the root login a new password that only kms knows.
    RotateRoot {
        /// The connection's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `db connection put` defines.
#[derive(Debug, clap::Args)]
pub(crate) struct ConnectionDefinition {
    /// `postgresql://{{username}}:{{password}}@HOST:PORT/DB?sslmode=...`: kms puts the root
    /// login in place of the two placeholders (quote it for the shell).
    #[arg(long, value_name = "URL")]
    url: String,
    /// The root login's name (it needs CREATEROLE).
    #[arg(long)]
    username: String,
    /// A file holding the root password (its first line), readable by its owner only
    /// (chmod 600).
    #[arg(long, value_name = "FILE", conflicts_with = "password_stdin")]
    password_file: Option<PathBuf>,
    /// Read the root password from standard input (its first line).
    #[arg(long)]
    password_stdin: bool,
    /// A role that may use the connection: a name, or a prefix ending in `*`
    /// (repeatable; none: no role may).
    #[arg(long = "allowed-role", value_name = "ROLE")]
    allowed_roles: Vec<String>,
    /// The CA bundle (PEM) the database's certificate must chain to: TLS is then required.
    /// Without it the URL must say `sslmode=disable`.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Connections kms keeps open to the database (the server's default: 4; at most 64).
    #[arg(long, value_name = "N")]
    max_open_connections: Option<u32>,
    /// Store the connection without trying it first.
    #[arg(long)]
    skip_verify: bool,
}

/// `kms db role ...`.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per command")]
pub(crate) enum RoleCommand {
    /// Create or replace a role (admin role). Leases issued before keep the statements
    /// they were issued with.
    Put {
        /// 1 to 64 of A-Z a-z 0-9 _ -
        name: String,
        #[command(flatten)]
        definition: RoleDefinition,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a role.
    Get {
        /// The role's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every role.
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Remove a role: refused while leases of it are live, unless --force (they are
    /// revoked first).
    Delete {
        /// The role's name.
        name: String,
        /// Revoke its live leases first.
        #[arg(long)]
        force: bool,
    },
}

/// What `db role put` defines.
#[derive(Debug, clap::Args)]
pub(crate) struct RoleDefinition {
    /// The connection it makes logins on.
    #[arg(long)]
    connection: String,
    /// SQL run in one transaction to make a login: `{{name}}`, `{{password}}`,
    /// `{{expiration}}` (repeatable; quote it for the shell).
    #[arg(long = "creation-statement", value_name = "SQL")]
    creation_statements: Vec<String>,
    /// A file of SQL, one more creation statement (it may hold several, separated by `;`).
    #[arg(long, value_name = "FILE")]
    creation_statements_file: Option<PathBuf>,
    /// SQL run to drop a login, `{{name}}` (repeatable; none: kms's default, which ends
    /// its sessions, hands what it owns to the root login and drops it).
    #[arg(long = "revocation-statement", value_name = "SQL")]
    revocation_statements: Vec<String>,
    /// SQL run when a lease is renewed, `{{name}}`, `{{expiration}}` (repeatable; none:
    /// VALID UNTIL the new expiry).
    #[arg(long = "renew-statement", value_name = "SQL")]
    renew_statements: Vec<String>,
    /// A lease's duration when the request gives none (e.g. 1h; the server's default: 1h).
    #[arg(long, value_parser = parse_ttl)]
    default_ttl: Option<u64>,
    /// The longest a lease may last, renewals included (e.g. 24h; the server's default:
    /// 24h, at most 30 days).
    #[arg(long, value_parser = parse_ttl)]
    max_ttl: Option<u64>,
    /// A login's name: `{{role}}`, `{{caller}}`, `{{random}}` (required), `{{unix_time}}`
    /// and a-z 0-9 _ - (the server's default: `kms_{{role}}_{{caller}}_{{random}}`).
    #[arg(long, value_name = "TEMPLATE")]
    username_template: Option<String>,
    /// A password's length (the server's default: 32; 20 to 100).
    #[arg(long, value_name = "N")]
    password_length: Option<u32>,
    /// Who may ask for credentials: a principal, or a prefix ending in `*` (repeatable).
    #[arg(long = "principal", value_name = "PRINCIPAL")]
    principals: Vec<String>,
}

/// `kms lease ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum LeaseCommand {
    /// Extend a lease (its holder, or an administrator), never past its issue time plus
    /// the role's maximum.
    Renew {
        /// The lease id (`database/creds/ROLE/ID`).
        lease_id: String,
        /// How long from now (e.g. 1h; the lease's own duration when absent).
        #[arg(long, value_parser = parse_ttl)]
        increment: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop the login now (its holder, or an administrator).
    Revoke {
        /// The lease id.
        lease_id: String,
        /// Drop the lease's record even if the database refuses to drop the login
        /// (administrators; drop the login by hand).
        #[arg(long)]
        force: bool,
    },
    /// Schedule every lease whose id starts with PREFIX for revocation now (admin role):
    /// `database/creds/ROLE/` is every lease of a role.
    RevokePrefix {
        /// At least `database/creds/`.
        prefix: String,
    },
    /// Show a lease (its holder, or an administrator).
    Lookup {
        /// The lease id.
        lease_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Leases by id, every page (admin role).
    List {
        /// Only ids starting with it.
        #[arg(long)]
        prefix: Option<String>,
        /// Only the leases whose revocation failed for good.
        #[arg(long)]
        irrevocable: bool,
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
}

/// Where the root password comes from.
enum PasswordFrom<'a> {
    File(&'a Path),
    Stdin,
    /// A hidden prompt on a terminal, else nothing (keep the stored one).
    PromptOrKeep,
}

/// A root password read from a file, which must be readable by its owner only, as the
/// server's PIN and database password files must: its first line. No error names what was
/// read.
fn read_password_file(path: &Path) -> Result<Zeroizing<String>, BoxError> {
    use std::os::unix::fs::PermissionsExt as _;
    let shown = crate::audit::printable(&path.display().to_string()).into_owned();
    let file = std::fs::File::open(path)
        .map_err(|e| format!("--password-file {shown}: cannot read it: {}", e.kind()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("--password-file {shown}: cannot read it: {}", e.kind()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "--password-file {shown} is readable by group or others: chmod 600 it"
        )
        .into());
    }
    first_line(file, &format!("--password-file {shown}"))
}

/// The first line of `input`, without its line ending: not empty, UTF-8, at most
/// `MAX_PASSWORD` bytes. No error names what was read.
fn first_line(input: impl std::io::Read, what: &str) -> Result<Zeroizing<String>, BoxError> {
    let mut bytes = Zeroizing::new(Vec::new());
    input
        .take(MAX_PASSWORD + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what}: cannot read it: {}", e.kind()))?;
    if bytes.len() as u64 > MAX_PASSWORD {
        return Err(format!("{what}: a password is at most {MAX_PASSWORD} bytes").into());
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| format!("{what}: not UTF-8 text"))?;
    let line = text.split(['\n', '\r']).next().unwrap_or_default();
    if line.is_empty() {
        return Err(format!("{what}: no password on its first line").into());
    }
    Ok(Zeroizing::new(line.to_owned()))
}

/// The root password to send: empty means "keep the stored one".
fn root_password(from: PasswordFrom<'_>) -> Result<Zeroizing<String>, BoxError> {
    match from {
        PasswordFrom::File(path) => read_password_file(path),
        PasswordFrom::Stdin => first_line(std::io::stdin().lock(), "--password-stdin"),
        PasswordFrom::PromptOrKeep => {
            if !std::io::stdin().is_terminal() {
                return Ok(Zeroizing::new(String::new()));
            }
            Ok(Zeroizing::new(rpassword::prompt_password(
                "Root password (input is hidden; empty: keep the stored one): ",
            )?))
        }
    }
}

/// A file's text, refused over `MAX_FILE` bytes.
fn read_text(flag: &str, path: &Path) -> Result<String, BoxError> {
    let shown = crate::audit::printable(&path.display().to_string()).into_owned();
    let file = std::fs::File::open(path)
        .map_err(|e| format!("{flag} {shown}: cannot read it: {}", e.kind()))?;
    let mut text = String::new();
    file.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{flag} {shown}: cannot read it as text: {}", e.kind()))?;
    if text.len() as u64 > MAX_FILE {
        return Err(format!("{flag} {shown} is over {MAX_FILE} bytes").into());
    }
    Ok(text)
}

impl ConnectionDefinition {
    /// The connection, and where its password comes from.
    fn connection(
        &self,
        name: String,
    ) -> Result<(pb::DatabaseConnection, PasswordFrom<'_>), BoxError> {
        let ca_pem = match &self.ca_file {
            Some(path) => read_text("--ca-file", path)?,
            None => String::new(),
        };
        let from = match (&self.password_file, self.password_stdin) {
            (Some(path), _) => PasswordFrom::File(path),
            (None, true) => PasswordFrom::Stdin,
            (None, false) => PasswordFrom::PromptOrKeep,
        };
        Ok((
            pb::DatabaseConnection {
                name,
                plugin: "postgresql".to_owned(),
                connection_url: self.url.clone(),
                username: self.username.clone(),
                allowed_roles: self.allowed_roles.clone(),
                ca_pem,
                max_open_connections: self.max_open_connections.unwrap_or(0),
                ..pb::DatabaseConnection::default()
            },
            from,
        ))
    }
}

impl RoleDefinition {
    fn role(self, name: String) -> Result<pb::DatabaseRole, BoxError> {
        let mut creation = self.creation_statements;
        if let Some(path) = &self.creation_statements_file {
            let text = read_text("--creation-statements-file", path)?;
            if text.trim().is_empty() {
                return Err("--creation-statements-file holds no SQL".into());
            }
            creation.push(text);
        }
        if creation.is_empty() {
            return Err("a role needs SQL to make a login: --creation-statement or \
                 --creation-statements-file"
                .into());
        }
        Ok(pb::DatabaseRole {
            name,
            connection: self.connection,
            creation_statements: creation,
            revocation_statements: self.revocation_statements,
            renew_statements: self.renew_statements,
            default_ttl_seconds: self.default_ttl.unwrap_or(0),
            max_ttl_seconds: self.max_ttl.unwrap_or(0),
            username_template: self.username_template.unwrap_or_default(),
            password_length: self.password_length.unwrap_or(0),
            principals: self.principals,
            ..pb::DatabaseRole::default()
        })
    }
}

/// Runs `kms db ...`: files and passwords are read before `connect` is called.
pub(crate) async fn db<F, Fut>(command: DbCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        DbCommand::Connection { command } => connection(command, connect).await,
        DbCommand::Role { command } => role(command, connect).await,
        DbCommand::StaticRole { command } => statics::static_role(command, connect().await?).await,
        DbCommand::StaticCreds { name, json } => {
            statics::static_creds(name, json, connect().await?).await
        }
        DbCommand::Creds { role, ttl, json } => {
            let mut r = DatabasesClient::new(connect().await?)
                .get_database_credentials(pb::GetDatabaseCredentialsRequest {
                    role,
                    ttl_seconds: ttl.unwrap_or(0),
                })
                .answer()
                .await?;
            let password = Zeroizing::new(std::mem::take(&mut r.password));
            show::creds(&r, &password, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn connection<F, Fut>(command: ConnectionCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        ConnectionCommand::Put {
            name,
            definition,
            json,
        } => {
            let (connection, from) = definition.connection(name)?;
            let password = root_password(from)?;
            let c = DatabasesClient::new(connect().await?)
                .put_database_connection(pb::PutDatabaseConnectionRequest {
                    connection: Some(connection),
                    password: password.to_string(),
                    skip_verify: definition.skip_verify,
                })
                .answer()
                .await?;
            show::connection(&c, json);
        }
        ConnectionCommand::Get { name, json } => {
            let c = DatabasesClient::new(connect().await?)
                .get_database_connection(pb::GetDatabaseConnectionRequest { name })
                .answer()
                .await?;
            show::connection(&c, json);
        }
        ConnectionCommand::List { json } => {
            let r = DatabasesClient::new(connect().await?)
                .list_database_connections(pb::ListDatabaseConnectionsRequest {})
                .answer()
                .await?;
            show::connections(&r.connections, json);
        }
        ConnectionCommand::Delete { name, force } => {
            let r = DatabasesClient::new(connect().await?)
                .delete_database_connection(pb::DeleteDatabaseConnectionRequest {
                    name: name.clone(),
                    force,
                })
                .answer()
                .await?;
            println!(
                "connection {} deleted ({} lease(s) revoked first)",
                crate::audit::printable(&name),
                r.leases_revoked
            );
        }
        ConnectionCommand::RotateRoot { name, json } => {
            let c = DatabasesClient::new(connect().await?)
                .rotate_database_root(pb::RotateDatabaseRootRequest { name })
                .answer()
                .await?;
            if !json {
                println!("root password rotated: only kms knows it now");
            }
            show::connection(&c, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn role<F, Fut>(command: RoleCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    match command {
        RoleCommand::Put {
            name,
            definition,
            json,
        } => {
            let role = definition.role(name)?;
            let r = DatabasesClient::new(connect().await?)
                .put_database_role(pb::PutDatabaseRoleRequest { role: Some(role) })
                .answer()
                .await?;
            show::role(&r, json);
        }
        RoleCommand::Get { name, json } => {
            let r = DatabasesClient::new(connect().await?)
                .get_database_role(pb::GetDatabaseRoleRequest { name })
                .answer()
                .await?;
            show::role(&r, json);
        }
        RoleCommand::List { json } => {
            let r = DatabasesClient::new(connect().await?)
                .list_database_roles(pb::ListDatabaseRolesRequest {})
                .answer()
                .await?;
            show::roles(&r.roles, json);
        }
        RoleCommand::Delete { name, force } => {
            let r = DatabasesClient::new(connect().await?)
                .delete_database_role(pb::DeleteDatabaseRoleRequest {
                    name: name.clone(),
                    force,
                })
                .answer()
                .await?;
            println!(
                "role {} deleted ({} lease(s) revoked first)",
                crate::audit::printable(&name),
                r.leases_revoked
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `kms lease ...`.
pub(crate) async fn lease<F, Fut>(command: LeaseCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    let mut client = DatabasesClient::new(connect().await?);
    match command {
        LeaseCommand::Renew {
            lease_id,
            increment,
            json,
        } => {
            let l = client
                .renew_lease(pb::RenewLeaseRequest {
                    lease_id,
                    increment_seconds: increment.unwrap_or(0),
                })
                .answer()
                .await?;
            show::lease(&l, json);
        }
        LeaseCommand::Revoke { lease_id, force } => {
            let r = client
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: lease_id.clone(),
                    force,
                })
                .answer()
                .await?;
            let id = crate::audit::printable(&lease_id);
            if r.revoked {
                println!("revoked: the login of {id} is dropped");
            } else {
                println!(
                    "record dropped: the database refused to drop the login of {id}; drop it \
                     by hand"
                );
            }
        }
        LeaseCommand::RevokePrefix { prefix } => {
            let r = client
                .revoke_lease_prefix(pb::RevokeLeasePrefixRequest { prefix })
                .answer()
                .await?;
            println!(
                "{} lease(s) scheduled for revocation now (`kms lease list` shows those left)",
                r.scheduled
            );
        }
        LeaseCommand::Lookup { lease_id, json } => {
            let l = client
                .lookup_lease(pb::LookupLeaseRequest { lease_id })
                .answer()
                .await?;
            show::lease(&l, json);
        }
        LeaseCommand::List {
            prefix,
            irrevocable,
            json,
        } => {
            let mut leases = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = client
                    .list_leases(pb::ListLeasesRequest {
                        prefix: prefix.clone().unwrap_or_default(),
                        page_token,
                        page_size: PAGE,
                        irrevocable_only: irrevocable,
                    })
                    .answer()
                    .await?;
                leases.extend(r.leases);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            show::leases(&leases, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The commands alone, parsed as `kms` parses them.
    #[derive(Debug, Parser)]
    enum Cli {
        Db {
            #[command(subcommand)]
            command: DbCommand,
        },
        Lease {
            #[command(subcommand)]
            command: LeaseCommand,
        },
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kms").chain(args.iter().copied()))
    }

    const URL: &str = "postgresql://{{username}}:{{password}}@127.0.0.1:5432/app?sslmode=disable";

    #[test]
    fn a_password_is_never_an_argument() {
        for flag in ["--password", "--root-password"] {
            let e = parse(&[
                "db",
                "connection",
                "put",
                "pg",
                "--url",
                URL,
                "--username",
                "root",
                flag,
                "x",
            ])
            .unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{flag}");
        }
        // A file and standard input are one or the other.
        assert!(
            parse(&[
                "db",
                "connection",
                "put",
                "pg",
                "--url",
                URL,
                "--username",
                "root",
                "--password-file",
                "f",
                "--password-stdin",
            ])
            .is_err()
        );
    }

    #[test]
    fn a_connection_is_sent_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        match parse(&[
            "db",
            "connection",
            "put",
            "pg",
            "--url",
            URL,
            "--username",
            "root",
            "--allowed-role",
            "app",
            "--allowed-role",
            "ro-*",
            "--ca-file",
            ca.to_str().unwrap(),
            "--max-open-connections",
            "8",
            "--skip-verify",
        ])
        .unwrap()
        {
            Cli::Db {
                command:
                    DbCommand::Connection {
                        command:
                            ConnectionCommand::Put {
                                name, definition, ..
                            },
                    },
            } => {
                assert!(definition.skip_verify);
                let (c, from) = definition.connection(name).unwrap();
                assert!(matches!(from, PasswordFrom::PromptOrKeep));
                assert_eq!(c.name, "pg");
                assert_eq!(c.connection_url, URL);
                assert_eq!(c.username, "root");
                assert_eq!(c.allowed_roles, ["app", "ro-*"]);
                assert_eq!(c.ca_pem, "-----BEGIN CERTIFICATE-----\n");
                assert_eq!(c.max_open_connections, 8);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_password_file_must_be_private_and_is_never_echoed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("root-password");
        std::fs::write(&f, "s3cret-Root-pw\nignored\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password_file(&f).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&f).unwrap().as_str(), "s3cret-Root-pw");
        std::fs::write(&f, "\n").unwrap();
        let e = read_password_file(&f).unwrap_err().to_string();
        assert!(e.contains("no password"), "{e}");
        assert_eq!(
            first_line(&b"pw\r\n"[..], "--password-stdin")
                .unwrap()
                .as_str(),
            "pw"
        );
        let big = vec![b'a'; MAX_PASSWORD as usize + 1];
        let e = first_line(&big[..], "x").unwrap_err().to_string();
        assert!(e.contains("at most") && !e.contains("aaaa"), "{e}");
    }

    #[test]
    fn a_role_needs_creation_sql_and_takes_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sql = dir.path().join("create.sql");
        std::fs::write(
            &sql,
            "CREATE ROLE \"{{name}}\" LOGIN; GRANT app TO \"{{name}}\";",
        )
        .unwrap();
        let role = |extra: &[&str]| {
            let mut all = vec!["db", "role", "put", "app", "--connection", "pg"];
            all.extend_from_slice(extra);
            match parse(&all).unwrap() {
                Cli::Db {
                    command:
                        DbCommand::Role {
                            command:
                                RoleCommand::Put {
                                    name, definition, ..
                                },
                        },
                } => definition.role(name),
                other => panic!("{other:?}"),
            }
        };
        let e = role(&[]).unwrap_err().to_string();
        assert!(e.contains("--creation-statement"), "{e}");
        let r = role(&[
            "--creation-statement",
            "CREATE ROLE \"{{name}}\"",
            "--creation-statements-file",
            sql.to_str().unwrap(),
            "--revocation-statement",
            "DROP ROLE \"{{name}}\"",
            "--default-ttl",
            "15m",
            "--max-ttl",
            "2h",
            "--principal",
            "spiffe://example.org/app",
            "--password-length",
            "40",
            "--username-template",
            "v_{{role}}_{{random}}",
        ])
        .unwrap();
        assert_eq!(r.creation_statements.len(), 2);
        assert!(r.creation_statements[1].starts_with("CREATE ROLE"));
        assert_eq!(r.revocation_statements, ["DROP ROLE \"{{name}}\""]);
        assert!(r.renew_statements.is_empty());
        assert_eq!((r.default_ttl_seconds, r.max_ttl_seconds), (900, 7200));
        assert_eq!(r.principals, ["spiffe://example.org/app"]);
        assert_eq!(r.password_length, 40);
        assert_eq!(r.username_template, "v_{{role}}_{{random}}");
    }

    #[test]
    fn durations_are_whole_seconds() {
        match parse(&["db", "creds", "app", "--ttl", "15m", "--json"]).unwrap() {
            Cli::Db {
                command: DbCommand::Creds { role, ttl, json },
            } => assert_eq!((role.as_str(), ttl, json), ("app", Some(900), true)),
            other => panic!("{other:?}"),
        }
        for bad in ["500ms", "0s", "soon"] {
            assert!(
                parse(&["db", "creds", "app", "--ttl", bad]).is_err(),
                "{bad}"
            );
            assert!(
                parse(&["lease", "renew", "database/creds/app/x", "--increment", bad]).is_err(),
                "{bad}"
            );
        }
        match parse(&[
            "lease",
            "renew",
            "database/creds/app/x",
            "--increment",
            "1h",
        ])
        .unwrap()
        {
            Cli::Lease {
                command: LeaseCommand::Renew { increment, .. },
            } => assert_eq!(increment, Some(3600)),
            other => panic!("{other:?}"),
        }
        match parse(&[
            "lease",
            "list",
            "--prefix",
            "database/creds/app/",
            "--irrevocable",
        ])
        .unwrap()
        {
            Cli::Lease {
                command:
                    LeaseCommand::List {
                        prefix,
                        irrevocable,
                        json,
                    },
            } => {
                assert_eq!(prefix.as_deref(), Some("database/creds/app/"));
                assert!(irrevocable && !json);
            }
            other => panic!("{other:?}"),
        }
    }
}
