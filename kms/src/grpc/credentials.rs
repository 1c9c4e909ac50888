//! `kms.v1.Credentials`: issuers, and the JWT-SVIDs, X.509-SVIDs and OpenSSH certificates
//! they issue.

use std::sync::Arc;

use kms_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::respond;
use crate::credentials::model::{self, Issuer, Kind};
use crate::credentials::x509::X509Request;
use crate::credentials::{CredentialsError, JwtRequest, SshRequest, patterns};
use crate::service::{Call, Op, Served, Service};

/// The `kms.v1.Credentials` service.
#[derive(Debug, Clone)]
pub(crate) struct CredentialsService {
    ctx: Service,
}

/// An issuer's kind as the API names it.
fn kind_pb(kind: Kind) -> pb::CredentialKind {
    match kind {
        Kind::Jwt => pb::CredentialKind::Jwt,
        Kind::X509 => pb::CredentialKind::X509,
        Kind::SshUser => pb::CredentialKind::SshUser,
        Kind::SshHost => pb::CredentialKind::SshHost,
    }
}

/// An issuer as the API shows it; `signing` the key version that signs for it now.
fn issuer_pb(i: &Issuer, base: Option<&str>, signing: u32) -> pb::Issuer {
    let texts =
        |list: &[crate::policy::Pattern]| list.iter().map(|p| p.as_str().to_owned()).collect();
    pb::Issuer {
        name: i.name.clone(),
        key: i.key.clone(),
        principals: texts(&i.principals),
        audiences: i.audiences.clone(),
        default_ttl_seconds: i.default_ttl,
        max_ttl_seconds: i.max_ttl,
        claims: i.claims.clone(),
        delegators: texts(&i.delegators),
        subjects: texts(&i.subjects),
        issuer_url: match (i.kind, base) {
            (Kind::Jwt, Some(b)) => crate::credentials::issuer_url(b, &i.name),
            _ => String::new(),
        },
        created_unix_ms: i.created_ms,
        created_by: i.created_by.clone(),
        kind: kind_pb(i.kind).into(),
        publish_ahead_seconds: Some(i.publish_ahead),
        signing_version: signing,
        ca_certificates: i
            .ca
            .iter()
            .map(|c| pb::CaCertificate {
                key_version: c.version,
                chain_pem: crate::credentials::pem_chain(&c.chain),
                self_signed: c.self_signed,
            })
            .collect(),
        self_signed: i.self_signed,
        ssh_principals: i.ssh_principals.clone(),
        ssh_critical_options: i.ssh_critical_options.clone(),
        ssh_extensions: i.ssh_extensions.clone(),
    }
}

/// An issuer from the API's (defaults for what is not given).
fn issuer_of(p: pb::Issuer) -> Result<Issuer, CredentialsError> {
    let kind = match pb::CredentialKind::try_from(p.kind) {
        Ok(pb::CredentialKind::Unspecified | pb::CredentialKind::Jwt) => Kind::Jwt,
        Ok(pb::CredentialKind::X509) => Kind::X509,
        Ok(pb::CredentialKind::SshUser) => Kind::SshUser,
        Ok(pb::CredentialKind::SshHost) => Kind::SshHost,
        Err(_) => {
            return Err(CredentialsError::BadRequest(
                "kind is one of CREDENTIAL_KIND_JWT, _X509, _SSH_USER, _SSH_HOST".to_owned(),
            ));
        }
    };
    let max_ttl = match p.max_ttl_seconds {
        0 => model::DEFAULT_MAX_TTL,
        max => max,
    };
    // An ssh_user issuer made without extensions gets ssh-keygen's (an update may clear
    // them).
    let ssh_extensions = if kind == Kind::SshUser && p.ssh_extensions.is_empty() {
        crate::credentials::ssh::DEFAULT_EXTENSIONS
            .iter()
            .map(|e| (*e).to_owned())
            .collect()
    } else {
        p.ssh_extensions
    };
    let default_ttl = if kind == Kind::Jwt {
        model::DEFAULT_TTL
    } else {
        model::DEFAULT_CERT_TTL
    };
    Ok(Issuer {
        schema: model::SCHEMA,
        name: p.name,
        kind,
        publish_ahead: p
            .publish_ahead_seconds
            .unwrap_or(model::DEFAULT_PUBLISH_AHEAD),
        ca: Vec::new(),
        self_signed: p.self_signed,
        ssh_principals: p.ssh_principals,
        ssh_critical_options: p.ssh_critical_options,
        ssh_extensions,
        key: p.key,
        principals: patterns(&p.principals)?,
        audiences: p.audiences,
        default_ttl: match p.default_ttl_seconds {
            0 => default_ttl.min(max_ttl),
            ttl => ttl,
        },
        max_ttl,
        claims: p.claims,
        delegators: patterns(&p.delegators)?,
        subjects: patterns(&p.subjects)?,
        created_ms: 0,
        created_by: String::new(),
    })
}

