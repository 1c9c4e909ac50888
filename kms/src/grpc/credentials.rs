//! `kms.v1.Credentials`: issuers and the JWT-SVIDs they issue.

use std::sync::Arc;

use kms_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::respond;
use crate::credentials::model::{self, Issuer};
use crate::credentials::{CredentialsError, JwtRequest, patterns};
use crate::service::{Call, Op, Served, Service};

/// The `kms.v1.Credentials` service.
#[derive(Debug, Clone)]
pub(crate) struct CredentialsService {
    ctx: Service,
}

/// An issuer as the API shows it.
fn issuer_pb(i: &Issuer, base: Option<&str>) -> pb::Issuer {
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
        issuer_url: base
            .map(|b| crate::credentials::issuer_url(b, &i.name))
            .unwrap_or_default(),
        created_unix_ms: i.created_ms,
        created_by: i.created_by.clone(),
    }
}

/// An issuer from the API's (defaults for lifetimes not given).
fn issuer_of(p: pb::Issuer) -> Result<Issuer, CredentialsError> {
    let max_ttl = match p.max_ttl_seconds {
        0 => model::DEFAULT_MAX_TTL,
        max => max,
    };
    Ok(Issuer {
        schema: model::SCHEMA,
        name: p.name,
        key: p.key,
        principals: patterns(&p.principals)?,
        audiences: p.audiences,
        default_ttl: match p.default_ttl_seconds {
            0 => model::DEFAULT_TTL.min(max_ttl),
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
                Ok(Served::new(issuer_pb(&made, base.as_deref())))
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
            crate::service::with_credentials(&self.ctx, call, move |cr, _, _| {
                Ok(Served::new(issuer_pb(&cr.issuer(&name)?, base.as_deref())))
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
            crate::service::with_credentials(&self.ctx, call, move |cr, _, _| {
                let issuers = cr
                    .issuers()?
                    .iter()
                    .map(|i| issuer_pb(i, base.as_deref()))
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
                })?;
                Ok(Served::new(issuer_pb(&updated, base.as_deref())))
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
                Ok(Served::new(response).credential(issued.summary))
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
}
