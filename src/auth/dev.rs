//! The development keys `make run` uses: fixed, public, printed at start-up.
//!
//! They exist so the README's curl examples work on a laptop with no setup. They are not
//! secret (anyone can read them here), so fanfinity warns at start-up whenever they are
//! in force; a real deployment makes its own with `fanfinity keys new`.

use super::keys::{key_from_parts, NewKey, Role};

/// The development key that may post events.
pub fn ingest_key() -> NewKey {
    key_from_parts(
        "development ingest (public, do not deploy)",
        vec![Role::Ingest],
        &[0xde, 0x0e, 0x01, 0, 0, 0, 0, 1],
        &[0x11; 24],
        &[0xd1; 16],
    )
}

/// The development key that may read the query API and the live page.
pub fn read_key() -> NewKey {
    key_from_parts(
        "development read (public, do not deploy)",
        vec![Role::Read],
        &[0xde, 0x0e, 0x02, 0, 0, 0, 0, 2],
        &[0x22; 24],
        &[0xd2; 16],
    )
}

/// The development keys among configured key ids, as (id, plain key) to print.
pub fn in_use(ids: impl IntoIterator<Item = String>) -> Vec<(String, String)> {
    let known = [ingest_key(), read_key()];
    ids.into_iter()
        .filter_map(|id| {
            known
                .iter()
                .find(|k| k.entry.id == id)
                .map(|k| (id, k.key.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeySet;

    #[test]
    fn the_dev_keys_are_stable_and_valid() {
        assert_eq!(
            ingest_key().key,
            format!("ffk_de0e010000000001_{}", "11".repeat(24))
        );
        let set = KeySet::from_entries(&[ingest_key().entry, read_key().entry]);
        assert!(set.is_ok());
        assert_eq!(in_use([read_key().entry.id]).len(), 1);
        assert!(in_use(["0011223344556677".to_string()]).is_empty());
    }

    #[test]
    fn scripts_dev_toml_holds_exactly_these_keys() {
        #[derive(serde::Deserialize)]
        struct File {
            auth: Section,
        }
        #[derive(serde::Deserialize)]
        struct Section {
            keys: Vec<crate::auth::KeyEntry>,
        }
        let file: File =
            toml::from_str(include_str!("../../scripts/dev.toml")).expect("dev.toml parses");
        assert_eq!(file.auth.keys, vec![ingest_key().entry, read_key().entry]);
        let text = include_str!("../../scripts/dev.toml");
        assert!(text.contains(&ingest_key().key) && text.contains(&read_key().key));
    }
}
