//! Session tokens: what `auth/cert/login` answers, so that Vault clients that log in first
//! work unchanged. The client certificate stays the identity on every request; a token
//! only says "this certificate logged in": it is bound to the principal **and** the
//! certificate (its SHA-256) that obtained it, and is refused with any other certificate
//! or none. Tokens live in memory only (a restart forgets them), for a short time
//! (`[http] token_ttl_seconds`), bounded in number. The store keeps each token's SHA-256,
//! never the token; a token is never logged, recorded or kept in an error.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// The most live sessions in all.
pub(crate) const MAX_SESSIONS: usize = 10_000;
/// The most live sessions of one principal: a further login ends its oldest.
pub(crate) const MAX_SESSIONS_PER_PRINCIPAL: usize = 64;

/// A session token as handed out: `hvs.` and 43 characters of base64url (32 random bytes).
/// Zeroized on drop; no `Debug`.
pub(crate) struct Token(Zeroizing<String>);

impl Token {
    /// The token's text, for the one answer that carries it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// What a live session is.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// Who logged in.
    pub principal: String,
    /// A public handle on the session (Vault's `accessor`), never the token.
    pub accessor: String,
    /// Unix seconds.
    pub issued_at: u64,
    /// When it ends.
    pub expires: Instant,
    certificate: [u8; 32],
}

impl Session {
    /// Seconds left.
    pub(crate) fn ttl_left(&self) -> u64 {
        self.expires
            .saturating_duration_since(Instant::now())
            .as_secs()
    }
}

/// Why a login found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many live sessions: try again later (or send no token: the certificate is enough)")]
pub(crate) struct Full;

/// The live sessions, by the SHA-256 of their token. Its `Debug` says how many, never a
/// digest or a principal.
pub(crate) struct Tokens {
    ttl: Duration,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.sessions.lock().map_or(0, |s| s.len());
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .field("live", &live)
            .finish()
    }
}

impl Tokens {
    /// An empty store whose tokens live `ttl`.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A session token's life.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new token for `principal`, bound to `certificate`.
    pub(crate) fn issue(
        &self,
        principal: &str,
        certificate: [u8; 32],
    ) -> Result<(Token, Session), Full> {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut_slice()).map_err(|_| Full)?;
        let token = Token(Zeroizing::new(format!(
            "hvs.{}",
            data_encoding::BASE64URL_NOPAD.encode(secret.as_slice())
        )));
        let mut handle = [0u8; 12];
        getrandom::fill(&mut handle).map_err(|_| Full)?;
        let now = Instant::now();
        let session = Session {
            principal: principal.to_owned(),
            accessor: data_encoding::BASE64URL_NOPAD.encode(&handle),
            issued_at: crate::keyring::now(),
            expires: now + self.ttl,
            certificate,
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| s.expires > now);
        let mut own: Vec<([u8; 32], Instant)> = sessions
            .iter()
            .filter(|(_, s)| s.principal == principal)
            .map(|(k, s)| (*k, s.expires))
            .collect();
        if own.len() >= MAX_SESSIONS_PER_PRINCIPAL {
            own.sort_by_key(|(_, e)| *e);
            for (k, _) in own.iter().take(own.len() + 1 - MAX_SESSIONS_PER_PRINCIPAL) {
                sessions.remove(k);
            }
        }
        if sessions.len() >= MAX_SESSIONS {
            return Err(Full);
        }
        sessions.insert(digest(token.expose()), session.clone());
        Ok((token, session))
    }

    /// The live session of `token`, if it was issued to `principal` with `certificate`.
    pub(crate) fn check(
        &self,
        token: &str,
        principal: &str,
        certificate: Option<&[u8; 32]>,
    ) -> Option<Session> {
        let certificate = certificate?;
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let s = sessions.get(&digest(token))?;
        let same_cert: bool =
            subtle::ConstantTimeEq::ct_eq(&s.certificate[..], &certificate[..]).into();
        (s.expires > Instant::now() && same_cert && s.principal == principal).then(|| s.clone())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_bound_to_its_principal_and_certificate() {
        let tokens = Tokens::new(Duration::from_secs(60));
        let (t, s) = tokens.issue("spiffe://corp/a", [1; 32]).unwrap();
        assert!(t.expose().starts_with("hvs.") && t.expose().len() == 47);
        assert_eq!(s.principal, "spiffe://corp/a");
        assert!(
            tokens
                .check(t.expose(), "spiffe://corp/a", Some(&[1; 32]))
                .is_some()
        );
        // Another certificate of the same principal, another principal, no certificate.
        assert!(
            tokens
                .check(t.expose(), "spiffe://corp/a", Some(&[2; 32]))
                .is_none()
        );
        assert!(
            tokens
                .check(t.expose(), "spiffe://corp/b", Some(&[1; 32]))
                .is_none()
        );
        assert!(tokens.check(t.expose(), "spiffe://corp/a", None).is_none());
        assert!(
            tokens
                .check("hvs.nope", "spiffe://corp/a", Some(&[1; 32]))
                .is_none()
        );
    }

    #[test]
    fn tokens_expire_and_are_bounded_per_principal() {
        let tokens = Tokens::new(Duration::from_millis(1));
        let (t, _) = tokens.issue("p", [1; 32]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(tokens.check(t.expose(), "p", Some(&[1; 32])).is_none());
        let tokens = Tokens::new(Duration::from_secs(60));
        let first = tokens.issue("p", [1; 32]).unwrap().0;
        for _ in 0..MAX_SESSIONS_PER_PRINCIPAL {
            tokens.issue("p", [1; 32]).unwrap();
        }
        assert!(tokens.check(first.expose(), "p", Some(&[1; 32])).is_none());
        assert_eq!(
            tokens.sessions.lock().unwrap().len(),
            MAX_SESSIONS_PER_PRINCIPAL
        );
    }
}
