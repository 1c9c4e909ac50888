//! Vault's identity tokens on the HTTPS front: `GET /v1/identity/oidc/token/NAME` issues a
//! JWT-SVID of issuer NAME to the caller, as Vault's "generate a signed ID token" does for
//! a role (hvac's `secrets.identity.generate_signed_id_token`). The same call as gRPC's
//! `IssueJwt`: the issuer's rules, the record, the answer; the token is never logged.

use http::Method;
use serde_json::json;

use super::call::{self, Refused, Reply};
use super::{Answer, Front, method_not_allowed};
use crate::access::tls::PeerInfo;
use crate::credentials::JwtRequest;
use crate::service::{Op, Served};

/// The longest `audience` the query may name (an issuer's audiences are at most 256 bytes).
const MAX_AUDIENCE: usize = 256;

/// The audience a query names (`audience=`, percent-decoded), or none.
fn audience_of(query: Option<&str>) -> Result<String, Refused> {
    let Some(raw) = super::query_value(query, "audience") else {
        return Ok(String::new());
    };
    if raw.len() > 3 * MAX_AUDIENCE {
        return Err(Refused::bad("audience: at most 256 bytes"));
    }
    percent_encoding::percent_decode_str(&raw.replace('+', " "))
        .decode_utf8()
        .map(|a| a.into_owned())
        .map_err(|_| Refused::bad("audience: not UTF-8 once percent-decoded"))
}

/// `GET /v1/identity/oidc/token/NAME[?audience=A]`: Vault's answer, `data` holding
/// `client_id` (the token's audience), `token` and `ttl` (seconds).
pub(crate) async fn token(
    front: &Front,
    peer: &PeerInfo,
    method: &Method,
    name: &str,
    query: Option<&str>,
    size: usize,
) -> Result<Answer, Refused> {
    if method != Method::GET {
        return Err(method_not_allowed());
    }
    let audience = audience_of(query)?;
    let base = front.service.issuer_base.clone();
    let (issuer, asked) = (name.to_owned(), audience.clone());
    let (result, request_id) = call::credential(
        &front.service,
        peer,
        size,
        Op::IssueJwt,
        name,
        &asked,
        move |cr, keys, c| {
            let issued = cr.issue_jwt(
                keys,
                base.as_deref(),
                &c.identity().principal,
                &JwtRequest {
                    issuer: &issuer,
                    audience: &audience,
                    subject: "",
                    ttl: 0,
                },
            )?;
            // The reply zeroizes its bytes when dropped.
            let data = json!({
                "client_id": issued.summary.audience,
                "token": issued.token,
                "ttl": issued.summary.expires.saturating_sub(crate::keyring::now()),
            });
            Ok(Served::new(Reply::ok(&data))
                .signed_with(issued.key, issued.summary.key_version)
                .credential(issued.summary))
        },
    )
    .await;
    Ok(Answer::Data {
        reply: result?,
        request_id,
        mount_type: "identity",
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::audience_of;

    #[test]
    fn the_audience_is_read_percent_decoded_and_bounded() {
        assert_eq!(audience_of(None).unwrap(), "");
        assert_eq!(audience_of(Some("x=1")).unwrap(), "");
        assert_eq!(audience_of(Some("audience=payments")).unwrap(), "payments");
        assert_eq!(
            audience_of(Some("a=b&audience=https%3A%2F%2Fapi.example%2Fv1")).unwrap(),
            "https://api.example/v1"
        );
        assert_eq!(audience_of(Some("audience=a+b")).unwrap(), "a b");
        assert!(audience_of(Some("audience=%FF")).is_err());
        assert!(audience_of(Some(&format!("audience={}", "a".repeat(800)))).is_err());
    }
}
