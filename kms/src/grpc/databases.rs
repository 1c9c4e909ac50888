//! `kms.v1.Databases`: connections, roles, the logins they make and their leases.

use kms_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::respond;
use crate::databases::DatabasesError;
use crate::databases::model::{self, Connection, Lease, Role, Secret};
use crate::databases::statics::StaticRole;
use crate::service::{Call, Op, Served, Service};

/// The `kms.v1.Databases` service.
#[derive(Debug, Clone)]
pub(crate) struct DatabasesService {
    ctx: Service,
}

/// A connection as the API shows it (never its password).
pub(crate) fn connection_pb(c: &Connection) -> pb::DatabaseConnection {
    pb::DatabaseConnection {
        name: c.name.clone(),
        plugin: c.plugin.clone(),
        connection_url: c.url.clone(),
        username: c.username.clone(),
        allowed_roles: c.allowed_roles.clone(),
        ca_pem: c.ca_pem.clone(),
        max_open_connections: c.max_open,
        root_rotated_unix: c.root_rotated,
        created_unix_ms: c.created_ms,
        created_by: c.created_by.clone(),
    }
}

/// A connection from the API's, with its root password (empty: keep the stored one).
pub(crate) fn connection_of(p: pb::DatabaseConnection, password: String) -> Connection {
    Connection {
        schema: model::SCHEMA,
        name: p.name,
        plugin: p.plugin,
        url: p.connection_url,
        username: p.username,
        password: Secret::new(password),
        pending_password: None,
        allowed_roles: p.allowed_roles,
        ca_pem: p.ca_pem,
        max_open: p.max_open_connections,
        root_rotated: 0,
        created_ms: 0,
        created_by: String::new(),
    }
}

/// A role as the API shows it.
pub(crate) fn role_pb(r: &Role) -> pb::DatabaseRole {
    pb::DatabaseRole {
        name: r.name.clone(),
        connection: r.connection.clone(),
        creation_statements: r.creation.clone(),
        revocation_statements: r.revocation.clone(),
        renew_statements: r.renew.clone(),
        default_ttl_seconds: r.default_ttl,
        max_ttl_seconds: r.max_ttl,
        username_template: r.username_template.clone(),
        password_length: r.password_length,
        principals: r.principals.iter().map(|p| p.as_str().to_owned()).collect(),
        created_unix_ms: r.created_ms,
        created_by: r.created_by.clone(),
    }
}

/// A role from the API's (defaults for what is not given).
pub(crate) fn role_of(p: pb::DatabaseRole) -> Result<Role, DatabasesError> {
    Ok(Role {
        schema: model::SCHEMA,
        name: p.name,
        connection: p.connection,
        creation: p.creation_statements,
        revocation: p.revocation_statements,
        renew: p.renew_statements,
        default_ttl: p.default_ttl_seconds,
        max_ttl: p.max_ttl_seconds,
        username_template: p.username_template,
        password_length: p.password_length,
        principals: model::principals(&p.principals)?,
        created_ms: 0,
        created_by: String::new(),
    })
}

/// A lease as the API shows it (never a password: kms keeps none).
pub(crate) fn lease_pb(l: &Lease) -> pb::Lease {
    let state = if l.irrevocable {
        pb::LeaseState::Irrevocable
    } else if l.attempts > 0 {
        pb::LeaseState::Revoking
    } else {
        pb::LeaseState::Active
    };
    pb::Lease {
        lease_id: l.id.clone(),
        role: l.role.clone(),
        connection: l.connection.clone(),
        username: l.username.clone(),
        principal: l.principal.clone(),
        issued_unix: l.issued,
        expires_unix: l.expires,
        max_expires_unix: l.max_expires,
        last_renewal_unix: l.renewed,
        renewable: !l.irrevocable && l.expires < l.max_expires,
        state: state.into(),
        revocation_attempts: l.attempts,
        last_error: l.last_error.clone(),
        next_attempt_unix: if l.attempts > 0 && !l.irrevocable {
            l.due
        } else {
            0
        },
    }
}

