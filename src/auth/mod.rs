//! Who may post events and who may read them: API keys checked on every request.
//!
//! Keys are configured under `[auth]` as salted hashes (see [`keys`]); `fanfinity keys
//! new` makes them. Ingest needs a key with the `ingest` role, the query API one with
//! `read`. A key is presented as `Authorization: Bearer <key>` or `X-Fanfinity-Key:
//! <key>`. No key: 401. A key that is not known or whose secret is wrong: 401 too (which
//! of the two is never said). A valid key without the needed role: 403.
//!
//! The key set can be replaced while running (SIGHUP re-reads the configuration): the new
//! set is published in [`AuthState`] with a generation number, and each shard keeps its
//! own `Arc` of the set, refreshed when the generation moves, so the hot path takes no
//! lock.

pub mod dev;
pub mod keys;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use keys::{KeyConfigError, KeyEntry, Role, StoredKey};

/// The keys in force, by id.
#[derive(Debug, Default)]
pub struct KeySet {
    by_id: HashMap<String, StoredKey>,
}

impl KeySet {
    /// Checks and decodes configured entries.
    ///
    /// # Errors
    /// The first entry that is malformed or repeats an id.
    pub fn from_entries(entries: &[KeyEntry]) -> Result<Self, KeyConfigError> {
        let mut by_id = HashMap::with_capacity(entries.len());
        for entry in entries {
            let key = StoredKey::from_entry(entry)?;
            if by_id.contains_key(&key.id) {
                return Err(KeyConfigError::Duplicate { id: key.id });
            }
            by_id.insert(key.id.clone(), key);
        }
        Ok(Self { by_id })
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Decides whether a request carrying these headers may act as `role`.
    ///
    /// # Errors
    /// [`Denied`] saying why; the key id is named only for 403 (the key was valid).
    pub fn check(&self, presented: Presented<'_>, role: Role) -> Result<String, Denied> {
        let key = presented.key().ok_or(Denied::Missing)?;
        let (id, secret) = keys::split_key(key).ok_or(Denied::Invalid)?;
        let stored = self
            .by_id
            .get(&id.to_ascii_lowercase())
            .ok_or(Denied::Invalid)?;
        if !stored.matches(secret) {
            return Err(Denied::Invalid);
        }
        if !stored.allows(role) {
            return Err(Denied::Forbidden {
                key_id: stored.id.clone(),
                role,
            });
        }
        Ok(stored.id.clone())
    }
}

/// The credentials a request carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// The `Authorization` header's value.
    pub authorization: Option<&'a str>,
    /// The `X-Fanfinity-Key` header's value.
    pub api_key: Option<&'a str>,
}

impl<'a> Presented<'a> {
    /// The key: `X-Fanfinity-Key`, else a `Bearer` token (scheme case-insensitive).
    fn key(&self) -> Option<&'a str> {
        if let Some(key) = self.api_key.map(str::trim).filter(|k| !k.is_empty()) {
            return Some(key);
        }
        let value = self.authorization?.trim();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no API key: send Authorization: Bearer <key> or X-Fanfinity-Key")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
    #[error("API key {key_id} lacks the {role} role")]
    Forbidden { key_id: String, role: Role },
}

/// The key set shared by all shards, replaceable at run time.
#[derive(Debug)]
pub struct AuthState {
    /// `auth.enabled`; when false every request passes (development only).
    pub enabled: bool,
    generation: AtomicU64,
    current: Mutex<Arc<KeySet>>,
}

impl AuthState {
    pub fn new(enabled: bool, keys: KeySet) -> Self {
        Self {
            enabled,
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(keys)),
        }
    }

    /// Publishes a new key set; shards pick it up on their next request.
    pub fn replace(&self, keys: KeySet) {
        if let Ok(mut current) = self.current.lock() {
            *current = Arc::new(keys);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The set in force now.
    pub fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .lock()
            .map(|c| Arc::clone(&c))
            .unwrap_or_default()
    }
}

/// A shard's view of the key set: refreshed only when the shared generation moves.
#[derive(Debug)]
pub struct ShardKeys {
    seen: std::cell::Cell<u64>,
    keys: std::cell::RefCell<Arc<KeySet>>,
}

