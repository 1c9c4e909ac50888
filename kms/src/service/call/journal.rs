//! How the engines' changes commit with the call's audit record: each engine's `Journal`,
//! written by the call that made the change (the keyring's is in the parent module, with
//! the retried changes it answers).

use std::sync::atomic::Ordering;

use super::{AuditEvent, Call, GrantSummary};

impl crate::secrets::Journal for Call {
    fn commit(
        &self,
        what: crate::secrets::Committed<'_>,
        writes: Vec<crate::store::Write>,
        removals: Vec<crate::store::Removal>,
    ) -> Result<(), crate::secrets::SecretsError> {
        let event = AuditEvent {
            outcome: "OK".to_owned(),
            secret: Some(crate::audit::SecretSummary {
                path: what.path.to_owned(),
                versions: what.versions.to_vec(),
                dropped: what.dropped.to_vec(),
            }),
            grant: what.grant.map(|g| GrantSummary {
                id: g.id.clone(),
                principal: g.principal.to_string(),
                operations: g.operations.iter().map(|o| o.name().to_owned()).collect(),
                associated_data_constrained: false,
            }),
            ..self.event.clone()
        };
        if let Some(g) = &self.front_recorded {
            g.set();
        }
        self.log
            .append_removing(event, writes, removals)
            .map_err(|_| crate::secrets::SecretsError::AuditUnavailable)?;
        self.recorded.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl crate::credentials::Journal for Call {
    fn commit(
        &self,
        issuer: &str,
        writes: Vec<crate::store::Write>,
    ) -> Result<(), crate::credentials::CredentialsError> {
        let event = AuditEvent {
            outcome: "OK".to_owned(),
            credential: Some(crate::audit::CredentialSummary {
                issuer: issuer.to_owned(),
                ..self.event.credential.clone().unwrap_or_default()
            }),
            ..self.event.clone()
        };
        if let Some(g) = &self.front_recorded {
            g.set();
        }
        self.log
            .append_removing(event, writes, Vec::new())
            .map_err(|_| crate::credentials::CredentialsError::AuditUnavailable)?;
        self.recorded.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl crate::databases::Journal for Call {
    fn commit(
        &self,
        what: crate::audit::DatabaseSummary,
        writes: Vec<crate::store::Write>,
        removals: Vec<crate::store::Removal>,
    ) -> Result<(), crate::databases::DatabasesError> {
        let event = AuditEvent {
            outcome: "OK".to_owned(),
            database: Some(what),
            ..self.event.clone()
        };
        if let Some(g) = &self.front_recorded {
            g.set();
        }
        self.log
            .append_removing(event, writes, removals)
            .map_err(|_| crate::databases::DatabasesError::AuditUnavailable)?;
        self.recorded.store(true, Ordering::Relaxed);
        Ok(())
    }
}
