//! Admin endpoints (behind `AUTH_TOKEN` like `/v1`): `GET /admin/backup` streams a backup of
//! this node's data, `POST /admin/checkpoint` writes a checkpoint now and answers its figures,
//! `POST /admin/repair` runs an anti-entropy round now and `GET /admin/repair` shows the last.

use crate::error::ApiError;
use crate::routes::AppState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use kv_core::BackupInfo;
use serde_json::{json, Value};
use std::path::Path;
use tokio::io::AsyncReadExt;
use tracing::warn;

/// Bytes read from the backup file per body chunk.
const CHUNK_BYTES: usize = 256 * 1024;

/// `GET /admin/backup`: writes a backup to a temporary file in `DATA_DIR` while writes go on
/// (`Store::backup_to`: every write acknowledged before the request arrived is in it), then
/// streams it as `application/octet-stream`. The file is unlinked as soon as it is open, so it
/// is gone when the download ends or breaks; one backup file is written at a time.
///
/// Headers: `Content-Length`, `Content-Disposition` with a file name, `X-Kv-Backup-Entries`
/// and `X-Kv-Backup-Created-Ms` (when the backup began, unix ms).
pub async fn backup(State(app): State<AppState>) -> Result<Response, ApiError> {
    let store = app.cluster().store().clone();
    let (file, info) = {
        let _one_at_a_time = app.backup_lock().lock().await;
        let path = store.backup_temp_path();
        tokio::task::spawn_blocking(move || open_unlinked(&store, &path))
            .await
            .map_err(|e| ApiError::Internal(format!("backup task failed: {e}")))??
    };
    let name = format!("kv-backup-{}-{}.db", app.config().name, info.created_ms);
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::CONTENT_LENGTH, info.bytes.to_string()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        ),
    ];
    let mut response = (headers, Body::from_stream(chunks(file))).into_response();
    let extra = response.headers_mut();
    extra.insert("x-kv-backup-entries", HeaderValue::from(info.entries));
    extra.insert("x-kv-backup-created-ms", HeaderValue::from(info.created_ms));
    Ok(response)
}

/// Writes the backup, opens it, and unlinks it (the open handle keeps the bytes readable).
fn open_unlinked(
    store: &kv_core::Store,
    path: &Path,
) -> Result<(tokio::fs::File, BackupInfo), ApiError> {
    let info = store.backup_to(path)?;
    let opened = std::fs::File::open(path);
    if let Err(e) = std::fs::remove_file(path) {
        warn!(path = %path.display(), error = %e, "cannot remove the backup file; remove it by hand");
    }
    let file = opened
        .map_err(|e| ApiError::Internal(format!("cannot open backup {}: {e}", path.display())))?;
    Ok((tokio::fs::File::from_std(file), info))
}

/// The file as a stream of chunks; ends after the first read error (the client then gets a
/// short body, which `kv-node restore` refuses).
fn chunks(file: tokio::fs::File) -> impl Stream<Item = std::io::Result<Bytes>> {
    futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0; CHUNK_BYTES];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => {
                warn!(error = %e, "reading the backup file failed; the download is cut short");
                Some((Err(e), None))
            }
        }
    })
}

/// `POST /admin/checkpoint`: runs a checkpoint now (writes go on meanwhile) and answers
/// `{"keys", "bytes", "duration_ms", "tombstones_dropped", "wal_bytes"}`; `keys` counts the
/// entries written, tombstones included, and `wal_bytes` is what is left after it.
pub async fn checkpoint(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = app.cluster().store();
    let stats = store.checkpoint().await?;
    Ok(Json(json!({
        "keys": stats.keys,
        "bytes": stats.bytes,
        "duration_ms": stats.duration.as_secs_f64() * 1000.0,
        "tombstones_dropped": stats.tombstones_dropped,
        "wal_bytes": store.status().wal_bytes,
    })))
}

/// `POST /admin/repair`: runs a full anti-entropy round now (after the one running, if any) and
/// answers its report: ranges compared and differing, records sent and received, zombies
/// dropped, bytes, whether it completed and the tombstone horizon.
pub async fn repair(State(app): State<AppState>) -> Json<kv_cluster::RepairReport> {
    Json(app.cluster().repair_round("admin").await)
}

/// `GET /admin/repair`: the last round's report (`null` before the first), the horizon, and
/// whether this node is still syncing after a restore.
pub async fn last_repair(State(app): State<AppState>) -> Json<Value> {
    let cluster = app.cluster();
    Json(json!({
        "last": cluster.last_repair(),
        "tombstone_horizon_ms": cluster.tombstone_horizon(),
        "syncing": cluster.syncing(),
        "interval_secs": app.config().anti_entropy_interval.as_secs(),
    }))
}
