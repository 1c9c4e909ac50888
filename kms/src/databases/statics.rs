//! Static roles: an existing login whose password kms sets on a schedule and serves.
//!
//! A rotation never loses the password in force (vault #21857, #31918): the new password is
//! stored first, sealed, as *pending*, then set in the database, then made current. A
//! rotation that fails keeps serving the current password and is retried with backoff; a
//! rotation cut short (the database did not answer, the server died) is finished with the
//! same pending password, so the database and kms agree again whichever way it went. Two
//! servers never rotate one role at once: a rotation claims the role under the store's
//! change lock, for [`super::CLAIM_TTL`].

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::model::{self, Secret};
use super::{Databases, DatabasesError, Journal, target};
use crate::audit::DatabaseSummary;
use crate::barrier::Purpose;
use crate::keyring::now;
use crate::policy::Pattern;
use crate::store::{Follow, Table};

/// Static roles, by name.
pub(crate) const STATIC_ROLES: Table = Table::new("database_static_roles", Follow::Never);

#[allow(
    clippy::panic,
    reason = "evaluated when the const is: a bad name fails the build"
)]
const STATIC_ROLE: Purpose = match Purpose::new("databases/static-role") {
    Some(p) => p,
    None => panic!("a purpose is [a-z0-9_/-]{{1,64}}"),
};

/// A rotation period unless the role says: 24 hours; and its bounds.
pub(crate) const DEFAULT_PERIOD: u64 = 86_400;
const PERIODS: std::ops::RangeInclusive<u64> = 60..=365 * 86_400;
/// The longest wait between two tries of a failed rotation.
const RETRY_MOST: u64 = 3600;

/// The default rotation.
const DEFAULT_ROTATION: &str = "ALTER ROLE \"{{name}}\" WITH PASSWORD '{{password}}';";

/// A static role, with the password in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StaticRole {
    pub schema: u32,
    pub name: String,
    pub connection: String,
    pub username: String,
    pub period: u64,
    pub rotation: Vec<String>,
    pub password_length: u32,
    pub principals: Vec<Pattern>,
    pub password: Secret,
    /// A password being set: stored before the database is asked, so a rotation cut short
    /// is finished with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Secret>,
    pub last_rotated: u64,
    pub next_rotation: u64,
    #[serde(default)]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// The server rotating it now, and until when its claim lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<(String, u64)>,
    pub created_ms: u64,
    pub created_by: String,
}

impl StaticRole {
    /// Every field empty or zero, at the current schema: a front fills in the
    /// administrator's fields (`StaticRole { name, .., ..StaticRole::blank() }`) and the
    /// engine the rest (the password, the rotation times, the claim, the creation).
    pub(crate) fn blank() -> Self {
        Self {
            schema: model::SCHEMA,
            name: String::new(),
            connection: String::new(),
            username: String::new(),
            period: 0,
            rotation: Vec::new(),
            password_length: 0,
            principals: Vec::new(),
            password: Secret::default(),
            pending: None,
            last_rotated: 0,
            next_rotation: 0,
            failures: 0,
            last_error: String::new(),
            claim: None,
            created_ms: 0,
            created_by: String::new(),
        }
    }

    /// Checks what an administrator gave.
    fn check(&self) -> Result<(), DatabasesError> {
        let bad = |why: String| Err(DatabasesError::BadRequest(why));
        model::check_name("static role", &self.name)?;
        model::check_name("connection", &self.connection)?;
        if self.username.is_empty()
            || self.username.len() > model::MAX_USERNAME
            || self
                .username
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@')))
        {
            return bad(format!(
                "username: 1 to {} of A-Z a-z 0-9 _ - . @",
                model::MAX_USERNAME
            ));
        }
        if !PERIODS.contains(&self.period) {
            return bad(format!(
                "rotation_period_seconds: {} to {}",
                PERIODS.start(),
                PERIODS.end()
            ));
        }
        model::check_statements("rotation_statements", &self.rotation)?;
        if !(20..=100).contains(&self.password_length) {
            return bad("password_length: 20 to 100".to_owned());
        }
        if self.principals.len() > 64 {
            return bad("principals: at most 64".to_owned());
        }
        Ok(())
    }
}

