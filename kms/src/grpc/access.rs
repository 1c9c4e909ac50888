//! `kms.v1.Access`: the caller's identity, and grants.

use kms_proto::v1 as pb;

use crate::wire::{grant_pb, operation_from};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{run_at, with_keyring};
use crate::keyring::KeyringError;
use crate::keyring::grants::NewGrant;
use crate::service::{Aad, Call, Op, Place, Served, Service};

/// The `kms.v1.Access` service.
#[derive(Debug, Clone)]
pub(crate) struct AccessService {
    ctx: Service,
}

impl AccessService {
    /// A service over the keyring's grants.
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op) -> Call {
        super::call(&self.ctx, req, op)
    }
}

impl Aad for pb::CreateGrantRequest {}

#[tonic::async_trait]
impl pb::access_server::Access for AccessService {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let call = self.call(&request, Op::WhoAmI);
        // Reads the connection's identity and the roles: no thread hand-off for that.
        run_at(Place::InProcess, call, move |c| {
            let id = c.identity();
            Ok(Served::new(pb::WhoAmIResponse {
                principal: id.principal.clone(),
                authenticated: id.authenticated,
                roles: c.roles().iter().map(|r| r.name().to_owned()).collect(),
                tls: id.tls,
            }))
        })
        .await
    }

    async fn create_grant(
        &self,
        request: Request<pb::CreateGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let call = self
            .call(&request, Op::CreateGrant)
            .key(&request.get_ref().key);
        let r = request.into_inner();
        let credentials = self.ctx.seal.credentials().ok();
        with_keyring(&self.ctx, call, r, move |k, c, r| {
            let operations = r
                .operations
                .iter()
                .map(|o| operation_from(*o))
                .collect::<Result<Vec<_>, _>>()?;
            // A key an issuer signs with signs nothing else: a holder of `sign` could sign
            // tokens outside the issuer's rules (docs/credentials.md).
            if operations.contains(&crate::policy::Operation::Sign)
                && let Some(cr) = &credentials
                && cr.signs_with(&r.key).map_err(|e| match e {
                    crate::credentials::CredentialsError::Store(s) => KeyringError::Store(s),
                    _ => KeyringError::Internal("issuers unreadable"),
                })?
            {
                return Err(KeyringError::BadRequest(
                    "a credential issuer signs with this key: a sign grant on it would let its holder sign tokens outside the issuer's rules",
                ));
            }
            let grant = k.create_grant(
                NewGrant {
                    key: r.key,
                    principal: r.principal,
                    operations,
                    associated_data: r.associated_data.map(Zeroizing::new),
                },
                &c.identity().principal,
                c,
            )?;
            Ok(Served::new(grant_pb(&grant)))
        })
        .await
    }

    async fn revoke_grant(
        &self,
        request: Request<pb::RevokeGrantRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let call = self.call(&request, Op::RevokeGrant);
        let id = request.into_inner().id;
        with_keyring(&self.ctx, call, (), move |k, c, ()| {
            let grant = k.revoke_grant(&id, &c.identity().principal, c)?;
            Ok(Served::new(grant_pb(&grant)))
        })
        .await
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let call = self.call(&request, Op::ListGrants);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, (), move |k, _, ()| {
            let grants = k.list_grants(&r.key, &r.principal)?;
            Ok(Served::new(pb::ListGrantsResponse {
                grants: grants.iter().map(grant_pb).collect(),
            }))
        })
        .await
    }
}
