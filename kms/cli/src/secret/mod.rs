//! `kms secret ...`: versioned secrets (`kms.v1.Secrets`), as `vault kv` handles Vault's
//! KV version 2: put, get, patch, list, delete, undelete, destroy, metadata, the engine's
//! configuration, and grants on path patterns.
//!
//! Only `get` prints a value; no error of this module holds one (the server's do not
//! either). Values given as arguments are visible in `ps` and shell history: give them as
//! `NAME=@FILE` or `NAME=-` (standard input) instead.

mod data;
mod show;

use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::secrets_client::SecretsClient;
use tonic::transport::Channel;

use crate::{Answer as _, BoxError};
use data::Pair;
use kms::policy::SecretOperation;

/// The largest message the CLI sends or reads: a version is at most 15 MiB
/// (`[secrets] max_secret_bytes`), in a message of at most 16 MiB.
const MAX_MESSAGE: usize = 16 << 20;

/// The secret commands.
#[derive(Debug, Subcommand)]
pub(crate) enum SecretCommand {
    /// Write a new version of a secret (made if absent) with these values.
    Put {
        /// The secret's path: segments of A-Z a-z 0-9 _ . - joined by `/`.
        path: String,
        /// NAME=VALUE, NAME=@FILE (the file's contents) or NAME=- (standard input), each
        /// taken exactly as given. Arguments show in `ps`: prefer @FILE or - for secrets.
        #[arg(value_name = "NAME=VALUE", required = true, value_parser = Pair::arg)]
        values: Vec<Pair>,
        /// Check-and-set: write only if the current version is N (0: only if the secret
        /// has no readable version).
        #[arg(long, value_name = "N")]
        cas: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read a version's values (the current version by default).
    Get {
        /// The secret's path.
        path: String,
        /// The version to read.
        #[arg(long)]
        version: Option<u64>,
        /// Print only this value, as it is stored: followed by a newline on a terminal,
        /// by nothing when piped (as `vault kv get -field` does).
        #[arg(long, value_name = "NAME", conflicts_with = "json")]
        field: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set and remove values of the current version, as a new version.
    Patch {
        /// The secret's path.
        path: String,
        /// NAME=VALUE, NAME=@FILE or NAME=- (as for put): values set.
        #[arg(value_name = "NAME=VALUE", value_parser = Pair::arg)]
        values: Vec<Pair>,
        /// A value's name to remove (repeatable).
        #[arg(long = "remove", value_name = "NAME")]
        remove: Vec<String>,
        /// Check-and-set: patch only if the current version is N.
        #[arg(long, value_name = "N")]
        cas: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The names under a prefix, one level down (a name ending in `/` has secrets beneath
    /// it), every page.
    List {
        /// The prefix (`payments` or `payments/`); the top when absent.
        prefix: Option<String>,
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Delete versions softly (the current one unless named): undelete brings them back.
    Delete {
        /// The secret's path.
        path: String,
        /// Comma-separated version numbers.
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u64>,
    },
    /// Make deleted versions readable again.
    Undelete {
        /// The secret's path.
        path: String,
        /// Comma-separated version numbers.
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// Destroy versions: their values are removed for good.
    Destroy {
        /// The secret's path.
        path: String,
        /// Comma-separated version numbers.
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    /// A secret's metadata: show, set, or delete the secret with every version.
    Metadata {
        #[command(subcommand)]
        command: MetadataCommand,
    },
    /// The engine's configuration (set: admin role).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Grants on secrets' path patterns (admin role).
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
    },
}

/// `kms secret metadata ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum MetadataCommand {
    /// Show a secret's metadata and versions (never a value).
    Get {
        /// The secret's path.
        path: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a secret's metadata (made, with no version, if absent).
    Put {
        /// The secret's path.
        path: String,
        /// Versions kept, up to 1000 (0: the engine's). A lower number drops the oldest
        /// versions at once.
        #[arg(long)]
        max_versions: Option<u32>,
        /// Whether every write must give --cas.
        #[arg(long, value_name = "true|false")]
        cas_required: Option<bool>,
        /// Delete each new version this long after it is written (e.g. 1h, 30d; 0: the
        /// engine's).
        #[arg(long, value_parser = parse_duration)]
        delete_version_after: Option<u64>,
        /// Custom metadata KEY=VALUE (repeatable); replaces all of it when given.
        #[arg(long = "custom", value_parser = parse_custom)]
        custom: Vec<(String, String)>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret: its metadata and every version.
    Delete {
        /// The secret's path.
        path: String,
    },
}

/// `kms secret config ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Show the engine's configuration.
    Get {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the engine's configuration (admin role).
    Set {
        /// Versions a secret keeps unless it says (0: the default, 10).
        #[arg(long)]
        max_versions: Option<u32>,
        /// Whether every write must give --cas.
        #[arg(long, value_name = "true|false")]
        cas_required: Option<bool>,
        /// Delete each new version this long after it is written (0: never).
        #[arg(long, value_parser = parse_duration)]
        delete_version_after: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `kms secret grant ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum GrantCommand {
    /// Allow a principal (or a prefix ending in `*`) operations on the secrets a path
    /// pattern matches: a path, a path followed by `/*` or `*`, or `*` alone.
    Create {
        /// The path pattern, e.g. `payments/*`.
        pattern: String,
        /// The grantee: a principal (URI SAN or CN), or a prefix ending in `*`.
        principal: String,
        /// Comma-separated: secret-read, secret-write, secret-list, secret-delete,
        /// secret-destroy, secret-read-metadata.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_operation)]
        operations: Vec<SecretOperation>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The grants on secrets.
    List {
        /// Only grants with exactly this pattern.
        #[arg(long)]
        path: Option<String>,
        /// Only grants to exactly this grantee.
        #[arg(long)]
        principal: Option<String>,
        /// Print JSON (one object per line).
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant by id: the next call it allowed is refused.
    Revoke {
        /// The grant id (from `kms secret grant list`).
        id: String,
    },
}

fn parse_operation(s: &str) -> Result<SecretOperation, String> {
    SecretOperation::from_name(s).ok_or_else(|| {
        format!(
            "unknown operation {s:?}: use {}",
            SecretOperation::ALL.map(SecretOperation::name).join(", ")
        )
    })
}

/// A duration (`1h`, `30d`), or `0`, in seconds (`kms issuer` and `kms credential` parse
/// theirs so too).
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{e} (examples: 1h, 30d, 0)"))
}

fn parse_custom(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "custom metadata is KEY=VALUE".to_owned())
}

/// Runs `kms secret ...`: the command's input (files, standard input) is read before
/// `connect` is called.
pub(crate) async fn run<F, Fut>(command: SecretCommand, connect: F) -> Result<ExitCode, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Channel, BoxError>>,
{
    let client = |channel| {
        SecretsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    };
    match command {
        SecretCommand::Put {
            path,
            values,
            cas,
            json,
        } => {
            let data = data::values(&values, &mut std::io::stdin().lock())?;
            let v = client(connect().await?)
                .put_secret(pb::PutSecretRequest {
                    path: path.clone(),
                    data,
                    cas,
                })
                .answer()
                .await?;
            show::written(&path, &v, json);
        }
        SecretCommand::Patch {
            path,
            values,
            remove,
            cas,
            json,
        } => {
            if values.is_empty() && remove.is_empty() {
                return Err("give values to set (NAME=VALUE) or --remove NAME".into());
            }
            let set = data::values(&values, &mut std::io::stdin().lock())?;
            if let Some(both) = remove.iter().find(|r| set.contains_key(*r)) {
                return Err(format!("the value {both:?} is both set and removed").into());
            }
            let v = client(connect().await?)
                .patch_secret(pb::PatchSecretRequest {
                    path: path.clone(),
                    set,
                    remove,
                    cas,
                })
                .answer()
                .await?;
            show::written(&path, &v, json);
        }
        SecretCommand::Get {
            path,
            version,
            field,
            json,
        } => {
            let r = client(connect().await?)
                .get_secret(pb::GetSecretRequest {
                    path: path.clone(),
                    version: version.unwrap_or(0),
                })
                .answer()
                .await?;
            let r = zeroize::Zeroizing::new(Read(r));
            match field {
                Some(name) => print_field(&r.0, &name)?,
                None => show::read(&path, &r.0, json),
            }
        }
        SecretCommand::List { prefix, json } => {
            list(
                &mut client(connect().await?),
                prefix.unwrap_or_default(),
                json,
            )
            .await?;
        }
        SecretCommand::Delete { path, versions } => {
            let named = versions.clone();
            let m = client(connect().await?)
                .delete_secret_versions(pb::SecretVersionsRequest { path, versions })
                .answer()
                .await?;
            let which = if named.is_empty() {
                vec![m.current_version]
            } else {
                named
            };
            changed(&m.path, &which, "deleted (undelete brings them back)");
        }
        SecretCommand::Undelete { path, versions } => {
            let m = client(connect().await?)
                .undelete_secret_versions(pb::SecretVersionsRequest {
                    path,
                    versions: versions.clone(),
                })
                .answer()
                .await?;
            changed(
                &m.path,
                &versions,
                "undeleted (destroyed ones stay destroyed)",
            );
        }
        SecretCommand::Destroy { path, versions } => {
            let m = client(connect().await?)
                .destroy_secret_versions(pb::SecretVersionsRequest {
                    path,
                    versions: versions.clone(),
                })
                .answer()
                .await?;
            changed(&m.path, &versions, "destroyed");
        }
        SecretCommand::Metadata { command } => {
            metadata(&mut client(connect().await?), command).await?;
        }
        SecretCommand::Config { command } => {
            config(&mut client(connect().await?), command).await?;
        }
        SecretCommand::Grant { command } => {
            grant(&mut client(connect().await?), command).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A read's answer, its values zeroized when dropped.
struct Read(pb::GetSecretResponse);

impl zeroize::Zeroize for Read {
    fn zeroize(&mut self) {
        for v in self.0.data.values_mut() {
            v.zeroize();
        }
    }
}

/// `get --field NAME`: the value alone, with a newline only on a terminal.
fn print_field(r: &pb::GetSecretResponse, name: &str) -> Result<(), BoxError> {
    use std::io::{IsTerminal as _, Write as _};
    let version = r.version.as_ref().map_or(0, |v| v.version);
    let value = r
        .data
        .get(name)
        .ok_or_else(|| format!("version {version} has no value named {name:?}"))?;
    let mut out = std::io::stdout().lock();
    out.write_all(value.as_bytes())?;
    if out.is_terminal() {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// What `delete`, `undelete` and `destroy` did.
fn changed(path: &str, versions: &[u64], what: &str) {
    let list: Vec<String> = versions.iter().map(u64::to_string).collect();
    println!(
        "Secret {}: version(s) {} {what}.",
        crate::audit::printable(path),
        list.join(", ")
    );
}

/// `kms secret list`: every page.
async fn list(c: &mut SecretsClient<Channel>, prefix: String, json: bool) -> Result<(), BoxError> {
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_secrets(pb::ListSecretsRequest {
                prefix: prefix.clone(),
                page_size: 1000,
                page_token: token,
            })
            .answer()
            .await?;
        keys.extend(page.keys);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if json {
        println!("{}", serde_json::json!(keys));
    } else {
        for k in &keys {
            println!("{}", crate::audit::printable(k));
        }
    }
    Ok(())
}

/// `kms secret metadata ...`.
async fn metadata(
    c: &mut SecretsClient<Channel>,
    command: MetadataCommand,
) -> Result<(), BoxError> {
    match command {
        MetadataCommand::Get { path, json } => {
            let m = c
                .get_secret_metadata(pb::GetSecretMetadataRequest { path })
                .answer()
                .await?;
            show::metadata(&m, json);
        }
        MetadataCommand::Put {
            path,
            max_versions,
            cas_required,
            delete_version_after,
            custom,
            json,
        } => {
            let custom_metadata = (!custom.is_empty()).then(|| pb::CustomMetadata {
                entries: custom.into_iter().collect(),
            });
            let m = c
                .update_secret_metadata(pb::UpdateSecretMetadataRequest {
                    path,
                    max_versions,
                    cas_required,
                    delete_version_after_seconds: delete_version_after,
                    custom_metadata,
                })
                .answer()
                .await?;
            show::metadata(&m, json);
        }
        MetadataCommand::Delete { path } => {
            c.delete_secret(pb::DeleteSecretRequest { path: path.clone() })
                .answer()
                .await?;
            println!(
                "Secret {}: deleted, with every version.",
                crate::audit::printable(&path)
            );
        }
    }
    Ok(())
}

/// `kms secret config ...`.
async fn config(c: &mut SecretsClient<Channel>, command: ConfigCommand) -> Result<(), BoxError> {
    let (config, json) = match command {
        ConfigCommand::Get { json } => (
            c.get_secrets_config(pb::GetSecretsConfigRequest {})
                .answer()
                .await?,
            json,
        ),
        ConfigCommand::Set {
            max_versions,
            cas_required,
            delete_version_after,
            json,
        } => {
            if max_versions.is_none() && cas_required.is_none() && delete_version_after.is_none() {
                return Err(
                    "nothing to set: give --max-versions, --cas-required or --delete-version-after"
                        .into(),
                );
            }
            let r = c
                .update_secrets_config(pb::UpdateSecretsConfigRequest {
                    max_versions,
                    cas_required,
                    delete_version_after_seconds: delete_version_after,
                })
                .answer()
                .await?;
            (r, json)
        }
    };
    show::config(&config, json);
    Ok(())
}

/// `kms secret grant ...`.
async fn grant(c: &mut SecretsClient<Channel>, command: GrantCommand) -> Result<(), BoxError> {
    match command {
        GrantCommand::Create {
            pattern,
            principal,
            operations,
            json,
        } => {
            let g = c
                .create_secret_grant(pb::CreateSecretGrantRequest {
                    path: pattern,
                    principal,
                    operations: operations
                        .into_iter()
                        .map(|o| kms::wire::secret_operation_pb(o) as i32)
                        .collect(),
                })
                .answer()
                .await?;
            if json {
                println!("{}", show::grant_json(&g));
            } else {
                println!("Grant {} created.", g.id);
                print!("{}", crate::audit::aligned(&[show::grant_line(&g)]));
            }
        }
        GrantCommand::List {
            path,
            principal,
            json,
        } => {
            let list = c
                .list_secret_grants(pb::ListSecretGrantsRequest {
                    path: path.unwrap_or_default(),
                    principal: principal.unwrap_or_default(),
                })
                .answer()
                .await?;
            if json {
                for g in &list.grants {
                    println!("{}", show::grant_json(g));
                }
            } else {
                let rows: Vec<Vec<String>> = list.grants.iter().map(show::grant_line).collect();
                print!("{}", crate::audit::aligned(&rows));
            }
        }
        GrantCommand::Revoke { id } => {
            let g = c
                .revoke_secret_grant(pb::RevokeSecretGrantRequest { id })
                .answer()
                .await?;
            println!("Grant {} revoked.", g.id);
        }
    }
    Ok(())
}