impl Databases {
    /// The static role `name`.
    pub(crate) fn static_role(&self, name: &str) -> Result<StaticRole, DatabasesError> {
        model::check_name("static role", name)?;
        self.read(STATIC_ROLES, STATIC_ROLE, name)?
            .ok_or_else(|| DatabasesError::RoleNotFound(name.to_owned()))
    }

    /// Every static role, by name.
    pub(crate) fn static_roles(&self) -> Result<Vec<StaticRole>, DatabasesError> {
        self.store
            .scan(STATIC_ROLES)?
            .iter()
            .map(|(k, v)| self.parse(STATIC_ROLE, k, v))
            .collect()
    }

    /// Creates or replaces a static role and sets its login's password at once: nothing
    /// is stored unless the database took it.
    pub(crate) fn put_static_role(
        &self,
        journal: &dyn Journal,
        mut role: StaticRole,
        by: &str,
    ) -> Result<StaticRole, DatabasesError> {
        model::check_name("static role", &role.name)?;
        let old = self.read::<StaticRole>(STATIC_ROLES, STATIC_ROLE, &role.name)?;
        role.schema = model::SCHEMA;
        if role.period == 0 {
            role.period = DEFAULT_PERIOD;
        }
        if role.password_length == 0 {
            role.password_length = model::DEFAULT_PASSWORD_LENGTH;
        }
        (role.created_ms, role.created_by) = match &old {
            Some(o) => (o.created_ms, o.created_by.clone()),
            None => (now().saturating_mul(1000), by.to_owned()),
        };
        role.check()?;
        let conn = self.connection(&role.connection)?;
        if !model::role_allowed(&conn.allowed_roles, &role.name) {
            return Err(super::not_allowed(&conn.name, &role.name));
        }
        if role.username == conn.username {
            return Err(DatabasesError::BadRequest(
                "username is the connection's root login: rotate it with rotate-root, never as a static role (kms would lose its own login)".to_owned(),
            ));
        }
        if let Some(o) = &old
            && o.username == role.username
            && o.connection == role.connection
        {
            // The same login: its password and schedule go on.
            role.password = o.password.clone();
            role.pending = o.pending.clone();
            role.last_rotated = o.last_rotated;
            role.next_rotation = o.last_rotated.saturating_add(role.period);
            let write = self.write(STATIC_ROLES, STATIC_ROLE, &role.name, &role)?;
            journal.commit(summary(&role), vec![write], Vec::new())?;
            return Ok(role);
        }
        let new = model::new_password(role.password_length)?;
        self.set_password(&conn, &role, &new)?;
        let t = now();
        role.password = Secret::new(new.to_string());
        role.pending = None;
        role.last_rotated = t;
        role.next_rotation = t.saturating_add(role.period);
        role.failures = 0;
        role.last_error.clear();
        role.claim = None;
        let write = self.write(STATIC_ROLES, STATIC_ROLE, &role.name, &role)?;
        journal.commit(summary(&role), vec![write], Vec::new())?;
        Ok(role)
    }

    /// Stops managing a static role's login.
    pub(crate) fn delete_static_role(
        &self,
        journal: &dyn Journal,
        name: &str,
    ) -> Result<(), DatabasesError> {
        let role = self.static_role(name)?;
        journal.commit(
            summary(&role),
            Vec::new(),
            vec![super::removal(STATIC_ROLES, name)],
        )
    }

    /// The password in force of `name`, for `principal` (one the role names).
    pub(crate) fn static_credentials(
        &self,
        principal: &str,
        name: &str,
    ) -> Result<StaticRole, DatabasesError> {
        let role = self.static_role(name)?;
        if !role.principals.iter().any(|p| p.matches(principal)) {
            return Err(DatabasesError::Denied(format!(
                "static role {name:?} does not name this caller among its principals"
            )));
        }
        Ok(role)
    }

    /// Rotates `name` now (an administrator's call), recorded with `journal`.
    pub(crate) fn rotate_static_role(
        &self,
        journal: &dyn Journal,
        name: &str,
    ) -> Result<StaticRole, DatabasesError> {
        let role = self.rotate(name, now(), true)?;
        journal.commit(summary(&role), Vec::new(), Vec::new())?;
        Ok(role)
    }

