//! `kms.v1.Secrets`: versioned secrets.

use kms_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::respond;
use crate::secrets::model::Values;
use crate::secrets::{
    ConfigUpdate, MetadataUpdate, NewSecretGrant, Patch, Secrets, SecretsError, now_ms, path,
};
use crate::service::{Call, Op, Served, Service};
use crate::wire::{
    secret_grant_pb, secret_metadata_pb, secret_operation_from, secret_version_pb,
    secrets_config_pb,
};

/// The `kms.v1.Secrets` service.
#[derive(Debug, Clone)]
pub(crate) struct SecretsService {
    ctx: Service,
}

/// The answer to a change of versions: the metadata, without the custom metadata unless
/// the caller may read the secret's metadata (`secret-delete` and `secret-destroy` do not
/// allow that by themselves).
fn versions_answer(
    s: &Secrets,
    c: &Call,
    path: &str,
    m: &crate::secrets::model::Metadata,
) -> Result<pb::SecretMetadata, SecretsError> {
    let mut answer = secret_metadata_pb(path, m, now_ms());
    if !s.permits(
        &c.identity().principal,
        path,
        crate::policy::SecretOperation::SecretReadMetadata,
    )? {
        answer.custom_metadata.clear();
    }
    Ok(answer)
}

impl SecretsService {
    /// A service over the secrets engine.
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(&self, req: &Request<T>, op: Op) -> Call {
        super::call(&self.ctx, req, op)
    }

    async fn run<R: crate::service::Reply>(
        &self,
        call: Call,
        f: impl FnOnce(&Secrets, &Call) -> Result<Served<R>, SecretsError> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        respond(crate::service::with_secrets(&self.ctx, call, f).await)
    }
}

