//! `kms db static-role ...` and `kms db static-creds`: existing logins whose password kms
//! sets on a schedule and serves (docs/databases.md, "Static roles").

use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::databases_client::DatabasesClient;
use serde_json::{Value, json};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::audit::{aligned, rfc3339};
use crate::credential::parse_ttl;
use crate::{Answer as _, BoxError};

/// `kms db static-role ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum StaticRoleCommand {
    /// Manage an existing login's password (admin role): kms sets a new one at once, then
    /// every rotation period. Refused, and nothing stored, if the database refuses.
    Put {
        /// 1 to 64 of A-Z a-z 0-9 _ -
        name: String,
        /// The connection the login is on (its allowed_roles must name this role).
        #[arg(long)]
        connection: String,
        /// The existing login's name.
        #[arg(long)]
        username: String,
        /// How often the password changes (e.g. 24h, the server's default; at least 1m).
        #[arg(long, value_parser = parse_ttl)]
        rotation_period: Option<u64>,
        /// SQL run in one transaction to set the password, `{{name}}`, `{{password}}`
        /// (repeatable; none: ALTER ROLE ... WITH PASSWORD).
        #[arg(long = "rotation-statement", value_name = "SQL")]
        rotation_statements: Vec<String>,
        /// The password's length (the server's default: 32; 20 to 100).
        #[arg(long, value_name = "N")]
        password_length: Option<u32>,
        /// Who may read the password: a principal, or a prefix ending in `*` (repeatable).
        #[arg(long = "principal", value_name = "PRINCIPAL")]
        principals: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a static role (never its password).
    Get {
        /// The static role's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every static role.
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Stop managing the login (its password stays as last set).
    Delete {
        /// The static role's name.
        name: String,
    },
    /// Set a new password now (admin role).
    Rotate {
        /// The static role's name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn role_json(r: &pb::DatabaseStaticRole) -> Value {
    json!({
        "name": r.name,
        "connection": r.connection,
        "username": r.username,
        "rotation_period_seconds": r.rotation_period_seconds,
        "rotation_statements": r.rotation_statements,
        "password_length": r.password_length,
        "principals": r.principals,
        "last_rotated_unix": r.last_rotated_unix,
        "next_rotation_unix": r.next_rotation_unix,
        "last_error": r.last_error,
        "created_unix_ms": r.created_unix_ms,
        "created_by": r.created_by,
    })
}

fn show(r: &pb::DatabaseStaticRole, json: bool) {
    if json {
        println!("{}", role_json(r));
        return;
    }
    let time = |s: u64| rfc3339(s.saturating_mul(1000));
    let rows = vec![
        vec!["Name".to_owned(), r.name.clone()],
        vec!["Connection".to_owned(), r.connection.clone()],
        vec!["Login".to_owned(), r.username.clone()],
        vec![
            "Rotation period".to_owned(),
            format!("{} s", r.rotation_period_seconds),
        ],
        vec!["Last rotated".to_owned(), time(r.last_rotated_unix)],
        vec!["Next rotation".to_owned(), time(r.next_rotation_unix)],
        vec![
            "Last error".to_owned(),
            if r.last_error.is_empty() {
                "-".to_owned()
            } else {
                r.last_error.clone()
            },
        ],
        vec!["Principals".to_owned(), r.principals.join(", ")],
    ];
    print!("{}", aligned(&rows));
}

/// Runs `kms db static-role ...`.
pub(crate) async fn static_role(
    command: StaticRoleCommand,
    channel: Channel,
) -> Result<ExitCode, BoxError> {
    let mut c = DatabasesClient::new(channel);
    match command {
        StaticRoleCommand::Put {
            name,
            connection,
            username,
            rotation_period,
            rotation_statements,
            password_length,
            principals,
            json,
        } => {
            let r = c
                .put_database_static_role(pb::PutDatabaseStaticRoleRequest {
                    role: Some(pb::DatabaseStaticRole {
                        name,
                        connection,
                        username,
                        rotation_period_seconds: rotation_period.unwrap_or(0),
                        rotation_statements,
                        password_length: password_length.unwrap_or(0),
                        principals,
                        ..pb::DatabaseStaticRole::default()
                    }),
                })
                .answer()
                .await?;
            show(&r, json);
        }
        StaticRoleCommand::Get { name, json } => {
            let r = c
                .get_database_static_role(pb::GetDatabaseStaticRoleRequest { name })
                .answer()
                .await?;
            show(&r, json);
        }
        StaticRoleCommand::List { json } => {
            let roles = c
                .list_database_static_roles(pb::ListDatabaseStaticRolesRequest {})
                .answer()
                .await?
                .roles;
            if json {
                println!("{}", Value::Array(roles.iter().map(role_json).collect()));
            } else if roles.is_empty() {
                println!("no static roles");
            } else {
                let mut rows = vec![vec![
                    "NAME".to_owned(),
                    "CONNECTION".to_owned(),
                    "LOGIN".to_owned(),
                    "NEXT ROTATION".to_owned(),
                ]];
                for r in &roles {
                    rows.push(vec![
                        r.name.clone(),
                        r.connection.clone(),
                        r.username.clone(),
                        rfc3339(r.next_rotation_unix.saturating_mul(1000)),
                    ]);
                }
                print!("{}", aligned(&rows));
            }
        }
        StaticRoleCommand::Delete { name } => {
            c.delete_database_static_role(pb::DeleteDatabaseStaticRoleRequest {
                name: name.clone(),
            })
            .answer()
            .await?;
            println!(
                "static role {} removed: its login keeps its last password",
                crate::audit::printable(&name)
            );
        }
        StaticRoleCommand::Rotate { name, json } => {
            let r = c
                .rotate_database_static_role(pb::RotateDatabaseStaticRoleRequest { name })
                .answer()
                .await?;
            show(&r, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `kms db static-creds NAME`: the login's name and current password.
pub(crate) async fn static_creds(
    name: String,
    json: bool,
    channel: Channel,
) -> Result<ExitCode, BoxError> {
    let mut r = DatabasesClient::new(channel)
        .get_database_static_credentials(pb::GetDatabaseStaticCredentialsRequest { name })
        .answer()
        .await?;
    let password = Zeroizing::new(std::mem::take(&mut r.password));
    if json {
        // Vault's static-creds answer: `data` with the login, its password and times.
        println!(
            "{}",
            json!({
                "data": {
                    "username": r.username,
                    "password": password.as_str(),
                    "last_vault_rotation": rfc3339(r.last_rotated_unix.saturating_mul(1000)),
                    "rotation_period": r.rotation_period_seconds,
                    "ttl": r.ttl_seconds,
                },
            })
        );
    } else {
        let rows = vec![
            vec!["Login".to_owned(), r.username.clone()],
            vec!["Password".to_owned(), password.to_string()],
            vec![
                "Next rotation in".to_owned(),
                format!("{} s", r.ttl_seconds),
            ],
        ];
        print!("{}", aligned(&rows));
    }
    Ok(ExitCode::SUCCESS)
}