    /// Rotates what is due (the revoker's thread): returns how many were rotated.
    pub(super) fn rotate_due(&self) -> Result<usize, DatabasesError> {
        let t = now();
        let mut rotated = 0;
        for role in self.static_roles()? {
            if role.next_rotation > t {
                continue;
            }
            match self.rotate(&role.name, t, false) {
                Ok(r) => {
                    rotated += 1;
                    self.audit_system(
                        "RotateDatabaseStaticRole",
                        summary(&r),
                        Vec::new(),
                        Vec::new(),
                    )?;
                }
                Err(DatabasesError::Busy(_)) => {}
                Err(e) => {
                    tracing::warn!(role = %role.name, error = %crate::error_chain(&e), "a static role's rotation failed: its password in force is still served; tried again");
                }
            }
        }
        Ok(rotated)
    }

    /// Claims `name`, sets a new password (or the pending one of a rotation cut short),
    /// and makes it current. `now_asked`: an administrator's call, whatever the schedule.
    fn rotate(&self, name: &str, t: u64, now_asked: bool) -> Result<StaticRole, DatabasesError> {
        let mut role = {
            let _held = self.lock_claims()?;
            let mut role = self.static_role(name)?;
            let claimed = role.claim.as_ref().is_some_and(|(owner, until)| {
                super::revoker::claimed_by_other(owner, *until, &self.node, t)
            });
            if claimed || (!now_asked && role.next_rotation > t) {
                return Err(DatabasesError::Busy(name.to_owned()));
            }
            if role.pending.is_none() {
                role.pending = Some(Secret::new(
                    model::new_password(role.password_length)?.to_string(),
                ));
            }
            role.claim = Some((self.node.clone(), t.saturating_add(super::CLAIM_TTL)));
            self.store
                .put(STATIC_ROLES, name, &self.seal(STATIC_ROLE, name, &role)?)?;
            role
        };
        let pending = role
            .pending
            .clone()
            .ok_or(DatabasesError::Internal("pending password"))?;
        let set = self
            .connection(&role.connection)
            .and_then(|conn| self.set_password(&conn, &role, pending.expose()));
        // The outcome goes on the record as it is now, under the lock: what an
        // administrator changed meanwhile stays, and a static role removed meanwhile is not
        // brought back.
        let _held = self.lock_claims()?;
        role = self
            .read::<StaticRole>(STATIC_ROLES, STATIC_ROLE, name)?
            .ok_or_else(|| DatabasesError::RoleNotFound(name.to_owned()))?;
        role.claim = None;
        let outcome = match set {
            Ok(()) => {
                role.password = pending;
                role.pending = None;
                role.last_rotated = t;
                role.next_rotation = t.saturating_add(role.period);
                role.failures = 0;
                role.last_error.clear();
                Ok(())
            }
            Err(e) => {
                role.failures = role.failures.saturating_add(1);
                role.last_error = e.to_string();
                let shift = role.failures.saturating_sub(1).min(20);
                role.next_rotation = t.saturating_add(
                    self.settings
                        .retry_seconds
                        .saturating_mul(1u64 << shift)
                        .min(RETRY_MOST),
                );
                // A refusal changed nothing: no pending password to finish.
                if matches!(e, DatabasesError::Refused(_)) {
                    role.pending = None;
                }
                Err(e)
            }
        };
        self.store
            .put(STATIC_ROLES, name, &self.seal(STATIC_ROLE, name, &role)?)?;
        outcome.map(|()| role)
    }

    /// Runs `role`'s rotation statements with `password` on `conn`.
    fn set_password(
        &self,
        conn: &model::Connection,
        role: &StaticRole,
        password: &str,
    ) -> Result<(), DatabasesError> {
        let statements: Vec<Zeroizing<String>> = if role.rotation.is_empty() {
            vec![model::render(
                DEFAULT_ROTATION,
                &role.username,
                password,
                "",
            )]
        } else {
            role.rotation
                .iter()
                .map(|s| model::render(s, &role.username, password, ""))
                .collect()
        };
        self.targets
            .execute(conn, &statements, target::Mode::Transaction, &[password])
    }
}

/// What a static role's record says.
fn summary(role: &StaticRole) -> DatabaseSummary {
    DatabaseSummary {
        connection: role.connection.clone(),
        role: role.name.clone(),
        username: role.username.clone(),
        expires: role.next_rotation,
        ..DatabaseSummary::default()
    }
}
