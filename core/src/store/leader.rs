//! Leader election (ARCHITECTURE §8: "a PostgreSQL advisory lock keeps one active scaler").
//! It owns the lock and the question "am I still the leader?", nothing about what a leader
//! does.
//!
//! - **PostgreSQL**: a session-level `pg_try_advisory_lock` held on a connection of its own,
//!   outside the pool (a pooled connection would go back to the pool still holding the lock).
//!   The server releases the lock the moment that session ends, so a killed leader is replaced
//!   as soon as its TCP connection is torn down, with no lease to wait out. When the connection
//!   is lost while the leader lives (a database restart), [`Leadership::confirm`] reconnects and
//!   takes the lock again unless a standby got there first; only then is leadership lost.
//! - **SQLite**: an exclusive advisory file lock on `<db>.<lock name>.leader` (the scaler's is
//!   `<db>.transcode-scaler.leader`; the embedded mode is one host), released by the kernel when the process dies. In memory there is one process, so
//!   leadership is always granted.

use super::{StoreError, StoreResult};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use tokio_postgres::NoTls;

/// Held by the process that leads; dropping it gives leadership up.
#[async_trait]
pub trait Leadership: Send + Sync {
    /// Checks that the lock is still held. [`StoreError::LostLeadership`] means another process
    /// leads now and this one must stop acting; [`StoreError::Unavailable`] means it cannot be
    /// told right now (the database is down), and the caller should ask again.
    async fn confirm(&mut self) -> StoreResult<()>;
}

/// The advisory lock key of a leadership name: stable across processes and releases.
pub fn lock_key(name: &str) -> i64 {
    // FNV-1a: any fixed hash works, it only has to agree between processes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

pub(crate) struct PgLeader {
    config: tokio_postgres::Config,
    key: i64,
    client: Option<tokio_postgres::Client>,
}

impl PgLeader {
    /// Tries once; `None` when another session holds the lock.
    pub(crate) async fn try_take(
        config: &tokio_postgres::Config,
        name: &str,
    ) -> StoreResult<Option<PgLeader>> {
        let mut l = PgLeader {
            config: config.clone(),
            key: lock_key(name),
            client: None,
        };
        Ok(l.lock().await?.then_some(l))
    }

    async fn lock(&mut self) -> StoreResult<bool> {
        let (client, conn) = self
            .config
            .connect(NoTls)
            .await
            .map_err(super::postgres::pg)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "leader lock connection ended");
            }
        });
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&self.key])
            .await
            .map_err(super::postgres::pg)?;
        let got: bool = row.try_get(0).map_err(super::postgres::pg)?;
        if got {
            self.client = Some(client);
        }
        Ok(got)
    }
}

#[async_trait]
impl Leadership for PgLeader {
    async fn confirm(&mut self) -> StoreResult<()> {
        if let Some(c) = &self.client {
            // The lock lives exactly as long as this session: a round trip on it proves both.
            match c.simple_query("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "the leader lock's connection was lost; taking the lock again");
                    self.client = None;
                }
            }
        }
        if self.lock().await? {
            tracing::info!("leader lock taken again after a lost connection");
            Ok(())
        } else {
            Err(StoreError::LostLeadership(
                "another scaler took the leader lock while this one's connection was down".into(),
            ))
        }
    }
}

pub(crate) struct FileLeader {
    _file: std::fs::File,
    path: PathBuf,
}

impl FileLeader {
    pub(crate) fn try_take(db: &Path, name: &str) -> StoreResult<Option<FileLeader>> {
        let mut os = db.as_os_str().to_os_string();
        os.push(format!(".{name}.leader"));
        let path = PathBuf::from(os);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLeader { _file: file, path })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
                "locking {}: {e}",
                path.display()
            ))),
        }
    }
}

#[async_trait]
impl Leadership for FileLeader {
    async fn confirm(&mut self) -> StoreResult<()> {
        // A file lock cannot be lost while the descriptor is open; a deleted lock file would
        // let a second process lock a new one, so that is checked.
        if self.path.exists() {
            Ok(())
        } else {
            Err(StoreError::LostLeadership(format!(
                "the leader lock file {} was removed",
                self.path.display()
            )))
        }
    }
}

/// Leadership where only one process can exist (an in-memory database).
pub(crate) struct Sole;

#[async_trait]
impl Leadership for Sole {
    async fn confirm(&mut self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(super::lock_key("scaler"), super::lock_key("scaler"));
        assert_ne!(super::lock_key("scaler"), super::lock_key("scaler2"));
    }
}
