//! The reconcile pass: logins kms made that no lease names any more are dropped.
//!
//! Such a login can only come from a lost revocation (a lease record dropped with `force`,
//! or by someone who can write the store) or from a server of before that made the login
//! before storing its lease. The pass drops a login only when all of these hold, so that
//! nothing live, and nothing kms did not make, is ever dropped, even on the word of someone
//! who altered the store: it carries kms's mark (`Databases::login_mark`: a comment with a
//! MAC of the connection's and its own name under a key of the root, set in the
//! transaction that made it), its name has the shape of a role's username template (that
//! role's name in it), its `VALID UNTIL` ended more than [`GRACE`] ago (it can no longer
//! log in with its password), and no lease names it. Each drop is recorded
//! (`DropOrphanLogin`).

use super::model::{self, Role};
use super::{Databases, DatabasesError, LOGINS, login_key, target};
use crate::audit::DatabaseSummary;

/// How long after its `VALID UNTIL` a login without a lease is dropped.
pub(super) const GRACE: i64 = 600;
/// The most logins a pass drops per role.
const MOST: i64 = 1000;

/// One piece of a username template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Exactly this text.
    Text(String),
    /// `min..=max` characters of `[a-z0-9]` (and `_` when `underscore`).
    Any {
        min: usize,
        max: usize,
        underscore: bool,
    },
}

/// The pieces of `template` for `role`: its name in place of `{{role}}`, the others as
/// what they can be.
fn pieces(template: &str, role: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = template;
    while !rest.is_empty() {
        let placeholder = [
            ("{{role}}", None),
            (
                "{{caller}}",
                Some(Piece::Any {
                    min: 0,
                    max: 16,
                    underscore: true,
                }),
            ),
            (
                "{{random}}",
                Some(Piece::Any {
                    min: 16,
                    max: 16,
                    underscore: false,
                }),
            ),
            (
                "{{unix_time}}",
                Some(Piece::Any {
                    min: 1,
                    max: 20,
                    underscore: false,
                }),
            ),
        ]
        .into_iter()
        .find(|(p, _)| rest.starts_with(p));
        match placeholder {
            Some((p, None)) => {
                text.push_str(&model::name_part(role, model::NAME_PART_LEN));
                rest = &rest[p.len()..];
            }
            Some((p, Some(any))) => {
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(any);
                rest = &rest[p.len()..];
            }
            None => {
                let mut chars = rest.chars();
                if let Some(c) = chars.next() {
                    text.push(c);
                }
                rest = chars.as_str();
            }
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

/// Whether `name` has the shape `pieces` make.
fn fits(pieces: &[Piece], name: &str) -> bool {
    match pieces.split_first() {
        None => name.is_empty(),
        Some((Piece::Text(t), rest)) => {
            name.strip_prefix(t.as_str()).is_some_and(|n| fits(rest, n))
        }
        Some((
            Piece::Any {
                min,
                max,
                underscore,
            },
            rest,
        )) => (*min..=(*max).min(name.len())).any(|n| {
            name.get(..n).is_some_and(|head| {
                head.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || (*underscore && b == b'_')
                })
            }) && name.get(n..).is_some_and(|tail| fits(rest, tail))
        }),
    }
}

/// The text a template's names all start with.
fn prefix(pieces: &[Piece]) -> &str {
    match pieces.first() {
        Some(Piece::Text(t)) => t,
        _ => "",
    }
}

impl Databases {
    /// One reconcile pass over every role: returns the logins dropped.
    pub(super) fn reconcile(&self) -> Result<usize, DatabasesError> {
        let mut dropped = 0;
        for role in self.roles()? {
            match self.reconcile_role(&role) {
                Ok(n) => dropped += n,
                Err(e) => {
                    tracing::warn!(role = %role.name, error = %crate::error_chain(&e), "the reconcile pass skipped a role: it tries again next time");
                }
            }
        }
        Ok(dropped)
    }

    fn reconcile_role(&self, role: &Role) -> Result<usize, DatabasesError> {
        let shape = pieces(&role.username_template, &role.name);
        let start = prefix(&shape);
        // A template that starts with a placeholder could match logins kms never made.
        if start.len() < 2 {
            return Ok(0);
        }
        let conn = self.connection(&role.connection)?;
        let mut dropped = 0;
        for (login, comment) in self.targets.expired_logins(&conn, start, GRACE, MOST)? {
            if !fits(&shape, &login)
                || comment != self.login_mark(&conn.name, &login)
                || self
                    .store
                    .get(LOGINS, &login_key(&conn.name, &login))?
                    .is_some()
            {
                continue;
            }
            let statements =
                model::rendered(&role.revocation, model::DEFAULT_REVOCATION, &login, "");
            self.targets
                .execute(&conn, &statements, target::Mode::Each, &[])?;
            tracing::warn!(connection = %conn.name, role = %role.name, username = %login, "a login no lease names was dropped (reconcile)");
            self.audit_system(
                "DropOrphanLogin",
                DatabaseSummary {
                    connection: conn.name.clone(),
                    role: role.name.clone(),
                    username: login,
                    ..DatabaseSummary::default()
                },
                Vec::new(),
                Vec::new(),
            )?;
            dropped += 1;
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_the_templates_shape_fit() {
        let shape = pieces(model::DEFAULT_USERNAME_TEMPLATE, "Read-Only");
        assert_eq!(prefix(&shape), "kms_read_only_");
        for name in [
            "kms_read_only_web_0123456789abcdef",
            "kms_read_only__0123456789abcdef",
            "kms_read_only_a_b_c_0123456789abcdef",
        ] {
            assert!(fits(&shape, name), "{name}");
        }
        for name in [
            "kms_read_only_web_0123456789abcde",
            "kms_read_only_web_0123456789abcdefg",
            "kms_read_only_web_0123456789ABCDEF",
            "kms_other_web_0123456789abcdef",
            "kms_read_only_web-x_0123456789abcdef",
            "alice",
        ] {
            assert!(!fits(&shape, name), "{name}");
        }
        let timed = pieces("app-{{random}}-{{unix_time}}", "r");
        assert!(fits(&timed, "app-0123456789abcdef-1700000000"));
        assert!(!fits(&timed, "app-0123456789abcdef-"));
        // A template that starts with a placeholder has no prefix: the pass skips it.
        assert_eq!(prefix(&pieces("{{random}}", "r")), "");
    }
}