/// A static role as the API shows it (never its password).
pub(crate) fn static_role_pb(r: &StaticRole) -> pb::DatabaseStaticRole {
    pb::DatabaseStaticRole {
        name: r.name.clone(),
        connection: r.connection.clone(),
        username: r.username.clone(),
        rotation_period_seconds: r.period,
        rotation_statements: r.rotation.clone(),
        password_length: r.password_length,
        principals: r.principals.iter().map(|p| p.as_str().to_owned()).collect(),
        last_rotated_unix: r.last_rotated,
        next_rotation_unix: r.next_rotation,
        last_error: r.last_error.clone(),
        created_unix_ms: r.created_ms,
        created_by: r.created_by.clone(),
    }
}

/// A static role from the API's (defaults for what is not given).
pub(crate) fn static_role_of(p: pb::DatabaseStaticRole) -> Result<StaticRole, DatabasesError> {
    Ok(StaticRole {
        name: p.name,
        connection: p.connection,
        username: p.username,
        period: p.rotation_period_seconds,
        rotation: p.rotation_statements,
        password_length: p.password_length,
        principals: model::principals(&p.principals)?,
        ..StaticRole::blank()
    })
}

impl DatabasesService {
    /// A service over the databases engine.
    pub(crate) fn new(ctx: Service) -> Self {
        Self { ctx }
    }

    fn call<T: prost::Message>(
        &self,
        req: &Request<T>,
        op: Op,
        connection: &str,
        role: &str,
        lease: &str,
    ) -> Call {
        super::call(&self.ctx, req, op).database(connection, role, lease)
    }
}