/// An issuer as the API shows it, with the version that signs for it now.
fn shown(
    cr: &crate::credentials::Credentials,
    keys: &crate::keyring::Keyring,
    i: &Issuer,
    base: Option<&str>,
) -> pb::Issuer {
    // A key that cannot be read shows no signing version; the issuer is still shown.
    let signing = cr.signing_version_of(keys, i).unwrap_or(0);
    issuer_pb(i, base, signing)
}

impl CredentialsService {
    /// A service over the credentials engine.
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op, issuer: &str) -> Call {
        super::call(&self.ctx, req, op).credential(issuer)
    }

    fn base(&self) -> Option<Arc<str>> {
        self.ctx.issuer_base.clone()
    }
}

#[tonic::async_trait]
impl pb::credentials_server::Credentials for CredentialsService {
    async fn create_issuer(
        &self,
        request: Request<pb::CreateIssuerRequest>,
    ) -> Result<Response<pb::Issuer>, Status> {
        let name = request
            .get_ref()
            .issuer
            .as_ref()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let call = self.call(&request, Op::CreateIssuer, &name);
        let base = self.base();
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let issuer = issuer_of(r.issuer.unwrap_or_default())?;
                let made = cr.create_issuer(c, keys, issuer, &c.identity().principal)?;
                Ok(Served::new(shown(cr, keys, &made, base.as_deref())))
            })
            .await,
        )
    }

    async fn get_issuer(
        &self,
        request: Request<pb::GetIssuerRequest>,
    ) -> Result<Response<pb::Issuer>, Status> {
        let call = self.call(&request, Op::GetIssuer, &request.get_ref().name);
        let base = self.base();
        let name = request.into_inner().name;
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, _| {
                Ok(Served::new(shown(
                    cr,
                    keys,
                    &cr.issuer(&name)?,
                    base.as_deref(),
                )))
            })
            .await,
        )
    }

    async fn list_issuers(
        &self,
        request: Request<pb::ListIssuersRequest>,
    ) -> Result<Response<pb::ListIssuersResponse>, Status> {
        let call = self.call(&request, Op::ListIssuers, "");
        let base = self.base();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, _| {
                let issuers = cr
                    .issuers()?
                    .iter()
                    .map(|i| shown(cr, keys, i, base.as_deref()))
                    .collect();
                Ok(Served::new(pb::ListIssuersResponse { issuers }))
            })
            .await,
        )
    }

    async fn update_issuer(
        &self,
        request: Request<pb::UpdateIssuerRequest>,
    ) -> Result<Response<pb::Issuer>, Status> {
        let call = self.call(&request, Op::UpdateIssuer, &request.get_ref().name);
        let base = self.base();
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let principals = r.principals.map(|l| patterns(&l.values)).transpose()?;
                let delegators = r.delegators.map(|l| patterns(&l.values)).transpose()?;
                let subjects = r.subjects.map(|l| patterns(&l.values)).transpose()?;
                if r.publish_ahead_seconds
                    .is_some_and(|a| a > model::MAX_PUBLISH_AHEAD)
                {
                    return Err(CredentialsError::BadRequest(format!(
                        "publish_ahead_seconds is at most {}",
                        model::MAX_PUBLISH_AHEAD
                    ))
                    .into());
                }
                let updated = cr.update_issuer(c, keys, &r.name, |i| {
                    if let Some(k) = r.key {
                        i.key = k;
                    }
                    if let Some(p) = principals {
                        i.principals = p;
                    }
                    if let Some(a) = r.audiences {
                        i.audiences = a.values;
                    }
                    if let Some(t) = r.default_ttl_seconds {
                        i.default_ttl = t;
                    }
                    if let Some(t) = r.max_ttl_seconds {
                        i.max_ttl = t;
                    }
                    if let Some(c) = r.claims {
                        i.claims = c.entries;
                    }
                    if let Some(d) = delegators {
                        i.delegators = d;
                    }
                    if let Some(s) = subjects {
                        i.subjects = s;
                    }
                    if let Some(a) = r.publish_ahead_seconds {
                        i.publish_ahead = a;
                    }
                    if let Some(p) = r.ssh_principals {
                        i.ssh_principals = p.values;
                    }
                    if let Some(o) = r.ssh_critical_options {
                        i.ssh_critical_options = o.entries;
                    }
                    if let Some(e) = r.ssh_extensions {
                        i.ssh_extensions = e.values;
                    }
                })?;
                Ok(Served::new(shown(cr, keys, &updated, base.as_deref())))
            })
            .await,
        )
    }

    async fn issue_jwt(
        &self,
        request: Request<pb::IssueJwtRequest>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::IssueJwt, &r.issuer)
            .credential_request(&r.subject, &r.audience);
        let base = self.base();
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let issued = cr.issue_jwt(
                    keys,
                    base.as_deref(),
                    &c.identity().principal,
                    &JwtRequest {
                        issuer: &r.issuer,
                        audience: &r.audience,
                        subject: &r.subject,
                        ttl: r.ttl_seconds,
                    },
                )?;
                let response = pb::IssueJwtResponse {
                    jti: issued.summary.jti.clone(),
                    subject: issued.summary.subject.clone(),
                    expires_unix: issued.summary.expires,
                    key_version: issued.key_version,
                    kid: issued.kid,
                    token: issued.token,
                };
                Ok(Served::new(response)
                    .signed_with(issued.key, issued.summary.key_version)
                    .credential(issued.summary))
            })
            .await,
        )
    }

    async fn revoke_jwt(
        &self,
        request: Request<pb::RevokeJwtRequest>,
    ) -> Result<Response<pb::RevokeJwtResponse>, Status> {
        let r = request.get_ref();
        let call = self.call(&request, Op::RevokeJwt, &r.issuer);
        let call = Call::credential_jti(call, &r.jti);
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, _, c| {
                let until = cr.revoke_jwt(c, &r.issuer, &r.jti)?;
                Ok(Served::new(pb::RevokeJwtResponse { until_unix: until }))
            })
            .await,
        )
    }

    async fn validate_jwt(
        &self,
        request: Request<pb::ValidateJwtRequest>,
    ) -> Result<Response<pb::ValidateJwtResponse>, Status> {
        let call = self.call(&request, Op::ValidateJwt, &request.get_ref().issuer);
        let base = self.base();
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, _| {
                let response = match cr.validate_jwt(
                    keys,
                    base.as_deref(),
                    &r.issuer,
                    &r.token,
                    &r.audience,
                )? {
                    Ok(v) => pb::ValidateJwtResponse {
                        valid: true,
                        reason: String::new(),
                        subject: v.subject,
                        jti: v.jti,
                        expires_unix: v.expires,
                        actor: v.actor.unwrap_or_default(),
                    },
                    Err(reason) => pb::ValidateJwtResponse {
                        valid: false,
                        reason,
                        ..pb::ValidateJwtResponse::default()
                    },
                };
                Ok(Served::new(response))
            })
            .await,
        )
    }

    async fn rotate_issuer(
        &self,
        request: Request<pb::RotateIssuerRequest>,
    ) -> Result<Response<pb::Issuer>, Status> {
        let call = self.call(&request, Op::RotateIssuer, &request.get_ref().name);
        let base = self.base();
        let name = request.into_inner().name;
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let issuer = cr.issuer(&name)?;
                keys.rotate_key(&issuer.key, c)?;
                let issuer = cr.rotated(c, keys, &name)?;
                Ok(Served::new(shown(cr, keys, &issuer, base.as_deref())))
            })
            .await,
        )
    }

    async fn issue_x509(
        &self,
        request: Request<pb::IssueX509Request>,
    ) -> Result<Response<pb::IssueX509Response>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::IssueX509, &r.issuer)
            .credential_request(&r.subject, "");
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let issued = cr.issue_x509(
                    keys,
                    &c.identity().principal,
                    &X509Request {
                        issuer: &r.issuer,
                        csr: &r.csr,
                        subject: &r.subject,
                        ttl: r.ttl_seconds,
                    },
                )?;
                let response = pb::IssueX509Response {
                    certificate_pem: issued.certificate_pem,
                    chain_pem: issued.chain_pem,
                    serial: issued.summary.jti.clone(),
                    spiffe_id: issued.summary.subject.clone(),
                    expires_unix: issued.summary.expires,
                    key_version: issued.summary.key_version,
                };
                Ok(Served::new(response)
                    .signed_with(issued.key, issued.summary.key_version)
                    .credential(issued.summary))
            })
            .await,
        )
    }

    async fn get_issuer_csr(
        &self,
        request: Request<pb::GetIssuerCsrRequest>,
    ) -> Result<Response<pb::GetIssuerCsrResponse>, Status> {
        let call = self.call(&request, Op::GetIssuerCsr, &request.get_ref().issuer);
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, _| {
                let (csr_pem, key_version) = cr.issuer_csr(keys, &r.issuer, r.key_version)?;
                Ok(Served::new(pb::GetIssuerCsrResponse {
                    csr_pem,
                    key_version,
                }))
            })
            .await,
        )
    }

    async fn set_issuer_certificate(
        &self,
        request: Request<pb::SetIssuerCertificateRequest>,
    ) -> Result<Response<pb::Issuer>, Status> {
        let call = self.call(
            &request,
            Op::SetIssuerCertificate,
            &request.get_ref().issuer,
        );
        let base = self.base();
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let issuer =
                    cr.set_issuer_certificate(c, keys, &r.issuer, r.key_version, &r.chain_pem)?;
                Ok(Served::new(shown(cr, keys, &issuer, base.as_deref())))
            })
            .await,
        )
    }

    async fn issue_ssh(
        &self,
        request: Request<pb::IssueSshRequest>,
    ) -> Result<Response<pb::IssueSshResponse>, Status> {
        let r = request.get_ref();
        let call = self
            .call(&request, Op::IssueSsh, &r.issuer)
            .credential_principals(&r.principals);
        let r = request.into_inner();
        respond(
            crate::service::with_credentials(&self.ctx, call, move |cr, keys, c| {
                let principal = &c.identity().principal;
                let issued = cr.issue_ssh(
                    keys,
                    principal,
                    &SshRequest {
                        issuer: &r.issuer,
                        public_key: &r.public_key,
                        principals: &r.principals,
                        ttl: r.ttl_seconds,
                    },
                )?;
                let response = pb::IssueSshResponse {
                    certificate: issued.certificate,
                    serial: issued.serial.to_string(),
                    key_id: issued.summary.subject.clone(),
                    principals: issued.principals,
                    expires_unix: issued.summary.expires,
                    key_version: issued.summary.key_version,
                };
                Ok(Served::new(response)
                    .signed_with(issued.key, issued.summary.key_version)
                    .credential(issued.summary))
            })
            .await,
        )
    }
}