impl ShardKeys {
    pub fn new(state: &AuthState) -> Self {
        Self {
            seen: std::cell::Cell::new(state.generation()),
            keys: std::cell::RefCell::new(state.snapshot()),
        }
    }

    /// Checks a request against the current set (see [`KeySet::check`]).
    ///
    /// # Errors
    /// As [`KeySet::check`].
    pub fn check(
        &self,
        state: &AuthState,
        presented: Presented<'_>,
        role: Role,
    ) -> Result<Option<String>, Denied> {
        if !state.enabled {
            return Ok(None);
        }
        let generation = state.generation();
        if generation != self.seen.get() {
            *self.keys.borrow_mut() = state.snapshot();
            self.seen.set(generation);
        }
        let keys = Arc::clone(&self.keys.borrow());
        keys.check(presented, role).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::keys::key_from_parts;
    use super::*;

    fn set() -> (KeySet, String, String) {
        let ingest = key_from_parts("app", vec![Role::Ingest], &[1; 8], &[2; 24], &[3; 16]);
        let read = key_from_parts("dash", vec![Role::Read], &[4; 8], &[5; 24], &[6; 16]);
        let set = KeySet::from_entries(&[ingest.entry, read.entry]).expect("valid");
        (set, ingest.key, read.key)
    }

    fn bearer(key: &str) -> String {
        format!("Bearer {key}")
    }

    #[test]
    fn each_role_needs_its_key() {
        let (set, ingest, read) = set();
        let auth = bearer(&ingest);
        fn with(a: &str) -> Presented<'_> {
            Presented {
                authorization: Some(a),
                api_key: None,
            }
        }
        assert!(set.check(with(&auth), Role::Ingest).is_ok());
        assert!(matches!(
            set.check(with(&auth), Role::Read),
            Err(Denied::Forbidden { .. })
        ));
        let header = Presented {
            authorization: None,
            api_key: Some(&read),
        };
        assert!(set.check(header, Role::Read).is_ok());
        assert_eq!(
            set.check(Presented::default(), Role::Read),
            Err(Denied::Missing)
        );
    }

    #[test]
    fn unknown_wrong_and_malformed_keys_are_all_just_invalid() {
        let (set, ingest, _) = set();
        let unknown = key_from_parts("x", vec![Role::Ingest], &[9; 8], &[2; 24], &[3; 16]).key;
        let mut wrong = ingest.clone();
        wrong.replace_range(wrong.len() - 2.., "ff");
        for key in [unknown.as_str(), wrong.as_str(), "nonsense", "ffk_"] {
            let auth = bearer(key);
            let p = Presented {
                authorization: Some(&auth),
                api_key: None,
            };
            assert_eq!(set.check(p, Role::Ingest), Err(Denied::Invalid), "{key}");
        }
        let basic = Presented {
            authorization: Some("Basic dXNlcjpwYXNz"),
            api_key: None,
        };
        assert_eq!(set.check(basic, Role::Ingest), Err(Denied::Missing));
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let a = key_from_parts("a", vec![Role::Read], &[1; 8], &[2; 24], &[3; 16]);
        assert!(matches!(
            KeySet::from_entries(&[a.entry.clone(), a.entry]),
            Err(KeyConfigError::Duplicate { .. })
        ));
    }

    #[test]
    fn shards_see_a_replaced_set_and_disabled_auth_passes() {
        let (set, ingest, _) = set();
        let state = AuthState::new(true, set);
        let shard = ShardKeys::new(&state);
        let auth = bearer(&ingest);
        let p = Presented {
            authorization: Some(&auth),
            api_key: None,
        };
        assert!(shard.check(&state, p, Role::Ingest).is_ok());
        state.replace(KeySet::default());
        assert_eq!(shard.check(&state, p, Role::Ingest), Err(Denied::Invalid));
        let open = AuthState::new(false, KeySet::default());
        assert_eq!(ShardKeys::new(&open).check(&open, p, Role::Read), Ok(None));
    }
}