#[tonic::async_trait]
impl pb::secrets_server::Secrets for SecretsService {
    async fn put_secret(
        &self,
        request: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretVersion>, Status> {
        let call = self
            .call(&request, Op::PutSecret)
            .secret(&request.get_ref().path, path::check);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let pb::PutSecretRequest { path, data, cas } = r;
            let w = s.write(c, &path, Values(data), cas)?;
            Ok(Served::new(secret_version_pb(w.version, &w.info, now_ms()))
                .secret_versions(vec![w.version]))
        })
        .await
    }

    async fn get_secret(
        &self,
        request: Request<pb::GetSecretRequest>,
    ) -> Result<Response<pb::GetSecretResponse>, Status> {
        let call = self
            .call(&request, Op::GetSecret)
            .secret(&request.get_ref().path, path::check)
            .secret_versions_asked(&[request.get_ref().version]);
        let r = request.into_inner();
        self.run(call, move |s, _| {
            let read = s.read(&r.path, r.version)?;
            let info = read.info;
            let custom = read.custom.clone();
            let (version, mut values) = read.into_values()?;
            Ok(Served::new(pb::GetSecretResponse {
                data: std::mem::take(&mut values.0),
                version: Some(secret_version_pb(version, &info, now_ms())),
                custom_metadata: custom,
            })
            .secret_versions(vec![version]))
        })
        .await
    }

    async fn patch_secret(
        &self,
        request: Request<pb::PatchSecretRequest>,
    ) -> Result<Response<pb::SecretVersion>, Status> {
        let call = self
            .call(&request, Op::PatchSecret)
            .secret(&request.get_ref().path, path::check);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let pb::PatchSecretRequest {
                path,
                set,
                remove,
                cas,
            } = r;
            let w = s.patch(
                c,
                &path,
                Patch {
                    set: Values(set),
                    remove,
                },
                cas,
            )?;
            Ok(Served::new(secret_version_pb(w.version, &w.info, now_ms()))
                .secret_versions(vec![w.version]))
        })
        .await
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let prefix = path::listed(&request.get_ref().prefix);
        let call = self
            .call(&request, Op::ListSecrets)
            .secret(&prefix, path::check_prefix);
        let r = request.into_inner();
        self.run(call, move |s, _| {
            let size = match r.page_size {
                0 => 100,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            };
            let page = s.list(&prefix, size, &r.page_token)?;
            Ok(Served::new(pb::ListSecretsResponse {
                keys: page.keys,
                next_page_token: page.next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn get_secret_subkeys(
        &self,
        request: Request<pb::GetSecretSubkeysRequest>,
    ) -> Result<Response<pb::GetSecretSubkeysResponse>, Status> {
        let call = self
            .call(&request, Op::GetSecretSubkeys)
            .secret(&request.get_ref().path, path::check);
        let r = request.into_inner();
        self.run(call, move |s, _| {
            let read = s.read(&r.path, r.version)?;
            let info = read.info;
            let (version, values) = read.into_values()?;
            Ok(Served::new(pb::GetSecretSubkeysResponse {
                names: values.0.keys().cloned().collect(),
                version: Some(secret_version_pb(version, &info, now_ms())),
            })
            .secret_versions(vec![version]))
        })
        .await
    }

    async fn delete_secret_versions(
        &self,
        request: Request<pb::SecretVersionsRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = self
            .call(&request, Op::DeleteSecretVersions)
            .secret(&request.get_ref().path, path::check)
            .secret_versions_asked(&request.get_ref().versions);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let m = s.delete(c, &r.path, &r.versions)?;
            Ok(Served::new(versions_answer(s, c, &r.path, &m)?))
        })
        .await
    }

    async fn undelete_secret_versions(
        &self,
        request: Request<pb::SecretVersionsRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = self
            .call(&request, Op::UndeleteSecretVersions)
            .secret(&request.get_ref().path, path::check)
            .secret_versions_asked(&request.get_ref().versions);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let m = s.undelete(c, &r.path, &r.versions)?;
            Ok(Served::new(versions_answer(s, c, &r.path, &m)?))
        })
        .await
    }

    async fn destroy_secret_versions(
        &self,
        request: Request<pb::SecretVersionsRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = self
            .call(&request, Op::DestroySecretVersions)
            .secret(&request.get_ref().path, path::check)
            .secret_versions_asked(&request.get_ref().versions);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let m = s.destroy(c, &r.path, &r.versions)?;
            Ok(Served::new(versions_answer(s, c, &r.path, &m)?))
        })
        .await
    }

    async fn get_secret_metadata(
        &self,
        request: Request<pb::GetSecretMetadataRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = self
            .call(&request, Op::GetSecretMetadata)
            .secret(&request.get_ref().path, path::check);
        let r = request.into_inner();
        self.run(call, move |s, _| {
            let m = s.read_metadata(&r.path)?;
            Ok(Served::new(secret_metadata_pb(&r.path, &m, now_ms())))
        })
        .await
    }

    async fn update_secret_metadata(
        &self,
        request: Request<pb::UpdateSecretMetadataRequest>,
    ) -> Result<Response<pb::SecretMetadata>, Status> {
        let call = self
            .call(&request, Op::UpdateSecretMetadata)
            .secret(&request.get_ref().path, path::check);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let update = MetadataUpdate {
                max_versions: r.max_versions,
                cas_required: r.cas_required,
                delete_version_after: r.delete_version_after_seconds,
                custom: r.custom_metadata.map(|c| c.entries),
                custom_patch: None,
                may_drop: s.permits(
                    &c.identity().principal,
                    &r.path,
                    crate::policy::SecretOperation::SecretDestroy,
                )?,
            };
            let m = s.update_metadata(c, &r.path, update, true)?;
            Ok(Served::new(versions_answer(s, c, &r.path, &m)?))
        })
        .await
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let call = self
            .call(&request, Op::DeleteSecret)
            .secret(&request.get_ref().path, path::check);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            s.delete_all(c, &r.path)?;
            Ok(Served::new(pb::DeleteSecretResponse {}))
        })
        .await
    }

    async fn get_secrets_config(
        &self,
        request: Request<pb::GetSecretsConfigRequest>,
    ) -> Result<Response<pb::SecretsConfig>, Status> {
        let call = self.call(&request, Op::GetSecretsConfig);
        self.run(call, move |s, _| {
            Ok(Served::new(secrets_config_pb(&s.config()?)))
        })
        .await
    }

    async fn update_secrets_config(
        &self,
        request: Request<pb::UpdateSecretsConfigRequest>,
    ) -> Result<Response<pb::SecretsConfig>, Status> {
        let call = self
            .call(&request, Op::UpdateSecretsConfig)
            .secret("", path::no_path);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let config = s.update_config(
                c,
                ConfigUpdate {
                    max_versions: r.max_versions,
                    cas_required: r.cas_required,
                    delete_version_after: r.delete_version_after_seconds,
                },
            )?;
            Ok(Served::new(secrets_config_pb(&config)))
        })
        .await
    }

    async fn create_secret_grant(
        &self,
        request: Request<pb::CreateSecretGrantRequest>,
    ) -> Result<Response<pb::SecretGrant>, Status> {
        let call = self
            .call(&request, Op::CreateSecretGrant)
            .secret(&request.get_ref().path, path::check_pattern);
        let r = request.into_inner();
        self.run(call, move |s, c| {
            let operations = r
                .operations
                .iter()
                .map(|o| secret_operation_from(*o))
                .collect::<Result<Vec<_>, _>>()?;
            let grant = s.create_grant(
                c,
                NewSecretGrant {
                    path: r.path,
                    principal: r.principal,
                    operations,
                },
                &c.identity().principal,
            )?;
            Ok(Served::new(secret_grant_pb(&grant)))
        })
        .await
    }

    async fn revoke_secret_grant(
        &self,
        request: Request<pb::RevokeSecretGrantRequest>,
    ) -> Result<Response<pb::SecretGrant>, Status> {
        let call = self.call(&request, Op::RevokeSecretGrant);
        let id = request.into_inner().id;
        self.run(call, move |s, c| {
            let grant = s.revoke_grant(c, &id)?;
            Ok(Served::new(secret_grant_pb(&grant)))
        })
        .await
    }

    async fn list_secret_grants(
        &self,
        request: Request<pb::ListSecretGrantsRequest>,
    ) -> Result<Response<pb::ListSecretGrantsResponse>, Status> {
        let call = self.call(&request, Op::ListSecretGrants);
        let r = request.into_inner();
        self.run(call, move |s, _| {
            let grants = s.list_grants(&r.path, &r.principal)?;
            Ok(Served::new(pb::ListSecretGrantsResponse {
                grants: grants.iter().map(secret_grant_pb).collect(),
            }))
        })
        .await
    }
}
