//! SQL of the schema registry: subjects and their compatibility level, numbered versions with
//! soft deletion, global schema ids (one per distinct schema document) and the global level.
//! The rules (compatibility, what a deletion may do) live in `schema::registry`; this module
//! only reads and writes rows.

use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use super::{Store, StoreError, sql};

/// One stored version of a subject.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionRow {
    pub subject: String,
    pub version: u32,
    pub schema_id: u32,
    pub schema: Value,
    pub fingerprint: String,
    pub deleted: bool,
}

type RawVersion = (String, i32, i32, Value, String, bool);

fn row(raw: RawVersion) -> VersionRow {
    let (subject, version, schema_id, schema, fingerprint, deleted) = raw;
    VersionRow {
        subject,
        version: u32::try_from(version).unwrap_or_default(),
        schema_id: u32::try_from(schema_id).unwrap_or_default(),
        schema,
        fingerprint,
        deleted,
    }
}

fn db_int(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

const VERSION_COLUMNS: &str = "subject, version, schema_id, schema, fingerprint, deleted_at IS NOT NULL";

/// Registry tables of one outbox schema.
#[derive(Clone, Debug)]
pub struct RegistryStore {
    store: Store,
}

impl RegistryStore {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    fn schema(&self) -> &super::SchemaName {
        self.store.schema()
    }

    /// Starts the transaction of one registration.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.store
            .begin()
            .await
            .map_err(StoreError::query("begin schema registration"))
    }

    /// Creates the subject when missing (with `compatibility`, NULL = follow the global level)
    /// and locks it, so registrations of one subject are serialized and version numbers stay
    /// dense. Returns the subject's own level and the global level.
    pub async fn lock_subject(
        &self,
        conn: &mut PgConnection,
        subject: &str,
        compatibility: Option<&str>,
    ) -> Result<(Option<String>, String), StoreError> {
        let schema = self.schema();
        let create = format!(
            "INSERT INTO {schema}.schema_subjects (subject, compatibility) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        sqlx::query(sql(create))
            .bind(subject)
            .bind(compatibility)
            .execute(&mut *conn)
            .await
            .map_err(StoreError::query("create subject"))?;
        let lock = format!(
            "SELECT s.compatibility, c.compatibility FROM {schema}.schema_subjects s, {schema}.schema_registry_config c \
             WHERE s.subject = $1 FOR UPDATE OF s"
        );
        sqlx::query_as(sql(lock))
            .bind(subject)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::query("lock subject"))
    }

    /// Every stored version of a subject (soft-deleted ones included), oldest first.
    pub async fn versions_in(&self, conn: &mut PgConnection, subject: &str) -> Result<Vec<VersionRow>, StoreError> {
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM {}.schema_versions WHERE subject = $1 ORDER BY version",
            self.schema()
        );
        let rows: Vec<RawVersion> = sqlx::query_as(sql(statement))
            .bind(subject)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::query("read schema history"))?;
        Ok(rows.into_iter().map(row).collect())
    }

    /// Every stored version of a subject (soft-deleted ones included), oldest first.
    pub async fn versions(&self, subject: &str) -> Result<Vec<VersionRow>, StoreError> {
        let mut conn = self.store.pool().acquire().await.map_err(StoreError::Connect)?;
        self.versions_in(&mut conn, subject).await
    }

    /// The id of a schema document, assigned on first sight.
    pub async fn schema_id_for(
        &self,
        conn: &mut PgConnection,
        fingerprint: &str,
        schema: &Value,
    ) -> Result<u32, StoreError> {
        let schema_name = self.schema();
        // The no-op update makes RETURNING yield the existing row's id too.
        let statement = format!(
            "INSERT INTO {schema_name}.schema_ids (fingerprint, schema) VALUES ($1, $2) \
             ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = EXCLUDED.fingerprint RETURNING id"
        );
        let id: i32 = sqlx::query_scalar(sql(statement))
            .bind(fingerprint)
            .bind(schema)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::query("assign schema id"))?;
        Ok(u32::try_from(id).unwrap_or_default())
    }

    /// Stores a new version.
    pub async fn insert_version(&self, conn: &mut PgConnection, version: &VersionRow) -> Result<(), StoreError> {
        let statement = format!(
            "INSERT INTO {}.schema_versions (subject, version, schema, fingerprint, schema_id) VALUES ($1, $2, $3, $4, $5)",
            self.schema()
        );
        sqlx::query(sql(statement))
            .bind(&version.subject)
            .bind(db_int(version.version))
            .bind(&version.schema)
            .bind(&version.fingerprint)
            .bind(db_int(version.schema_id))
            .execute(&mut *conn)
            .await
            .map_err(StoreError::query("insert schema version"))?;
        Ok(())
    }

    /// Subjects with at least one version; with `deleted`, also those whose versions are all
    /// soft-deleted. Sorted by name.
    pub async fn subjects(&self, deleted: bool) -> Result<Vec<(String, bool)>, StoreError> {
        let statement = format!(
            "SELECT subject, bool_and(deleted_at IS NOT NULL) FROM {}.schema_versions GROUP BY subject \
             HAVING $1 OR bool_or(deleted_at IS NULL) ORDER BY subject",
            self.schema()
        );
        sqlx::query_as(sql(statement))
            .bind(deleted)
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("list subjects"))
    }

    /// The document behind a schema id, if any version (live or soft-deleted) still uses it.
    pub async fn schema_by_id(&self, id: u32) -> Result<Option<Value>, StoreError> {
        let schema = self.schema();
        let statement = format!(
            "SELECT i.schema FROM {schema}.schema_ids i WHERE i.id = $1 \
             AND EXISTS (SELECT 1 FROM {schema}.schema_versions v WHERE v.schema_id = i.id)"
        );
        sqlx::query_scalar(sql(statement))
            .bind(db_int(id))
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("read schema by id"))
    }

    /// The versions using a schema id.
    pub async fn versions_of_id(&self, id: u32) -> Result<Vec<VersionRow>, StoreError> {
        let statement = format!(
            "SELECT {VERSION_COLUMNS} FROM {}.schema_versions WHERE schema_id = $1 ORDER BY subject, version",
            self.schema()
        );
        let rows: Vec<RawVersion> = sqlx::query_as(sql(statement))
            .bind(db_int(id))
            .fetch_all(self.store.pool())
            .await
            .map_err(StoreError::query("list versions of schema id"))?;
        Ok(rows.into_iter().map(row).collect())
    }

    /// The schema id of a subject's version (soft-deleted or not), for the relay's wire format.
    pub async fn stored_schema_id(&self, subject: &str, version: u32) -> Result<Option<u32>, StoreError> {
        let statement = format!(
            "SELECT schema_id FROM {}.schema_versions WHERE subject = $1 AND version = $2",
            self.schema()
        );
        let id: Option<i32> = sqlx::query_scalar(sql(statement))
            .bind(subject)
            .bind(db_int(version))
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("read schema id of version"))?;
        Ok(id.and_then(|id| u32::try_from(id).ok()))
    }

    /// Marks versions as soft-deleted.
    pub async fn soft_delete(&self, subject: &str, versions: &[u32]) -> Result<(), StoreError> {
        let versions: Vec<i32> = versions.iter().copied().map(db_int).collect();
        let statement = format!(
            "UPDATE {}.schema_versions SET deleted_at = now() WHERE subject = $1 AND version = ANY($2) AND deleted_at IS NULL",
            self.schema()
        );
        sqlx::query(sql(statement))
            .bind(subject)
            .bind(&versions)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("soft-delete schema versions"))?;
        Ok(())
    }

    /// Removes versions for good; the subject row goes with its last version.
    pub async fn hard_delete(&self, subject: &str, versions: &[u32]) -> Result<(), StoreError> {
        let versions: Vec<i32> = versions.iter().copied().map(db_int).collect();
        let schema = self.schema();
        let mut tx = self.begin().await?;
        let delete = format!("DELETE FROM {schema}.schema_versions WHERE subject = $1 AND version = ANY($2)");
        sqlx::query(sql(delete))
            .bind(subject)
            .bind(&versions)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("delete schema versions"))?;
        let orphan = format!(
            "DELETE FROM {schema}.schema_subjects s WHERE s.subject = $1 \
             AND NOT EXISTS (SELECT 1 FROM {schema}.schema_versions v WHERE v.subject = s.subject)"
        );
        sqlx::query(sql(orphan))
            .bind(subject)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("delete empty subject"))?;
        tx.commit().await.map_err(StoreError::query("commit schema deletion"))
    }

    /// A subject's own compatibility level: `None` when the subject does not exist,
    /// `Some(None)` when it follows the global level.
    pub async fn subject_compatibility(&self, subject: &str) -> Result<Option<Option<String>>, StoreError> {
        let statement = format!(
            "SELECT compatibility FROM {}.schema_subjects WHERE subject = $1",
            self.schema()
        );
        sqlx::query_scalar(sql(statement))
            .bind(subject)
            .fetch_optional(self.store.pool())
            .await
            .map_err(StoreError::query("read subject compatibility"))
    }

    /// Sets (or with `None` clears) a subject's own level, creating the subject if needed.
    pub async fn set_subject_compatibility(&self, subject: &str, mode: Option<&str>) -> Result<(), StoreError> {
        let statement = format!(
            "INSERT INTO {}.schema_subjects (subject, compatibility) VALUES ($1, $2) \
             ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility, updated_at = now()",
            self.schema()
        );
        sqlx::query(sql(statement))
            .bind(subject)
            .bind(mode)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("set subject compatibility"))?;
        Ok(())
    }

    /// The global compatibility level.
    pub async fn global_compatibility(&self) -> Result<String, StoreError> {
        let statement = format!("SELECT compatibility FROM {}.schema_registry_config", self.schema());
        sqlx::query_scalar(sql(statement))
            .fetch_one(self.store.pool())
            .await
            .map_err(StoreError::query("read global compatibility"))
    }

    /// Sets the global compatibility level.
    pub async fn set_global_compatibility(&self, mode: &str) -> Result<(), StoreError> {
        let statement = format!(
            "UPDATE {}.schema_registry_config SET compatibility = $1, updated_at = now()",
            self.schema()
        );
        sqlx::query(sql(statement))
            .bind(mode)
            .execute(self.store.pool())
            .await
            .map_err(StoreError::query("set global compatibility"))?;
        Ok(())
    }
}
