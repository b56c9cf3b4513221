//! The schema registry: subjects (one per event type for the built-in schemas), numbered
//! versions with soft deletion, global schema ids (one per distinct schema document, shared
//! by every subject that registers it, as Confluent's registry does), and a compatibility
//! level per subject that falls back to a global level. Every new version is checked against
//! the subject's live (not soft-deleted) versions. The REST layer (`schema::api`) is a thin
//! translation of this API.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use super::compatibility::{self, CompatibilityMode, Incompatibility};
use crate::event::EventType;
use crate::store::registry::{RegistryStore, VersionRow};
use crate::store::{Store, StoreError};

/// Errors of registering, looking up or deleting schemas. Each names what was asked for.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema for subject {subject:?} is not a valid JSON Schema: {reason}")]
    InvalidSchema { subject: String, reason: String },
    #[error("schema for subject {subject:?} is incompatible under {mode}: {}", join(.reasons))]
    Incompatible {
        subject: String,
        mode: CompatibilityMode,
        reasons: Vec<Incompatibility>,
    },
    #[error("no schema registered for subject {subject:?} version {version}")]
    UnknownVersion { subject: String, version: u32 },
    #[error("subject {subject:?} not found")]
    SubjectNotFound { subject: String },
    #[error("schema not found under subject {subject:?}")]
    SchemaNotFound { subject: String },
    #[error("schema id {id} not found")]
    SchemaIdNotFound { id: u32 },
    #[error("subject {subject:?} was soft deleted; set permanent=true to delete it permanently")]
    SubjectSoftDeleted { subject: String },
    #[error("subject {subject:?} was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted { subject: String },
    #[error("subject {subject:?} version {version} was soft deleted; set permanent=true to delete it permanently")]
    VersionSoftDeleted { subject: String, version: u32 },
    #[error("subject {subject:?} version {version} was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted { subject: String, version: u32 },
    #[error("the registry holds an unknown compatibility level {value:?}")]
    StoredMode { value: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn join(reasons: &[Incompatibility]) -> String {
    reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// A registered schema version.
#[derive(Clone, Debug, PartialEq)]
pub struct SchemaVersion {
    pub subject: String,
    pub version: u32,
    /// The global id of the schema document (the id on the Kafka wire).
    pub id: u32,
    pub schema: Value,
    /// Soft-deleted: hidden from listings and compatibility checks, still readable by id.
    pub deleted: bool,
}

impl From<VersionRow> for SchemaVersion {
    fn from(row: VersionRow) -> Self {
        Self {
            subject: row.subject,
            version: row.version,
            id: row.schema_id,
            schema: row.schema,
            deleted: row.deleted,
        }
    }
}

/// Which version of a subject a request means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest live version.
    Latest,
    /// One version number.
    Number(u32),
}

/// Compiled validators by (subject, version).
type ValidatorCache = Arc<RwLock<HashMap<(String, u32), Arc<jsonschema::Validator>>>>;

/// Store-backed registry with a cache of compiled validators.
#[derive(Clone)]
pub struct SchemaRegistry {
    store: RegistryStore,
    validators: ValidatorCache,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// A stable fingerprint of a schema document: its canonical JSON (object keys sorted).
fn fingerprint(schema: &Value) -> String {
    // serde_json's default map is ordered by key, so `to_string` is canonical.
    let canonical = schema.to_string();
    format!(
        "{:016x}{:016x}",
        fnv1a(canonical.as_bytes(), 0),
        fnv1a(canonical.as_bytes(), 1)
    )
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn parse_mode(value: String) -> Result<CompatibilityMode, RegistryError> {
    value.parse().map_err(|_| RegistryError::StoredMode { value })
}

/// Checks that `schema` is a JSON Schema the registry can compile.
fn validate_schema(subject: &str, schema: &Value) -> Result<(), RegistryError> {
    jsonschema::draft202012::new(schema)
        .map(drop)
        .map_err(|e| RegistryError::InvalidSchema {
            subject: subject.to_owned(),
            reason: e.to_string(),
        })
}

/// The `(version, schema)` history the compatibility rules see: live versions, oldest first.
fn live_history(rows: &[VersionRow]) -> Vec<(u32, &Value)> {
    rows.iter()
        .filter(|r| !r.deleted)
        .map(|r| (r.version, &r.schema))
        .collect()
}

impl SchemaRegistry {
    pub fn new(store: Store) -> Self {
        Self {
            store: RegistryStore::new(store),
            validators: Arc::default(),
        }
    }

    /// Registers the generated schema of every built-in inventory event type (idempotent),
    /// with `mode` for subjects that do not exist yet.
    pub async fn register_builtin(&self, mode: CompatibilityMode) -> Result<(), RegistryError> {
        for event_type in EventType::ALL {
            self.register(event_type.as_str(), &event_type.json_schema(), Some(mode))
                .await?;
        }
        Ok(())
    }

    /// Sets the compatibility level of a subject, creating the subject if needed.
    pub async fn set_compatibility(&self, subject: &str, mode: CompatibilityMode) -> Result<(), RegistryError> {
        Ok(self
            .store
            .set_subject_compatibility(subject, Some(mode.as_str()))
            .await?)
    }

    /// Removes a subject's own level (it then follows the global one); returns the removed
    /// level, `None` when it had none.
    pub async fn clear_compatibility(&self, subject: &str) -> Result<Option<CompatibilityMode>, RegistryError> {
        let previous = self.subject_compatibility(subject).await?;
        if previous.is_some() {
            self.store.set_subject_compatibility(subject, None).await?;
        }
        Ok(previous)
    }

    /// The level a subject's registrations are checked under (its own, else the global one),
    /// if the subject exists.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<CompatibilityMode>, RegistryError> {
        match self.store.subject_compatibility(subject).await? {
            None => Ok(None),
            Some(Some(own)) => parse_mode(own).map(Some),
            Some(None) => self.global_compatibility().await.map(Some),
        }
    }

    /// The subject's own level, `None` when it has none (or does not exist).
    pub async fn subject_compatibility(&self, subject: &str) -> Result<Option<CompatibilityMode>, RegistryError> {
        match self.store.subject_compatibility(subject).await? {
            Some(Some(own)) => parse_mode(own).map(Some),
            _ => Ok(None),
        }
    }

    /// The level of subjects without one of their own.
    pub async fn global_compatibility(&self) -> Result<CompatibilityMode, RegistryError> {
        parse_mode(self.store.global_compatibility().await?)
    }

    /// Sets the level of subjects without one of their own.
    pub async fn set_global_compatibility(&self, mode: CompatibilityMode) -> Result<(), RegistryError> {
        Ok(self.store.set_global_compatibility(mode.as_str()).await?)
    }

    /// Registers `schema` under `subject` and returns its version. See [`Self::register_version`].
    pub async fn register(
        &self,
        subject: &str,
        schema: &Value,
        default_mode: Option<CompatibilityMode>,
    ) -> Result<u32, RegistryError> {
        Ok(self.register_version(subject, schema, default_mode).await?.version)
    }

    /// Registers `schema` under `subject`. A schema equal to a live version returns that
    /// version. A new schema must be compatible with the live versions under the subject's
    /// level; a new subject gets `default_mode` (`None`: it follows the global level). The
    /// schema id is shared with every other subject holding the same document.
    pub async fn register_version(
        &self,
        subject: &str,
        schema: &Value,
        default_mode: Option<CompatibilityMode>,
    ) -> Result<SchemaVersion, RegistryError> {
        validate_schema(subject, schema)?;
        let mut tx = self.store.begin().await?;
        let (own, global) = self
            .store
            .lock_subject(&mut tx, subject, default_mode.map(CompatibilityMode::as_str))
            .await?;
        let mode = parse_mode(own.unwrap_or(global))?;
        let history = self.store.versions_in(&mut tx, subject).await?;
        let fp = fingerprint(schema);
        if let Some(existing) = history.iter().find(|r| !r.deleted && r.fingerprint == fp) {
            return Ok(existing.clone().into());
        }
        let reasons = compatibility::check(mode, &live_history(&history), schema);
        if !reasons.is_empty() {
            return Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                mode,
                reasons,
            });
        }
        // Numbers are never reused while soft-deleted versions keep theirs.
        let version = history.last().map_or(1, |r| r.version + 1);
        let schema_id = self.store.schema_id_for(&mut tx, &fp, schema).await?;
        let row = VersionRow {
            subject: subject.to_owned(),
            version,
            schema_id,
            schema: schema.clone(),
            fingerprint: fp,
            deleted: false,
        };
        self.store.insert_version(&mut tx, &row).await?;
        tx.commit().await.map_err(StoreError::query("commit schema version"))?;
        Ok(row.into())
    }

    /// The incompatibilities `schema` would meet if registered under `subject`: against the
    /// live history under the subject's level when `against` is `None`, or against that one
    /// version under the level's direction. Empty means compatible; a subject without
    /// versions is compatible with anything.
    pub async fn check_compatibility(
        &self,
        subject: &str,
        schema: &Value,
        against: Option<VersionSelector>,
    ) -> Result<Vec<Incompatibility>, RegistryError> {
        validate_schema(subject, schema)?;
        let mode = match self.compatibility(subject).await? {
            Some(mode) => mode,
            None => self.global_compatibility().await?,
        };
        let rows = self.store.versions(subject).await?;
        let history = match against {
            None => live_history(&rows),
            Some(selector) => {
                let target = select(subject, &rows, selector, false)?;
                vec![(target.version, &target.schema)]
            }
        };
        Ok(compatibility::check(mode, &history, schema))
    }

    /// The registered version of `schema` under `subject` (soft-deleted ones too with
    /// `deleted`).
    pub async fn lookup(&self, subject: &str, schema: &Value, deleted: bool) -> Result<SchemaVersion, RegistryError> {
        let rows = self.store.versions(subject).await?;
        if !rows.iter().any(|r| deleted || !r.deleted) {
            return Err(RegistryError::SubjectNotFound {
                subject: subject.to_owned(),
            });
        }
        let fp = fingerprint(schema);
        rows.into_iter()
            .filter(|r| r.fingerprint == fp && (deleted || !r.deleted))
            .max_by_key(|r| (!r.deleted, r.version))
            .map(SchemaVersion::from)
            .ok_or_else(|| RegistryError::SchemaNotFound {
                subject: subject.to_owned(),
            })
    }

    /// Subject names, sorted; with `deleted`, soft-deleted subjects too.
    pub async fn subjects(&self, deleted: bool) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .store
            .subjects(deleted)
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Subjects whose every version is soft-deleted, sorted.
    pub async fn deleted_subjects(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self
            .store
            .subjects(true)
            .await?
            .into_iter()
            .filter_map(|(name, all_deleted)| all_deleted.then_some(name))
            .collect())
    }

    /// The live versions of a subject, oldest first (empty when it has none).
    pub async fn versions(&self, subject: &str) -> Result<Vec<SchemaVersion>, RegistryError> {
        self.all_versions(subject, false).await
    }

    /// The versions of a subject, oldest first; soft-deleted ones too with `deleted`.
    pub async fn all_versions(&self, subject: &str, deleted: bool) -> Result<Vec<SchemaVersion>, RegistryError> {
        Ok(self
            .store
            .versions(subject)
            .await?
            .into_iter()
            .filter(|r| deleted || !r.deleted)
            .map(SchemaVersion::from)
            .collect())
    }

    /// One version of a subject (a soft-deleted one only with `deleted`).
    pub async fn version(
        &self,
        subject: &str,
        selector: VersionSelector,
        deleted: bool,
    ) -> Result<SchemaVersion, RegistryError> {
        let rows = self.store.versions(subject).await?;
        select(subject, &rows, selector, deleted).map(|r| r.clone().into())
    }

    /// The schema document of a global id (still readable while its versions are only
    /// soft-deleted, so old messages stay readable).
    pub async fn schema_by_id(&self, id: u32) -> Result<Value, RegistryError> {
        self.store
            .schema_by_id(id)
            .await?
            .ok_or(RegistryError::SchemaIdNotFound { id })
    }

    /// The (subject, version) pairs using a schema id; soft-deleted ones too with `deleted`.
    pub async fn versions_of_id(&self, id: u32, deleted: bool) -> Result<Vec<SchemaVersion>, RegistryError> {
        let rows: Vec<SchemaVersion> = self
            .store
            .versions_of_id(id)
            .await?
            .into_iter()
            .filter(|r| deleted || !r.deleted)
            .map(SchemaVersion::from)
            .collect();
        if rows.is_empty() {
            return Err(RegistryError::SchemaIdNotFound { id });
        }
        Ok(rows)
    }

    /// The schema id of exactly `version` of `subject`, if that version is stored. A
    /// soft-deleted version keeps its id (consumers still read it by id), so events already
    /// written with it keep flowing.
    pub async fn schema_id(&self, subject: &str, version: u32) -> Result<Option<u32>, RegistryError> {
        Ok(self.store.stored_schema_id(subject, version).await?)
    }

    /// Deletes a subject: soft (hides every live version), or with `permanent` removes the
    /// versions a soft delete hid. Returns the version numbers deleted.
    pub async fn delete_subject(&self, subject: &str, permanent: bool) -> Result<Vec<u32>, RegistryError> {
        let rows = self.store.versions(subject).await?;
        if rows.is_empty() {
            return Err(RegistryError::SubjectNotFound {
                subject: subject.to_owned(),
            });
        }
        let live: Vec<u32> = rows.iter().filter(|r| !r.deleted).map(|r| r.version).collect();
        if permanent {
            if !live.is_empty() {
                return Err(RegistryError::SubjectNotSoftDeleted {
                    subject: subject.to_owned(),
                });
            }
            let all: Vec<u32> = rows.iter().map(|r| r.version).collect();
            self.store.hard_delete(subject, &all).await?;
            return Ok(all);
        }
        if live.is_empty() {
            return Err(RegistryError::SubjectSoftDeleted {
                subject: subject.to_owned(),
            });
        }
        self.store.soft_delete(subject, &live).await?;
        Ok(live)
    }

    /// Deletes one version: soft, or with `permanent` one a soft delete already hid.
    pub async fn delete_version(
        &self,
        subject: &str,
        selector: VersionSelector,
        permanent: bool,
    ) -> Result<u32, RegistryError> {
        let rows = self.store.versions(subject).await?;
        // Soft-deleted versions are found too, so a second soft delete says what happened.
        let target = select(subject, &rows, selector, true)?;
        let version = target.version;
        match (permanent, target.deleted) {
            (false, false) => self.store.soft_delete(subject, &[version]).await?,
            (false, true) => {
                return Err(RegistryError::VersionSoftDeleted {
                    subject: subject.to_owned(),
                    version,
                });
            }
            (true, false) => {
                return Err(RegistryError::VersionNotSoftDeleted {
                    subject: subject.to_owned(),
                    version,
                });
            }
            (true, true) => self.store.hard_delete(subject, &[version]).await?,
        }
        Ok(version)
    }

    /// The compiled validator of one schema version (cached after the first use).
    pub async fn validator(&self, subject: &str, version: u32) -> Result<Arc<jsonschema::Validator>, RegistryError> {
        let key = (subject.to_owned(), version);
        if let Some(v) = self.validators.read().ok().and_then(|cache| cache.get(&key).cloned()) {
            return Ok(v);
        }
        // Soft-deleted versions still validate: events of that version may be in flight.
        let schema = self
            .store
            .versions(subject)
            .await?
            .into_iter()
            .find(|r| r.version == version)
            .map(|r| r.schema)
            .ok_or_else(|| RegistryError::UnknownVersion {
                subject: subject.to_owned(),
                version,
            })?;
        let validator = jsonschema::draft202012::new(&schema).map_err(|e| RegistryError::InvalidSchema {
            subject: subject.to_owned(),
            reason: e.to_string(),
        })?;
        let validator = Arc::new(validator);
        if let Ok(mut cache) = self.validators.write() {
            cache.insert(key, validator.clone());
        }
        Ok(validator)
    }
}

/// Picks a version out of a subject's rows. `latest` means the highest live version; a
/// soft-deleted version is found only with `deleted`.
fn select<'r>(
    subject: &str,
    rows: &'r [VersionRow],
    selector: VersionSelector,
    deleted: bool,
) -> Result<&'r VersionRow, RegistryError> {
    if !rows.iter().any(|r| deleted || !r.deleted) {
        return Err(RegistryError::SubjectNotFound {
            subject: subject.to_owned(),
        });
    }
    let found = match selector {
        VersionSelector::Latest => rows.iter().rev().find(|r| !r.deleted),
        VersionSelector::Number(n) => rows.iter().find(|r| r.version == n && (deleted || !r.deleted)),
    };
    found.ok_or_else(|| RegistryError::UnknownVersion {
        subject: subject.to_owned(),
        version: match selector {
            VersionSelector::Latest => 0,
            VersionSelector::Number(n) => n,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_key_order_and_see_changes() {
        let a = serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let b: Value = serde_json::from_str(r#"{"properties": {"a": {"type": "string"}}, "type": "object"}"#).unwrap();
        let c = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