#[tonic::async_trait]
impl pb::databases_server::Databases for DatabasesService {
    async fn put_database_connection(
        &self,
        request: Request<pb::PutDatabaseConnectionRequest>,
    ) -> Result<Response<pb::DatabaseConnection>, Status> {
        let name = request
            .get_ref()
            .connection
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let call = self.call(&request, Op::PutDatabaseConnection, &name, "", "");
        let r = request.into_inner();
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let conn = connection_of(r.connection.unwrap_or_default(), r.password);
                let made = db.put_connection(c, conn, r.skip_verify, &c.identity().principal)?;
                Ok(Served::new(connection_pb(&made)))
            })
            .await,
        )
    }

    async fn get_database_connection(
        &self,
        request: Request<pb::GetDatabaseConnectionRequest>,
    ) -> Result<Response<pb::DatabaseConnection>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::GetDatabaseConnection, &name, "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                Ok(Served::new(connection_pb(&db.connection(&name)?)))
            })
            .await,
        )
    }

    async fn list_database_connections(
        &self,
        request: Request<pb::ListDatabaseConnectionsRequest>,
    ) -> Result<Response<pb::ListDatabaseConnectionsResponse>, Status> {
        let call = self.call(&request, Op::ListDatabaseConnections, "", "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                let connections = db.connections()?.iter().map(connection_pb).collect();
                Ok(Served::new(pb::ListDatabaseConnectionsResponse {
                    connections,
                }))
            })
            .await,
        )
    }

    async fn delete_database_connection(
        &self,
        request: Request<pb::DeleteDatabaseConnectionRequest>,
    ) -> Result<Response<pb::DeleteDatabaseConnectionResponse>, Status> {
        let r = request.get_ref().clone();
        let call = self.call(&request, Op::DeleteDatabaseConnection, &r.name, "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let leases_revoked = db.delete_connection(c, &r.name, r.force)?;
                Ok(Served::new(pb::DeleteDatabaseConnectionResponse {
                    leases_revoked,
                }))
            })
            .await,
        )
    }

    async fn rotate_database_root(
        &self,
        request: Request<pb::RotateDatabaseRootRequest>,
    ) -> Result<Response<pb::DatabaseConnection>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::RotateDatabaseRoot, &name, "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                Ok(Served::new(connection_pb(&db.rotate_root(c, &name)?)))
            })
            .await,
        )
    }

    async fn put_database_role(
        &self,
        request: Request<pb::PutDatabaseRoleRequest>,
    ) -> Result<Response<pb::DatabaseRole>, Status> {
        let (conn, name) = request
            .get_ref()
            .role
            .as_ref()
            .map(|r| (r.connection.clone(), r.name.clone()))
            .unwrap_or_default();
        let call = self.call(&request, Op::PutDatabaseRole, &conn, &name, "");
        let r = request.into_inner();
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let role = role_of(r.role.unwrap_or_default())?;
                let made = db.put_role(c, role, &c.identity().principal)?;
                Ok(Served::new(role_pb(&made)))
            })
            .await,
        )
    }

    async fn get_database_role(
        &self,
        request: Request<pb::GetDatabaseRoleRequest>,
    ) -> Result<Response<pb::DatabaseRole>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::GetDatabaseRole, "", &name, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                Ok(Served::new(role_pb(&db.role(&name)?)))
            })
            .await,
        )
    }

    async fn list_database_roles(
        &self,
        request: Request<pb::ListDatabaseRolesRequest>,
    ) -> Result<Response<pb::ListDatabaseRolesResponse>, Status> {
        let call = self.call(&request, Op::ListDatabaseRoles, "", "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                let roles = db.roles()?.iter().map(role_pb).collect();
                Ok(Served::new(pb::ListDatabaseRolesResponse { roles }))
            })
            .await,
        )
    }

    async fn delete_database_role(
        &self,
        request: Request<pb::DeleteDatabaseRoleRequest>,
    ) -> Result<Response<pb::DeleteDatabaseRoleResponse>, Status> {
        let r = request.get_ref().clone();
        let call = self.call(&request, Op::DeleteDatabaseRole, "", &r.name, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let leases_revoked = db.delete_role(c, &r.name, r.force)?;
                Ok(Served::new(pb::DeleteDatabaseRoleResponse {
                    leases_revoked,
                }))
            })
            .await,
        )
    }

    async fn get_database_credentials(
        &self,
        request: Request<pb::GetDatabaseCredentialsRequest>,
    ) -> Result<Response<pb::GetDatabaseCredentialsResponse>, Status> {
        let r = request.get_ref().clone();
        let call = self.call(&request, Op::GetDatabaseCredentials, "", &r.role, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let issued = db.issue(c, &c.identity().principal, &r.role, r.ttl_seconds)?;
                let l = &issued.lease;
                Ok(Served::new(pb::GetDatabaseCredentialsResponse {
                    lease_id: l.id.clone(),
                    lease_duration_seconds: l.expires.saturating_sub(l.issued),
                    renewable: l.expires < l.max_expires,
                    username: l.username.clone(),
                    password: issued.password.to_string(),
                    expires_unix: l.expires,
                }))
            })
            .await,
        )
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let r = request.get_ref().clone();
        let call = self.call(&request, Op::RenewLease, "", "", &r.lease_id);
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let lease = db.renew(c, c.database_who(), &r.lease_id, r.increment_seconds)?;
                Ok(Served::new(lease_pb(&lease)))
            })
            .await,
        )
    }

    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let r = request.get_ref().clone();
        let call = self.call(&request, Op::RevokeLease, "", "", &r.lease_id);
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let revoked = db.revoke(c, c.database_who(), &r.lease_id, r.force)?;
                Ok(Served::new(pb::RevokeLeaseResponse { revoked }))
            })
            .await,
        )
    }

    async fn revoke_lease_prefix(
        &self,
        request: Request<pb::RevokeLeasePrefixRequest>,
    ) -> Result<Response<pb::RevokeLeasePrefixResponse>, Status> {
        let prefix = request.get_ref().prefix.clone();
        let call = self.call(&request, Op::RevokeLeasePrefix, "", "", &prefix);
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let scheduled = db.revoke_prefix(c, &prefix)?;
                Ok(Served::new(pb::RevokeLeasePrefixResponse { scheduled }))
            })
            .await,
        )
    }

    async fn lookup_lease(
        &self,
        request: Request<pb::LookupLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let id = request.get_ref().lease_id.clone();
        let call = self.call(&request, Op::LookupLease, "", "", &id);
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                Ok(Served::new(lease_pb(&db.lookup(c.database_who(), &id)?)))
            })
            .await,
        )
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let r = request.get_ref().clone();
        let call = self.call(&request, Op::ListLeases, "", "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                let size = match r.page_size {
                    0 => 100,
                    n => usize::try_from(n).unwrap_or(crate::databases::MAX_PAGE),
                };
                let (leases, next) = db.list(&r.prefix, &r.page_token, size, r.irrevocable_only)?;
                Ok(Served::new(pb::ListLeasesResponse {
                    leases: leases.iter().map(lease_pb).collect(),
                    next_page_token: next.unwrap_or_default(),
                }))
            })
            .await,
        )
    }

    async fn put_database_static_role(
        &self,
        request: Request<pb::PutDatabaseStaticRoleRequest>,
    ) -> Result<Response<pb::DatabaseStaticRole>, Status> {
        let (conn, name) = request
            .get_ref()
            .role
            .as_ref()
            .map(|r| (r.connection.clone(), r.name.clone()))
            .unwrap_or_default();
        let call = self.call(&request, Op::PutDatabaseStaticRole, &conn, &name, "");
        let r = request.into_inner();
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let role = static_role_of(r.role.unwrap_or_default())?;
                let made = db.put_static_role(c, role, &c.identity().principal)?;
                Ok(Served::new(static_role_pb(&made)))
            })
            .await,
        )
    }

    async fn get_database_static_role(
        &self,
        request: Request<pb::GetDatabaseStaticRoleRequest>,
    ) -> Result<Response<pb::DatabaseStaticRole>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::GetDatabaseStaticRole, "", &name, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                Ok(Served::new(static_role_pb(&db.static_role(&name)?)))
            })
            .await,
        )
    }

    async fn list_database_static_roles(
        &self,
        request: Request<pb::ListDatabaseStaticRolesRequest>,
    ) -> Result<Response<pb::ListDatabaseStaticRolesResponse>, Status> {
        let call = self.call(&request, Op::ListDatabaseStaticRoles, "", "", "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, _| {
                let roles = db.static_roles()?.iter().map(static_role_pb).collect();
                Ok(Served::new(pb::ListDatabaseStaticRolesResponse { roles }))
            })
            .await,
        )
    }

    async fn delete_database_static_role(
        &self,
        request: Request<pb::DeleteDatabaseStaticRoleRequest>,
    ) -> Result<Response<pb::DeleteDatabaseStaticRoleResponse>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::DeleteDatabaseStaticRole, "", &name, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                db.delete_static_role(c, &name)?;
                Ok(Served::new(pb::DeleteDatabaseStaticRoleResponse {}))
            })
            .await,
        )
    }

    async fn get_database_static_credentials(
        &self,
        request: Request<pb::GetDatabaseStaticCredentialsRequest>,
    ) -> Result<Response<pb::GetDatabaseStaticCredentialsResponse>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::GetDatabaseStaticCredentials, "", &name, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                let role = db.static_credentials(&c.identity().principal, &name)?;
                Ok(Served::new(pb::GetDatabaseStaticCredentialsResponse {
                    username: role.username.clone(),
                    password: role.password.expose().to_owned(),
                    last_rotated_unix: role.last_rotated,
                    rotation_period_seconds: role.period,
                    ttl_seconds: role.next_rotation.saturating_sub(crate::keyring::now()),
                }))
            })
            .await,
        )
    }

    async fn rotate_database_static_role(
        &self,
        request: Request<pb::RotateDatabaseStaticRoleRequest>,
    ) -> Result<Response<pb::DatabaseStaticRole>, Status> {
        let name = request.get_ref().name.clone();
        let call = self.call(&request, Op::RotateDatabaseStaticRole, "", &name, "");
        respond(
            crate::service::with_databases(&self.ctx, call, move |db, c| {
                Ok(Served::new(static_role_pb(
                    &db.rotate_static_role(c, &name)?,
                )))
            })
            .await,
        )
    }
}
