//! The custodians' ceremonies over the years: `kms operator rekey` (new shares for the same
//! root key), `kms operator verify-share`, and the shares sealed to custodians' age
//! recipients that init and rekey hand out.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use kms_proto::v1 as pb;
use kms_proto::v1::system_client::SystemClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::share_files::ShareDir;
use crate::{Answer as _, BoxError, read_shares, show};

/// `kms operator rekey ...`.
#[derive(Debug, Subcommand)]
pub enum RekeyCommand {
    /// Start a rekey (admin): a quorum of the current shares will authorise new shares for
    /// the same root key. The new shares replace the old ones only once a quorum of them has
    /// been given back (`rekey submit` again): until then the old shares stay valid.
    Init {
        /// How many new shares to make (2..=255).
        #[arg(long)]
        shares: u32,
        /// How many new shares unseal needs (2..=shares).
        #[arg(long)]
        threshold: u32,
        /// A custodian's age X25519 recipient (`age1...`), or a file holding one; once per
        /// share, in share order. Share i is then encrypted to recipient i.
        #[arg(long = "recipient", value_name = "AGE1_OR_FILE")]
        recipients: Vec<String>,
    },
    /// Give your share to the rekey (hidden prompt, or one share per line on standard
    /// input): a current share while it collects them, then a new share to prove the new
    /// ones. The share that completes the current quorum receives the new shares.
    Submit {
        /// Only contribute to the rekey with this nonce (from `rekey status`).
        #[arg(long)]
        nonce: Option<String>,
        /// Write sealed new shares as `DIR/share-<i>.age` (refused for shares in clear).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the rekey in progress (exit code 3 when there is none).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel the rekey (admin): new shares made, if any, never become valid.
    Cancel,
}

/// A recipient as given: `age1...`, or a file holding one (an age recipients file: one
/// recipient, blank lines and `#` comments allowed).
pub fn recipient(given: &str) -> Result<String, BoxError> {
    if given.starts_with("age1") {
        return Ok(given.to_owned());
    }
    let text = std::fs::read_to_string(given)
        .map_err(|e| format!("cannot read the recipient file {given}: {e}"))?;
    let mut found = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    match (found.next(), found.next()) {
        (Some(r), None) => Ok(r.to_owned()),
        (None, _) => Err(format!("the recipient file {given} holds no recipient").into()),
        (Some(_), Some(_)) => Err(format!(
            "the recipient file {given} holds more than one recipient: give one file per custodian"
        )
        .into()),
    }
}

/// The recipients as given on the command line, resolved.
pub fn recipients(given: &[String]) -> Result<Vec<String>, BoxError> {
    given.iter().map(|g| recipient(g)).collect()
}

/// Prints shares sealed to recipients, or writes them into the files `out` reserved for
/// them (see [`ShareDir`]: if that fails, they are printed after all).
pub fn print_sealed(
    shares: &[String],
    recipients: &[String],
    out: Option<ShareDir>,
) -> Result<(), BoxError> {
    let mut stdout = std::io::stdout().lock();
    let to = |i: usize| recipients.get(i).map_or("its recipient", String::as_str);
    match out {
        Some(dir) => {
            let written = dir.save(shares, &mut stdout)?;
            for (i, path) in written.iter().enumerate() {
                writeln!(
                    stdout,
                    "Share {}, sealed to {}: {}",
                    i + 1,
                    to(i),
                    path.display()
                )?;
            }
        }
        None => {
            for (i, share) in shares.iter().enumerate() {
                writeln!(stdout, "Share {}, sealed to {}:\n{share}", i + 1, to(i))?;
            }
        }
    }
    writeln!(stdout)?;
    writeln!(
        stdout,
        "Each share is encrypted to its custodian's age key: only they can read it\n\
         (`age --decrypt -i KEY_FILE share.age`). Give each file to its custodian."
    )?;
    Ok(())
}

/// `kms operator rekey ...`.
pub async fn rekey(
    client: &mut SystemClient<Channel>,
    command: RekeyCommand,
) -> Result<ExitCode, BoxError> {
    match command {
        RekeyCommand::Init {
            shares,
            threshold,
            recipients: given,
        } => {
            let s = client
                .rekey_init(pb::RekeyInitRequest {
                    shares,
                    threshold,
                    recipients: recipients(&given)?,
                })
                .answer()
                .await?;
            print_rekey(&s, false)?;
            Ok(ExitCode::SUCCESS)
        }
        RekeyCommand::Submit {
            nonce,
            out_dir,
            json,
        } => submit(client, nonce, out_dir.as_deref(), json).await,
        RekeyCommand::Status { json } => {
            let s = client.status(pb::StatusRequest {}).answer().await?;
            print_rekey(&s, json)?;
            Ok(if s.rekey.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        RekeyCommand::Cancel => {
            let s = client
                .rekey_cancel(pb::RekeyCancelRequest {})
                .answer()
                .await?;
            println!("No rekey is in progress: the current shares are the valid ones.");
            show::print_status(&s, false)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn submit(
    client: &mut SystemClient<Channel>,
    nonce: Option<String>,
    out_dir: Option<&Path>,
    json: bool,
) -> Result<ExitCode, BoxError> {
    // The files for the new shares are checked and reserved before any share is given:
    // the submit that completes the quorum receives the new shares once.
    let mut files = match out_dir {
        Some(dir) => {
            let s = client.status(pb::StatusRequest {}).answer().await?;
            let p = s
                .rekey
                .ok_or("no rekey is in progress (nothing was done)")?;
            if !p.sealed_to_recipients {
                return Err("--out-dir writes only shares sealed to recipients; this rekey's new shares are in clear (nothing was done): run without --out-dir".into());
            }
            Some(ShareDir::prepare(dir, p.new_shares as usize)?)
        }
        None => None,
    };
    for share in read_shares("Share (input is hidden): ")?.iter() {
        let r = client
            .rekey_submit(pb::RekeySubmitRequest {
                share: share.to_string(),
                nonce: nonce.clone().unwrap_or_default(),
            })
            .answer()
            .await?;
        let status = r.status.clone().unwrap_or_default();
        if json {
            if !r.shares.is_empty()
                && let Some(dir) = files.take()
            {
                dir.save(&r.shares, &mut std::io::stdout().lock())?;
            }
            let v = serde_json::json!({
                "shares": r.shares,
                "shares_sealed": r.shares_sealed,
                "committed_share_set_id": r.committed_share_set_id,
                "recipients": r.recipients,
                "rekey": status.rekey.as_ref().map(rekey_json),
            });
            println!("{v}");
            continue;
        }
        if !r.committed_share_set_id.is_empty() {
            println!(
                "Rekey committed: share set {} is in force. The old shares no longer unseal.",
                r.committed_share_set_id
            );
        } else if !r.shares.is_empty() {
            print_new_shares(&r, &status, files.take())?;
        } else if let Some(p) = &status.rekey {
            println!(
                "Share accepted. Rekey {}: {}/{} (nonce {})",
                phase_text(p),
                p.progress,
                p.required,
                p.nonce
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_new_shares(
    r: &pb::RekeySubmitResponse,
    status: &pb::SealStatus,
    files: Option<ShareDir>,
) -> Result<(), BoxError> {
    let p = status.rekey.clone().unwrap_or_default();
    if r.shares_sealed {
        print_sealed(&r.shares, &r.recipients, files)?;
    } else {
        // (`--out-dir` was refused up front for shares in clear.)
        for (i, s) in r.shares.iter().enumerate() {
            println!("New share {}: {s}", i + 1);
        }
        println!();
        println!(
            "WARNING: these shares are shown once and stored nowhere. Give each to a different\n\
             custodian now."
        );
    }
    println!(
        "New share set {}: {} of these {} shares will unseal the server once {} of them are\n\
         given back with `kms operator rekey submit`. Until then the old shares stay valid.",
        p.new_share_set_id, p.new_threshold, p.new_shares, p.new_threshold
    );
    Ok(())
}

fn phase_text(p: &pb::RekeyProgress) -> &'static str {
    if p.phase == "verifying" {
        "verification of the new shares"
    } else {
        "current shares"
    }
}

fn rekey_json(p: &pb::RekeyProgress) -> serde_json::Value {
    serde_json::json!({
        "phase": p.phase,
        "nonce": p.nonce,
        "new_share_set_id": p.new_share_set_id,
        "new_shares": p.new_shares,
        "new_threshold": p.new_threshold,
        "progress": p.progress,
        "required": p.required,
        "sealed_to_recipients": p.sealed_to_recipients,
    })
}

/// Prints the rekey part of a status.
fn print_rekey(s: &pb::SealStatus, json: bool) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "share_set_id": s.share_set_id,
            "rekey": s.rekey.as_ref().map(rekey_json),
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let Some(p) = &s.rekey else {
        writeln!(
            out,
            "No rekey is in progress (share set {}).",
            s.share_set_id
        )?;
        return Ok(());
    };
    writeln!(out, "Share set          {}", s.share_set_id)?;
    writeln!(out, "Rekey phase        {}", p.phase)?;
    writeln!(out, "Rekey nonce        {}", p.nonce)?;
    writeln!(out, "New share set      {}", p.new_share_set_id)?;
    writeln!(
        out,
        "New shares         {} (threshold {}){}",
        p.new_shares,
        p.new_threshold,
        if p.sealed_to_recipients {
            ", sealed to age recipients"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "Progress           {}/{} {}",
        p.progress,
        p.required,
        if p.phase == "verifying" {
            "new shares given back"
        } else {
            "current shares given"
        }
    )?;
    Ok(())
}

/// `kms operator verify-share`: each share read is checked; exit 0 when all are intact.
pub async fn verify_share(client: &mut SystemClient<Channel>) -> Result<ExitCode, BoxError> {
    let shares: Vec<Zeroizing<String>> = read_shares("Share to verify (input is hidden): ")?;
    for share in shares.iter() {
        let r = client
            .verify_share(pb::VerifyShareRequest {
                share: share.to_string(),
            })
            .answer()
            .await?;
        println!(
            "Share {} of share set {} is intact and current (threshold {}).",
            r.share_index, r.share_set_id, r.threshold
        );
    }
    Ok(ExitCode::SUCCESS)
}
