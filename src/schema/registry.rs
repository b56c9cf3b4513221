//! The schema registry: one subject per event type, numbered schema versions, and a
//! compatibility mode per subject that every new version is checked against.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use super::compatibility::{self, CompatibilityMode, Incompatibility};
use crate::event::EventType;
use crate::store::{Store, StoreError, sql};

/// Errors of registering or looking up schemas.
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
    pub schema: Value,
}

/// Compiled validators by (subject, version).
type ValidatorCache = Arc<RwLock<HashMap<(String, u32), Arc<jsonschema::Validator>>>>;

/// Store-backed registry with a cache of compiled validators.
#[derive(Clone)]
pub struct SchemaRegistry {
    store: Store,
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

impl SchemaRegistry {
    pub fn new(store: Store) -> Self {
        Self {
            store,
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

    /// Sets the compatibility mode of a subject, creating the subject if needed.
    pub async fn set_compatibility(&self, subject: &str, mode: CompatibilityMode) -> Result<(), RegistryError> {
        let statement = format!(
            "INSERT INTO {}.schema_subjects (subject, compatibility) VALUES ($1, $2) \
             ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility, updated_at = now()",
            self.store.schema()
        );
        sqlx::query(sql(statement))
            .bind(subject)
            .bind(mode.to_string())
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("set subject compatibility"))?;
        Ok(())
    }

    /// The compatibility mode of a subject, if it exists.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<CompatibilityMode>, RegistryError> {
        let statement = format!(
            "SELECT compatibility FROM {}.schema_subjects WHERE subject = $1",
            self.store.schema()
        );
        let mode: Option<String> = sqlx::query_scalar(sql(statement))
            .bind(subject)
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("read subject compatibility"))?;
        Ok(mode.and_then(|m| m.parse().ok()))
    }

    /// Registers `schema` under `subject` and returns its version. Registering a schema that
    /// is already registered returns the existing version. A new schema must be compatible
    /// with the history under the subject's mode (`default_mode` applies to a new subject).
    pub async fn register(
        &self,
        subject: &str,
        schema: &Value,
        default_mode: Option<CompatibilityMode>,
    ) -> Result<u32, RegistryError> {
        if let Err(e) = jsonschema::draft202012::new(schema) {
            return Err(RegistryError::InvalidSchema {
                subject: subject.to_owned(),
                reason: e.to_string(),
            });
        }
        let schema_name = self.store.schema();
        let mut tx = self
            .store
            .pool()
            .begin()
            .await
            .map_err(StoreError::query("begin register schema"))?;
        // Serialize registrations of one subject so versions stay dense and checks see all history.
        let create = format!(
            "INSERT INTO {schema_name}.schema_subjects (subject, compatibility) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        sqlx::query(sql(create))
            .bind(subject)
            .bind(default_mode.unwrap_or_default().to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("create subject"))?;
        let lock = format!("SELECT compatibility FROM {schema_name}.schema_subjects WHERE subject = $1 FOR UPDATE");
        let mode: String = sqlx::query_scalar(sql(lock))
            .bind(subject)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::query("lock subject"))?;
        let mode: CompatibilityMode = mode.parse().unwrap_or_default();

        let fp = fingerprint(schema);
        let history_sql = format!(
            "SELECT version, schema, fingerprint FROM {schema_name}.schema_versions WHERE subject = $1 ORDER BY version"
        );
        let history: Vec<(i32, Value, String)> = sqlx::query_as(sql(history_sql))
            .bind(subject)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::query("read schema history"))?;
        if let Some((version, _, _)) = history.iter().find(|(_, _, f)| *f == fp) {
            return Ok(u32::try_from(*version).unwrap_or_default());
        }
        let previous: Vec<(u32, &Value)> = history
            .iter()
            .map(|(v, s, _)| (u32::try_from(*v).unwrap_or_default(), s))
            .collect();
        let reasons = compatibility::check(mode, &previous, schema);
        if !reasons.is_empty() {
            return Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                mode,
                reasons,
            });
        }
        let version = previous.last().map_or(1, |(v, _)| v + 1);
        let insert = format!(
            "INSERT INTO {schema_name}.schema_versions (subject, version, schema, fingerprint) VALUES ($1, $2, $3, $4)"
        );
        sqlx::query(sql(insert))
            .bind(subject)
            .bind(i32::try_from(version).unwrap_or(i32::MAX))
            .bind(schema)
            .bind(&fp)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("insert schema version"))?;
        tx.commit().await.map_err(StoreError::query("commit schema version"))?;
        Ok(version)
    }

    /// All versions of a subject, oldest first.
    pub async fn versions(&self, subject: &str) -> Result<Vec<SchemaVersion>, RegistryError> {
        let statement = format!(
            "SELECT version, schema FROM {}.schema_versions WHERE subject = $1 ORDER BY version",
            self.store.schema()
        );
        let rows: Vec<(i32, Value)> = sqlx::query_as(sql(statement))
            .bind(subject)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("list schema versions"))?;
        Ok(rows
            .into_iter()
            .map(|(version, schema)| SchemaVersion {
                subject: subject.to_owned(),
                version: u32::try_from(version).unwrap_or_default(),
                schema,
            })
            .collect())
    }

    /// The compiled validator of one schema version (cached after the first use).
    pub async fn validator(&self, subject: &str, version: u32) -> Result<Arc<jsonschema::Validator>, RegistryError> {
        let key = (subject.to_owned(), version);
        if let Some(v) = self.validators.read().ok().and_then(|cache| cache.get(&key).cloned()) {
            return Ok(v);
        }
        let statement = format!(
            "SELECT schema FROM {}.schema_versions WHERE subject = $1 AND version = $2",
            self.store.schema()
        );
        let schema: Option<Value> = sqlx::query_scalar(sql(statement))
            .bind(subject)
            .bind(i32::try_from(version).unwrap_or(i32::MAX))
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("read schema version"))?;
        let schema = schema.ok_or_else(|| RegistryError::UnknownVersion {
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
