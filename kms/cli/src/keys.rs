//! `kms key ...`: key administration. `--json` prints one JSON object.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::Channel;

use super::BoxError;
use crate::Answer as _;
use kms::keyring::model::{Algorithm, Protection};
use kms::wire;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum AlgorithmArg {
    #[value(name = "aes-256-gcm")]
    Aes256Gcm,
    #[value(name = "ed25519")]
    Ed25519,
    #[value(name = "ecdsa-p256-sha256")]
    EcdsaP256Sha256,
    #[value(name = "ecdsa-p384-sha384")]
    EcdsaP384Sha384,
    #[value(name = "hmac-sha256")]
    HmacSha256,
    #[value(name = "rsa-sign-pss-2048-sha256")]
    RsaSignPss2048Sha256,
    #[value(name = "rsa-sign-pss-3072-sha256")]
    RsaSignPss3072Sha256,
    #[value(name = "rsa-sign-pss-4096-sha256")]
    RsaSignPss4096Sha256,
    #[value(name = "rsa-sign-pkcs1-2048-sha256")]
    RsaSignPkcs12048Sha256,
    #[value(name = "rsa-sign-pkcs1-3072-sha256")]
    RsaSignPkcs13072Sha256,
    #[value(name = "rsa-sign-pkcs1-4096-sha256")]
    RsaSignPkcs14096Sha256,
    #[value(name = "rsa-decrypt-oaep-2048-sha256")]
    RsaDecryptOaep2048Sha256,
    #[value(name = "rsa-decrypt-oaep-3072-sha256")]
    RsaDecryptOaep3072Sha256,
    #[value(name = "rsa-decrypt-oaep-4096-sha256")]
    RsaDecryptOaep4096Sha256,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum OriginArg {
    Generated,
    External,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum WrappingArg {
    #[value(name = "rsa-aes-key-wrap-sha-256")]
    RsaAesKeyWrapSha256,
    #[value(name = "rsaes-oaep-sha-256")]
    RsaesOaepSha256,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum ProtectionArg {
    Software,
    Hsm,
}

impl From<AlgorithmArg> for Algorithm {
    fn from(a: AlgorithmArg) -> Self {
        match a {
            AlgorithmArg::Aes256Gcm => Algorithm::Aes256Gcm,
            AlgorithmArg::Ed25519 => Algorithm::Ed25519,
            AlgorithmArg::EcdsaP256Sha256 => Algorithm::EcdsaP256Sha256,
            AlgorithmArg::EcdsaP384Sha384 => Algorithm::EcdsaP384Sha384,
            AlgorithmArg::HmacSha256 => Algorithm::HmacSha256,
            AlgorithmArg::RsaSignPss2048Sha256 => Algorithm::RsaSignPss2048Sha256,
            AlgorithmArg::RsaSignPss3072Sha256 => Algorithm::RsaSignPss3072Sha256,
            AlgorithmArg::RsaSignPss4096Sha256 => Algorithm::RsaSignPss4096Sha256,
            AlgorithmArg::RsaSignPkcs12048Sha256 => Algorithm::RsaSignPkcs12048Sha256,
            AlgorithmArg::RsaSignPkcs13072Sha256 => Algorithm::RsaSignPkcs13072Sha256,
            AlgorithmArg::RsaSignPkcs14096Sha256 => Algorithm::RsaSignPkcs14096Sha256,
            AlgorithmArg::RsaDecryptOaep2048Sha256 => Algorithm::RsaDecryptOaep2048Sha256,
            AlgorithmArg::RsaDecryptOaep3072Sha256 => Algorithm::RsaDecryptOaep3072Sha256,
            AlgorithmArg::RsaDecryptOaep4096Sha256 => Algorithm::RsaDecryptOaep4096Sha256,
        }
    }
}

impl From<ProtectionArg> for Protection {
    fn from(p: ProtectionArg) -> Self {
        match p {
            ProtectionArg::Software => Protection::Software,
            ProtectionArg::Hsm => Protection::Hsm,
        }
    }
}

/// `kms key ...`.
#[derive(Debug, Subcommand)]
pub(super) enum KeyCommand {
    /// Create a key (its version 1 is made at once; with `--origin external`, the key waits
    /// for `kms key import`).
    Create {
        /// The key's name: [a-zA-Z0-9_.-]{1,128}.
        name: String,
        /// The algorithm (the purpose follows from it).
        #[arg(long, value_enum)]
        algorithm: AlgorithmArg,
        /// Where the material lives.
        #[arg(long, value_enum, default_value = "software")]
        protection: ProtectionArg,
        /// Rotate automatically this often (e.g. 90d, 12h).
        #[arg(long, value_parser = parse_duration)]
        rotation_period: Option<u64>,
        /// A label, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// `external`: the material will be imported (bring your own key, docs/byok.md).
        #[arg(long, value_enum, default_value = "generated")]
        origin: OriginArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Get import parameters for an EXTERNAL key and write them to a directory: the
    /// wrapping public key (`wrapping-key.pem`) and the import token (`import-token.bin`).
    ImportParameters {
        /// The key.
        name: String,
        /// The directory to write them to (made if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// How long they stay valid (at most and by default 24h).
        #[arg(long, value_parser = parse_duration)]
        valid_for: Option<u64>,
    },
    /// Import key material into an EXTERNAL key, as a new primary version: either
    /// `--material FILE` (wrapped here, with fresh import parameters), or `--wrapped FILE
    /// --token FILE` (wrapped elsewhere with `kms key import-parameters`' output).
    Import {
        /// The key.
        name: String,
        /// The material: 32 raw bytes (AES-256, HMAC), or a PKCS#8 private key, DER or PEM.
        #[arg(long, conflicts_with_all = ["wrapped", "token"], required_unless_present = "wrapped")]
        material: Option<std::path::PathBuf>,
        /// Material wrapped with the import parameters' wrapping key.
        #[arg(long, requires = "token")]
        wrapped: Option<std::path::PathBuf>,
        /// The import token those parameters came with.
        #[arg(long, requires = "wrapped")]
        token: Option<std::path::PathBuf>,
        /// How the material is (to be) wrapped.
        #[arg(long, value_enum, default_value = "rsa-aes-key-wrap-sha-256")]
        wrapping_algorithm: WrappingArg,
        /// With --wrapped: the public key (PEM) of ECDSA or Ed25519 material, which an HSM
        /// key needs (with --material it is computed here).
        #[arg(long, requires = "wrapped")]
        public_key: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a key and its versions.
    Get {
        /// The key.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every key.
    List {
        /// Print JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Add a version and make it primary.
    Rotate {
        /// The key.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the rotation period, the minimum decryption version, or the labels.
    Update {
        /// The key.
        name: String,
        /// The new rotation period (e.g. 30d), or "off".
        #[arg(long)]
        rotation_period: Option<String>,
        /// Versions below this refuse to decrypt and verify.
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// Replace all labels with these, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Remove every label.
        #[arg(long, conflicts_with = "labels")]
        clear_labels: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enable a disabled version.
    EnableVersion {
        /// The key.
        name: String,
        /// The version number (see `kms key get`).
        version: u32,
    },
    /// Disable a version (it refuses every operation until enabled again).
    DisableVersion {
        /// The key.
        name: String,
        /// The version number (see `kms key get`).
        version: u32,
    },
    /// Schedule a version's destruction (crypto-shredding) after a waiting period.
    ScheduleDestroy {
        /// The key.
        name: String,
        /// The version number (see `kms key get`).
        version: u32,
        /// Days to wait, 1..=30.
        #[arg(long, default_value_t = 7)]
        days: u32,
    },
    /// Cancel a scheduled destruction (the version comes back disabled).
    CancelDestroy {
        /// The key.
        name: String,
        /// The version number (see `kms key get`).
        version: u32,
    },
}

fn parse_duration(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{e} (examples: 90d, 12h, 30m)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "a label is KEY=VALUE".to_owned())
}

fn key_json(k: &pb::Key) -> serde_json::Value {
    let name = |v: i32, f: fn(i32) -> Option<&'static str>| f(v).unwrap_or("UNKNOWN");
    serde_json::json!({
        "name": k.name,
        "purpose": name(k.purpose, |v| pb::Purpose::try_from(v).ok().map(|p| p.as_str_name())),
        "algorithm": name(k.algorithm, |v| pb::Algorithm::try_from(v).ok().map(|p| p.as_str_name())),
        "protection_level": name(k.protection_level, |v| pb::ProtectionLevel::try_from(v).ok().map(|p| p.as_str_name())),
        "primary_version": k.primary_version,
        "min_decryption_version": k.min_decryption_version,
        "rotation_period_seconds": k.rotation_period_seconds,
        "next_rotation_time": k.next_rotation_time,
        "create_time": k.create_time,
        "origin": name(k.origin, |v| pb::KeyOrigin::try_from(v).ok().map(|p| p.as_str_name())),
        "pending_import": k.pending_import,
        "labels": k.labels,
        "versions": k.versions.iter().map(|v| serde_json::json!({
            "version": v.version,
            "state": name(v.state, |s| pb::KeyVersionState::try_from(s).ok().map(|p| p.as_str_name())),
            "create_time": v.create_time,
            "destroy_time": v.destroy_time,
            "destroyed_time": v.destroyed_time,
            "origin": name(v.origin, |o| pb::KeyOrigin::try_from(o).ok().map(|p| p.as_str_name())),
        })).collect::<Vec<_>>(),
    })
}

/// A string field of a JSON object, or "".
fn text<'a>(v: &'a serde_json::Value, field: &str) -> &'a str {
    v.get(field)
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}

fn print_key(k: &pb::Key, json: bool) {
    let v = key_json(k);
    if json {
        println!("{v}");
        return;
    }
    println!("Name                    {}", k.name);
    println!("Purpose                 {}", text(&v, "purpose"));
    println!("Algorithm               {}", text(&v, "algorithm"));
    println!("Protection              {}", text(&v, "protection_level"));
    if k.origin == pb::KeyOrigin::External as i32 {
        println!("Origin                  EXTERNAL (imported material)");
    }
    if k.pending_import {
        println!("State                   PENDING_IMPORT: run kms key import");
    }
    println!("Primary version         {}", k.primary_version);
    println!("Min decryption version  {}", k.min_decryption_version);
    if k.rotation_period_seconds > 0 {
        println!(
            "Rotation period         {}",
            crate::show::duration_text(k.rotation_period_seconds)
        );
    }
    for (lk, lv) in &k.labels {
        println!("Label                   {lk}={lv}");
    }
    for ver in v
        .get("versions")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let n = ver
            .get("version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let imported = if text(ver, "origin") == "EXTERNAL" {
            "  (imported)"
        } else {
            ""
        };
        println!("Version {n:<16}{}{imported}", text(ver, "state"));
    }
}

/// Runs `kms key ...`.
pub(super) async fn run_key(channel: Channel, command: KeyCommand) -> Result<ExitCode, BoxError> {
    let mut c = KeyManagementClient::new(channel);
    let (key, json) = match command {
        KeyCommand::Create {
            name,
            algorithm,
            protection,
            rotation_period,
            labels,
            origin,
            json,
        } => {
            let req = pb::CreateKeyRequest {
                name,
                algorithm: wire::algorithm_pb(algorithm.into()) as i32,
                protection_level: wire::protection_pb(protection.into()) as i32,
                rotation_period_seconds: rotation_period.unwrap_or(0),
                labels: labels.into_iter().collect(),
                origin: match origin {
                    OriginArg::Generated => pb::KeyOrigin::Generated,
                    OriginArg::External => pb::KeyOrigin::External,
                } as i32,
            };
            (c.create_key(req).answer().await?, json)
        }
        KeyCommand::ImportParameters {
            name,
            out,
            valid_for,
        } => return crate::byok::import_parameters(&mut c, name, &out, valid_for).await,
        KeyCommand::Import {
            name,
            material,
            wrapped,
            token,
            wrapping_algorithm,
            public_key,
            json,
        } => {
            let wrapping = match wrapping_algorithm {
                WrappingArg::RsaAesKeyWrapSha256 => kms::keyring::Wrapping::RsaAesKeyWrapSha256,
                WrappingArg::RsaesOaepSha256 => kms::keyring::Wrapping::RsaesOaepSha256,
            };
            let source = match (material, wrapped, token) {
                (Some(m), _, _) => crate::byok::Source::Material(m),
                (None, Some(w), Some(t)) => crate::byok::Source::Wrapped {
                    wrapped: w,
                    token: t,
                    public_key,
                },
                _ => return Err("give --material FILE, or --wrapped FILE --token FILE".into()),
            };
            (
                crate::byok::import(&mut c, name, source, wrapping).await?,
                json,
            )
        }
        KeyCommand::Get { name, json } => {
            (c.get_key(pb::GetKeyRequest { name }).answer().await?, json)
        }
        KeyCommand::List { json } => return list_keys(&mut c, json).await,
        KeyCommand::Rotate { name, json } => (
            c.rotate_key(pb::RotateKeyRequest { name }).answer().await?,
            json,
        ),
        KeyCommand::Update {
            name,
            rotation_period,
            min_decryption_version,
            labels,
            clear_labels,
            json,
        } => {
            let req = update_request(
                name,
                rotation_period.as_deref(),
                min_decryption_version,
                labels,
                clear_labels,
            )?;
            (c.update_key(req).answer().await?, json)
        }
        version_command => (run_version(&mut c, version_command).await?, false),
    };
    print_key(&key, json);
    Ok(ExitCode::SUCCESS)
}

/// The commands on one key version (enable, disable, schedule and cancel destruction).
async fn run_version(
    c: &mut KeyManagementClient<Channel>,
    command: KeyCommand,
) -> Result<pb::Key, BoxError> {
    let version = |name, version| pb::KeyVersionRequest { name, version };
    Ok(match command {
        KeyCommand::EnableVersion { name, version: v } => {
            c.enable_key_version(version(name, v)).answer().await?
        }
        KeyCommand::DisableVersion { name, version: v } => {
            c.disable_key_version(version(name, v)).answer().await?
        }
        KeyCommand::ScheduleDestroy {
            name,
            version,
            days,
        } => {
            c.schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
                name,
                version,
                pending_days: days,
            })
            .answer()
            .await?
        }
        KeyCommand::CancelDestroy { name, version: v } => {
            c.cancel_key_version_destruction(version(name, v))
                .answer()
                .await?
        }
        KeyCommand::Create { .. }
        | KeyCommand::ImportParameters { .. }
        | KeyCommand::Import { .. }
        | KeyCommand::Get { .. }
        | KeyCommand::List { .. }
        | KeyCommand::Rotate { .. }
        | KeyCommand::Update { .. } => {
            return Err("not a key version command".into());
        }
    })
}

/// `kms key list`: every key, page by page, as a table or JSON.
async fn list_keys(c: &mut KeyManagementClient<Channel>, json: bool) -> Result<ExitCode, BoxError> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_keys(pb::ListKeysRequest {
                page_size: 1000,
                page_token: token,
            })
            .answer()
            .await?;
        all.extend(page.keys);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if json {
        println!(
            "{}",
            serde_json::Value::Array(all.iter().map(key_json).collect())
        );
    } else {
        for k in &all {
            let v = key_json(k);
            println!(
                "{:<40} {:<18} {:<9} v{}",
                k.name,
                text(&v, "algorithm"),
                text(&v, "protection_level"),
                k.primary_version
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kms key update`'s request: a rotation period (`off` clears it), a minimum decryption
/// version, and labels (replacing all, or cleared).
fn update_request(
    name: String,
    rotation_period: Option<&str>,
    min_decryption_version: Option<u32>,
    labels: Vec<(String, String)>,
    clear_labels: bool,
) -> Result<pb::UpdateKeyRequest, BoxError> {
    let rotation_period_seconds = match rotation_period {
        None => None,
        Some("off") => Some(0),
        Some(d) => Some(parse_duration(d)?),
    };
    let update_labels = clear_labels || !labels.is_empty();
    Ok(pb::UpdateKeyRequest {
        name,
        rotation_period_seconds,
        min_decryption_version,
        update_labels,
        labels: labels.into_iter().collect(),
    })
}
