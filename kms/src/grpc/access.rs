//! `kms.v1.Access`: the caller's identity, and grants.

use kms_proto::v1 as pb;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{Aad, Call, Ctx, Served, run, with_keyring};
use crate::access::Operation;
use crate::keyring::KeyringError;
use crate::keyring::grants::{Grant, NewGrant};

/// The service's name in audit records.
const SERVICE: &str = "kms.v1.Access";

/// The `kms.v1.Access` service.
#[derive(Debug, Clone)]
pub struct AccessService {
    ctx: Ctx,
}

impl AccessService {
    /// A service over the keyring's grants.
    pub fn new(ctx: Ctx) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, operation: &'static str) -> Call {
        Call::new(&self.ctx, req, SERVICE, operation)
    }
}

/// An operation as the API spells it.
pub fn operation_pb(o: Operation) -> pb::Operation {
    match o {
        Operation::Encrypt => pb::Operation::Encrypt,
        Operation::Decrypt => pb::Operation::Decrypt,
        Operation::ReencryptFrom => pb::Operation::ReencryptFrom,
        Operation::ReencryptTo => pb::Operation::ReencryptTo,
        Operation::Reencrypt => pb::Operation::Reencrypt,
        Operation::GenerateDataKey => pb::Operation::GenerateDataKey,
        Operation::Sign => pb::Operation::Sign,
        Operation::Verify => pb::Operation::Verify,
        Operation::GetPublicKey => pb::Operation::GetPublicKey,
        Operation::Mac => pb::Operation::Mac,
        Operation::VerifyMac => pb::Operation::VerifyMac,
    }
}

/// An API operation; an unknown or unspecified one is a bad request.
pub fn operation_from(v: i32) -> Result<Operation, KeyringError> {
    Ok(match pb::Operation::try_from(v) {
        Ok(pb::Operation::Encrypt) => Operation::Encrypt,
        Ok(pb::Operation::Decrypt) => Operation::Decrypt,
        Ok(pb::Operation::ReencryptFrom) => Operation::ReencryptFrom,
        Ok(pb::Operation::ReencryptTo) => Operation::ReencryptTo,
        Ok(pb::Operation::Reencrypt) => {
            return Err(KeyringError::BadRequest(
                "the operation reencrypt was split: grant reencrypt-from on the source key and reencrypt-to on the destination key",
            ));
        }
        Ok(pb::Operation::GenerateDataKey) => Operation::GenerateDataKey,
        Ok(pb::Operation::Sign) => Operation::Sign,
        Ok(pb::Operation::Verify) => Operation::Verify,
        Ok(pb::Operation::GetPublicKey) => Operation::GetPublicKey,
        Ok(pb::Operation::Mac) => Operation::Mac,
        Ok(pb::Operation::VerifyMac) => Operation::VerifyMac,
        Ok(pb::Operation::Unspecified) | Err(_) => {
            return Err(KeyringError::BadRequest(
                "unknown operation: use encrypt, decrypt, reencrypt-from, reencrypt-to, generate-data-key, sign, verify, get-public-key, mac, verify-mac",
            ));
        }
    })
}

pub(super) fn grant_pb(g: &Grant) -> pb::Grant {
    pb::Grant {
        id: g.id.clone(),
        key: g.key.clone(),
        principal: g.principal.to_string(),
        operations: g
            .operations
            .iter()
            .map(|o| operation_pb(*o) as i32)
            .collect(),
        requires_associated_data: g.associated_data_mac.is_some(),
        create_time: i64::try_from(g.created_at).unwrap_or(i64::MAX),
        created_by: g.created_by.clone(),
    }
}

impl Aad for pb::CreateGrantRequest {}

#[tonic::async_trait]
impl pb::access_server::Access for AccessService {
    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let call = self.call(&request, "WhoAmI");
        run(call, move |c| {
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
            .call(&request, "CreateGrant")
            .key(&request.get_ref().key);
        let r = request.into_inner();
        with_keyring(&self.ctx, call, r, move |k, c, r| {
            let operations = r
                .operations
                .iter()
                .map(|o| operation_from(*o))
                .collect::<Result<Vec<_>, _>>()?;
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
        let call = self.call(&request, "RevokeGrant");
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
        let call = self.call(&request, "ListGrants");
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
