//! Secrets mounted as files. The relay (and the provision and cleanup steps) read each mounted
//! Secret key into the environment variable the configuration names, and the relay stops when
//! one of the files changes, so Kubernetes restarts the container with the rotated value. The
//! operator never reads Secrets, so it cannot roll the Pods on a rotation itself.
//!
//! Files are compared by content on a timer rather than by inotify: kubelet swaps a Secret
//! volume through a `..data` symlink, which inotify on the file path does not report reliably.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// One `NAME=PATH` mapping: environment variable `NAME` gets the content of `PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretFile {
    pub env: String,
    pub path: PathBuf,
}

/// A Secret file that cannot be used; never carries the file's content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("secret file mapping {0:?} is not NAME=PATH")]
    Mapping(String),
    #[error("read secret file {path} (for {env}): {source}")]
    Read {
        env: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FromStr for SecretFile {
    type Err = SecretFileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (env, path) = s
            .split_once('=')
            .ok_or_else(|| SecretFileError::Mapping(s.to_owned()))?;
        let valid_name = !env.is_empty() && env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name || path.is_empty() {
            return Err(SecretFileError::Mapping(s.to_owned()));
        }
        Ok(Self {
            env: env.to_owned(),
            path: path.into(),
        })
    }
}

fn read(file: &SecretFile) -> Result<String, SecretFileError> {
    std::fs::read_to_string(&file.path).map_err(|source| SecretFileError::Read {
        env: file.env.clone(),
        path: file.path.clone(),
        source,
    })
}

fn fingerprint(content: &str) -> u64 {
    let mut h = DefaultHasher::new();
    content.hash(&mut h);
    h.finish()
}

/// The contents seen at start, to compare later reads with.
#[derive(Clone, Debug)]
pub struct Snapshot {
    files: Vec<(SecretFile, u64)>,
}

/// Reads every file into its environment variable (trailing newlines trimmed, as `kubectl
/// create secret --from-file` keeps them).
///
/// Must run before the process starts work that reads the environment: the subcommands call
/// it first thing, before spawning any task.
pub fn load(files: &[SecretFile]) -> Result<Snapshot, SecretFileError> {
    let mut seen = Vec::with_capacity(files.len());
    for file in files {
        let content = read(file)?;
        let value = content.trim_end_matches(['\n', '\r']);
        // SAFETY: called at the start of a subcommand, before it spawns tasks or threads of its
        // own; nothing else in the process reads or writes the environment concurrently.
        unsafe { std::env::set_var(&file.env, value) };
        seen.push((file.clone(), fingerprint(&content)));
    }
    Ok(Snapshot { files: seen })
}

/// Resolves when a file's content differs from the snapshot (or it cannot be read any more),
/// naming the environment variable it feeds.
pub async fn changed(snapshot: Snapshot, every: Duration) -> String {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for (file, before) in &snapshot.files {
            match read(file) {
                Ok(now) if fingerprint(&now) == *before => {}
                // A half-swapped volume reads as missing for a moment; a real removal shows
                // on the next tick too, and either way a restart is what fixes it.
                _ => return file.env.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_parse_and_bad_ones_are_refused() {
        let f: SecretFile = "DATABASE_URL=/var/run/secrets/db/url".parse().unwrap();
        assert_eq!(f.env, "DATABASE_URL");
        assert_eq!(f.path, PathBuf::from("/var/run/secrets/db/url"));
        assert!("no-equals".parse::<SecretFile>().is_err());
        assert!("BAD-NAME=/x".parse::<SecretFile>().is_err());
        assert!("NAME=".parse::<SecretFile>().is_err());
    }

    #[tokio::test]
    async fn a_changed_file_is_noticed_and_an_unchanged_one_is_not() {
        let dir = std::env::temp_dir().join(format!("secret-watch-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("url");
        std::fs::write(&path, "postgres://a:old@db/x\n").unwrap();
        let env = format!("SECRET_WATCH_TEST_{}", uuid::Uuid::new_v4().simple());
        let files = vec![SecretFile {
            env: env.clone(),
            path: path.clone(),
        }];
        let snapshot = load(&files).unwrap();
        assert_eq!(std::env::var(&env).unwrap(), "postgres://a:old@db/x");

        let quiet = tokio::time::timeout(
            Duration::from_millis(300),
            changed(snapshot.clone(), Duration::from_millis(20)),
        )
        .await;
        assert!(quiet.is_err(), "an unchanged file must not count as changed");

        std::fs::write(&path, "postgres://a:new@db/x\n").unwrap();
        let noticed = tokio::time::timeout(Duration::from_secs(5), changed(snapshot, Duration::from_millis(20)))
            .await
            .expect("the change is noticed within 5 s");
        assert_eq!(noticed, env);
        let _ = std::fs::remove_dir_all(dir);
    }
}
