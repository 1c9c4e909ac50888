//! `kms grant create|revoke|list` and `kms whoami`.

use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::access_client::AccessClient;
use tonic::transport::Channel;

use super::BoxError;
use crate::Answer as _;
use crate::crypto::{Aad, aad_value};
use kms::policy::Operation;
use kms::wire::{operation_from, operation_pb};

/// The grant commands.
#[derive(Debug, Subcommand)]
pub(super) enum GrantCommand {
    /// Allow a principal (or a prefix ending in `*`) some operations with one key.
    Create {
        /// The key to grant use of (it must exist).
        key: String,
        /// The grantee: a principal (URI SAN or CN), or a prefix ending in `*`.
        principal: String,
        /// Comma-separated: encrypt, decrypt, reencrypt-from (re-encrypt out of this key),
        /// reencrypt-to (into it), generate-data-key, sign, verify, get-public-key, mac,
        /// verify-mac.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_operation)]
        operations: Vec<Operation>,
        /// Allow the operations only with exactly this associated data.
        #[command(flatten)]
        aad: Aad,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant by id: the next call it allowed is refused.
    Revoke {
        /// The grant id (from `kms grant list`).
        id: String,
    },
    /// The grants in force.
    List {
        /// Only grants on this key.
        #[arg(long)]
        key: Option<String>,
        /// Only grants whose grantee is or matches this principal.
        #[arg(long)]
        principal: Option<String>,
        /// Print JSON (one object per line).
        #[arg(long)]
        json: bool,
    },
}

fn parse_operation(s: &str) -> Result<Operation, String> {
    Operation::from_name(s).ok_or_else(|| {
        format!(
            "unknown operation {s:?}: use {}",
            Operation::ALL.map(Operation::name).join(", ")
        )
    })
}

/// `encrypt`, `generate-data-key`, ...; `unknown` for a value this CLI does not know.
fn operation_name(v: i32) -> &'static str {
    if v == kms_proto::v1::Operation::Reencrypt as i32 {
        return "reencrypt (from before the split: allows nothing)";
    }
    operation_from(v).map_or("unknown", Operation::name)
}

fn grant_json(g: &pb::Grant) -> serde_json::Value {
    serde_json::json!({
        "id": g.id,
        "key": g.key,
        "principal": g.principal,
        "operations": g.operations.iter().map(|o| operation_name(*o)).collect::<Vec<_>>(),
        "requires_associated_data": g.requires_associated_data,
        "create_time": g.create_time,
        "created_by": g.created_by,
    })
}

fn print_grant(g: &pb::Grant) {
    let ops: Vec<&str> = g.operations.iter().map(|o| operation_name(*o)).collect();
    println!(
        "{}  {}  {}  {}{}",
        g.id,
        g.key,
        g.principal,
        ops.join(","),
        if g.requires_associated_data {
            "  (exact associated data)"
        } else {
            ""
        }
    );
}

/// Runs `kms grant ...`.
pub(super) async fn run(channel: Channel, command: GrantCommand) -> Result<ExitCode, BoxError> {
    let mut c = AccessClient::new(channel);
    match command {
        GrantCommand::Create {
            key,
            principal,
            operations,
            aad,
            json,
        } => {
            let g = c
                .create_grant(pb::CreateGrantRequest {
                    key,
                    principal,
                    operations: operations
                        .into_iter()
                        .map(|o| operation_pb(o) as i32)
                        .collect(),
                    associated_data: aad_value(&aad)?,
                })
                .answer()
                .await?;
            if json {
                println!("{}", grant_json(&g));
            } else {
                println!("Grant {} created.", g.id);
                print_grant(&g);
            }
        }
        GrantCommand::Revoke { id } => {
            let g = c
                .revoke_grant(pb::RevokeGrantRequest { id })
                .answer()
                .await?;
            println!("Grant {} revoked.", g.id);
        }
        GrantCommand::List {
            key,
            principal,
            json,
        } => {
            let list = c
                .list_grants(pb::ListGrantsRequest {
                    key: key.unwrap_or_default(),
                    principal: principal.unwrap_or_default(),
                })
                .answer()
                .await?;
            for g in &list.grants {
                if json {
                    println!("{}", grant_json(g));
                } else {
                    print_grant(g);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `kms whoami`.
pub(super) async fn whoami(channel: Channel, json: bool) -> Result<ExitCode, BoxError> {
    let r = AccessClient::new(channel)
        .who_am_i(pb::WhoAmIRequest {})
        .answer()
        .await?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "principal": r.principal,
                "authenticated": r.authenticated,
                "roles": r.roles,
                "tls": r.tls,
            })
        );
    } else {
        println!("Principal      {}", r.principal);
        println!("Authenticated  {}", r.authenticated);
        println!(
            "Roles          {}",
            if r.roles.is_empty() {
                "(none: per-key grants only)".to_owned()
            } else {
                r.roles.join(", ")
            }
        );
        println!("TLS            {}", r.tls);
    }
    Ok(ExitCode::SUCCESS)
}
