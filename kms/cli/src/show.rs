//! What the CLI shows: logging to standard error, init's shares, the seal status. Used by
//! the operator commands and by `kms dev` alike.

use std::io::{IsTerminal, Write};

use kms_proto::v1 as pb;

use crate::BoxError;

/// What init printed: the shares, once, and what the custodians and auditors record.
pub struct InitShown<'a> {
    /// The shares' text. Secret.
    pub shares: Vec<&'a str>,
    /// The id printed on every share of this init.
    pub share_set_id: String,
    /// Shares needed.
    pub threshold: u32,
    /// The audit checkpoint key's fingerprint.
    pub audit_key_fingerprint: &'a str,
    /// Whether the token held the master key before this init.
    pub master_key_reused: bool,
}

impl<'a> From<&'a pb::InitResponse> for InitShown<'a> {
    fn from(r: &'a pb::InitResponse) -> Self {
        Self {
            shares: r.shares.iter().map(String::as_str).collect(),
            share_set_id: r.share_set_id.clone(),
            threshold: r.threshold,
            audit_key_fingerprint: &r.audit_key_fingerprint,
            master_key_reused: r.master_key_reused,
        }
    }
}

impl<'a> From<&'a kms::seal::InitOutput> for InitShown<'a> {
    fn from(o: &'a kms::seal::InitOutput) -> Self {
        Self {
            shares: o.shares.iter().map(|s| s.as_str()).collect(),
            share_set_id: o.share_set_id.to_string(),
            threshold: u32::from(o.threshold),
            audit_key_fingerprint: &o.audit_key_fingerprint,
            master_key_reused: o.master_key_reused,
        }
    }
}

/// A duration in whole days, hours, minutes and seconds (`90d`, `1d 12h`, `45m`), the units
/// `--rotation-period` takes: never months or years, whose length varies.
pub fn duration_text(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sets up logging to standard error as `[log]` says: its level, and text or JSON (one
/// object a line, for log shippers).
pub fn init_logging(log: kms::config::LogSettings) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(log.level)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match log.format {
        kms::config::LogFormat::Json => builder.json().with_current_span(false).try_init(),
        kms::config::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Prints init's shares with the custodians' warning.
pub fn print_init(resp: &InitShown<'_>, json: bool) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "share_set_id": resp.share_set_id,
            "threshold": resp.threshold,
            "shares": resp.shares,
            "audit_key_fingerprint": resp.audit_key_fingerprint,
            "master_key_reused": resp.master_key_reused,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    for (i, s) in resp.shares.iter().enumerate() {
        writeln!(out, "Unseal share {}: {s}", i + 1)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Share set {}: {} of these {} shares unseal the server.",
        resp.share_set_id,
        resp.threshold,
        resp.shares.len()
    )?;
    writeln!(
        out,
        "Audit checkpoint key fingerprint: {} (record it: auditors pin it with\n\
         `kms audit verify --export FILE --public-key {}`).",
        resp.audit_key_fingerprint, resp.audit_key_fingerprint
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "WARNING: these shares are shown once and stored nowhere. Give each to a different\n\
         custodian now. If fewer than {} of them survive, every key in this kms is lost.\n\
         The server is sealed: {} custodians must now run `kms operator unseal`.",
        resp.threshold, resp.threshold
    )?;
    Ok(())
}

/// Prints the seal status.
pub fn print_status(s: &pb::SealStatus, json: bool) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "initialized": s.initialized,
            "sealed": s.sealed,
            "threshold": s.threshold,
            "shares": s.shares,
            "progress": s.progress,
            "nonce": s.nonce,
            "share_set_id": s.share_set_id,
            "version": s.version,
            "hsm_pin_in_shares": s.hsm_pin_in_shares,
            "server": s.server,
            "hsm_available": s.hsm_available,
            "instance_id": s.instance_id,
            "restored_from_instance_ids": s.restored_from_instance_ids,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "Initialized      {}", s.initialized)?;
    writeln!(out, "Sealed           {}", s.sealed)?;
    if s.initialized {
        writeln!(out, "Shares           {}", s.shares)?;
        writeln!(out, "Threshold        {}", s.threshold)?;
        writeln!(out, "Share set        {}", s.share_set_id)?;
        if s.sealed {
            writeln!(out, "Unseal progress  {}/{}", s.progress, s.threshold)?;
            if !s.nonce.is_empty() {
                writeln!(out, "Unseal nonce     {}", s.nonce)?;
            }
        }
    }
    if s.hsm_pin_in_shares {
        writeln!(out, "HSM PIN          in the unseal shares")?;
    }
    if !s.hsm_available {
        writeln!(
            out,
            "HSM              UNAVAILABLE (the server reconnects every second by itself)"
        )?;
    }
    if !s.instance_id.is_empty() {
        writeln!(out, "Instance         {}", s.instance_id)?;
    }
    if !s.restored_from_instance_ids.is_empty() {
        writeln!(
            out,
            "Restored from    {} (destroys nothing they made until `kms operator take-over`)",
            s.restored_from_instance_ids.join(", ")
        )?;
    }
    writeln!(out, "Version          {}", s.version)?;
    if !s.server.is_empty() {
        writeln!(out, "Server           {}", s.server)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::duration_text;

    #[test]
    fn durations_read_as_they_were_given() {
        assert_eq!(duration_text(90 * 86_400), "90d");
        assert_eq!(duration_text(86_400 + 12 * 3_600), "1d 12h");
        assert_eq!(duration_text(45 * 60), "45m");
        assert_eq!(duration_text(3_661), "1h 1m 1s");
        assert_eq!(duration_text(0), "0s");
        // What humantime wrote as "2months 29days 2h 52m 48s".
        assert_eq!(duration_text(7_776_000), "90d");
    }
}
