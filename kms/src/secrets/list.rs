//! Listing the secrets under a prefix, a page at a time, as Vault lists them: the names
//! one level down, a folder (a name with secrets beneath it) ending with `/`.
//!
//! The metadata table is read in key order from the prefix; a folder's entries are skipped
//! by starting the next read past them (`folder/` is followed by `folder0` in key order:
//! `0` is the character after `/`), so a page costs reads in proportion to its names, not
//! to the secrets beneath them.

use super::{METADATA, Secrets, SecretsError, path};

/// The most entries read from the store at a time.
const BATCH: usize = 256;

/// Entries read at a time right after skipping a folder: a caller who can write under the
/// prefix can make every folder nearly a batch long, so what follows a skip is read a few
/// entries at a time, and the reads grow again (doubling) while they find names.
const AFTER_SKIP: usize = 8;

/// The most names in a page.
pub(crate) const MAX_PAGE: usize = 1000;

/// A page of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page {
    /// The names under the prefix, in order; a folder ends with `/`.
    pub keys: Vec<String>,
    /// The token of the next page (the last name of this one), when there may be more.
    pub next: Option<String>,
}

impl Secrets {
    /// Up to `page_size` names under `prefix` (empty: the top; a path is taken as the
    /// folder it names), after `token` (the last name of the previous page, or empty).
    pub(crate) fn list(
        &self,
        prefix: &str,
        page_size: usize,
        token: &str,
    ) -> Result<Page, SecretsError> {
        let prefix = path::prefix(prefix)?;
        let page_size = page_size.clamp(1, MAX_PAGE);
        if !token.is_empty() {
            path::check(token.strip_suffix('/').unwrap_or(token))
                .ok()
                .filter(|()| !token.trim_end_matches('/').contains('/'))
                .ok_or_else(|| {
                    SecretsError::BadRequest(
                        "the page token is not one this listing gave".to_owned(),
                    )
                })?;
        }
        let mut keys: Vec<String> = Vec::new();
        // After a folder `head/`, the next name is past every entry beneath it and every
        // sibling before it (`head-x`, `head.x` sort before `head/`): `head0` is where to
        // read on. After a secret's name, the name itself (skipped below).
        let mut start = match token.strip_suffix('/') {
            Some(head) => format!("{prefix}{head}0"),
            None => format!("{prefix}{token}"),
        };
        let mut limit = AFTER_SKIP;
        loop {
            let batch = self.store.range(METADATA, &start, limit)?;
            let full = batch.len() == limit;
            let last_key = batch.last().map(|(k, _)| k.clone());
            let mut jump = None;
            for (key, _) in &batch {
                let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                    return Ok(Page { keys, next: None });
                };
                // Only kms writes paths; a key that is not one (the store was altered) is
                // never shown.
                if path::check(key).is_err() {
                    let shown: String = key.chars().take(64).collect();
                    tracing::error!(key = ?shown, "a secret's metadata is stored under a key that is not a path (the store was altered): not listed");
                    continue;
                }
                let (child, folder) = match rest.split_once('/') {
                    Some((head, _)) => (format!("{head}/"), Some(head)),
                    None => (rest.to_owned(), None),
                };
                let seen = keys.last().map_or(token, String::as_str);
                if child.as_str() > seen {
                    keys.push(child);
                    if keys.len() == page_size {
                        let next = keys.last().cloned();
                        return Ok(Page { keys, next });
                    }
                }
                // A folder whose entries fill the rest of this batch: read on after it.
                if let Some(head) = folder
                    && last_key
                        .as_deref()
                        .is_some_and(|l| l.starts_with(&format!("{prefix}{head}/")))
                {
                    jump = Some(format!("{prefix}{head}0"));
                    break;
                }
            }
            match (jump, last_key) {
                (Some(j), _) => {
                    start = j;
                    limit = AFTER_SKIP;
                }
                (None, Some(l)) if full => {
                    start = l;
                    limit = (limit * 2).min(BATCH);
                }
                _ => return Ok(Page { keys, next: None }),
            }
        }
    }
}
