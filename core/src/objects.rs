//! Object access: reading and writing whole objects at `s3://` and `file://` URLs, with a
//! sha256 of every byte moved and failures sorted into the classes a retry policy needs
//! (missing, unreachable, refused, transient, local disk). S3 goes through the `object_store`
//! crate, one client per bucket, cached; `file://` goes through plain tokio file I/O so local
//! paths mean exactly what the URL says and local errors keep their `io::Error`.
//!
//! Downloads stream to a temp file beside the destination and are renamed into place only when
//! complete, so a failed or cancelled pull never leaves a partial file where the caller looks.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::url::{Location, ObjectUrl};

/// Size of one multipart part, and the size up to which a file goes up in a single PUT. S3 needs
/// parts of at least 5 MiB; 8 MiB keeps part counts low without holding much in memory.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight at once during a multipart upload (memory is about this many parts).
const UPLOAD_CONCURRENCY: usize = 3;
/// Read size for local files.
const READ_CHUNK: usize = 256 * 1024;

/// Object storage settings; the `objects` block of the config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectsConfig {
    pub s3: S3Config,
}

/// The S3-compatible server. Unset fields fall back to the standard AWS environment variables
/// when [`Objects::new`] runs.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// `http(s)://host:port`; unset means AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Unset means: allowed exactly when the endpoint is `http://`.
    pub allow_http: Option<bool>,
    /// `endpoint/bucket/key` rather than `bucket.endpoint/key`; SeaweedFS and MinIO need it.
    pub force_path_style: bool,
    /// A request that receives nothing for this long fails. It is a stall timeout, not a
    /// total one, because a multi-gigabyte source takes longer than any fixed limit.
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            allow_http: None,
            force_path_style: true,
            timeout_secs: 60,
            connect_timeout_secs: 5,
        }
    }
}

// Hand-written so secrets never reach a log line through `{:?}`.
impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("force_path_style", &self.force_path_style)
            .field("timeout_secs", &self.timeout_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .finish()
    }
}

impl S3Config {
    /// Fills unset fields from AWS-style variables looked up through `var` (the process
    /// environment in [`Objects::new`]). Values already set win.
    pub fn with_env_fallback(mut self, var: impl Fn(&str) -> Option<String>) -> S3Config {
        let first = |names: &[&str]| names.iter().filter_map(|n| var(n)).find(|v| !v.is_empty());
        fill(&mut self.endpoint, || {
            first(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"])
        });
        fill(&mut self.region, || {
            first(&["AWS_REGION", "AWS_DEFAULT_REGION"])
        });
        fill(&mut self.access_key_id, || first(&["AWS_ACCESS_KEY_ID"]));
        fill(&mut self.secret_access_key, || {
            first(&["AWS_SECRET_ACCESS_KEY"])
        });
        fill(&mut self.session_token, || first(&["AWS_SESSION_TOKEN"]));
        if self.allow_http.is_none() {
            self.allow_http = first(&["AWS_ALLOW_HTTP"])
                .map(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
        }
        self
    }

    fn allow_http_effective(&self) -> bool {
        self.allow_http.unwrap_or_else(|| {
            self.endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
        })
    }
}

fn fill(slot: &mut Option<String>, f: impl FnOnce() -> Option<String>) {
    if slot.as_deref().is_none_or(str::is_empty) {
        *slot = f();
    }
}

/// The result of moving one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub bytes: u64,
    /// sha256 of the bytes moved, lowercase hex.
    pub sha256: String,
}

/// What `head` knows about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    pub e_tag: Option<String>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an object operation failed, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The object does not exist (the store answered, and said so).
    #[error("{url}: object not found")]
    NotFound { url: String },
    /// The store could not be reached: connection refused, DNS failure, timeout.
    #[error("{url}: object store unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: BoxError,
    },
    /// The store refused us: bad credentials or no permission.
    #[error("{url}: permission denied: {message}")]
    PermissionDenied { url: String, message: String },
    /// A failure that may pass: 5xx, 429, a reset connection, a truncated body.
    #[error("{url}: transient object store error: {message}")]
    Transient { url: String, message: String },
    /// The local side failed: reading the source, writing the destination, a full disk.
    #[error("{}: {source}", path.display())]
    LocalIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The object is bigger than the caller agreed to hold in memory.
    #[error("{url}: object is {size} bytes, more than the {max} allowed")]
    TooLarge { url: String, size: u64, max: u64 },
    /// The bytes read do not have the sha256 the caller expected.
    #[error("{url}: checksum mismatch: expected sha256 {expected}, got {found}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        found: String,
    },
    /// The S3 settings cannot work (for example an `http://` endpoint with `allow_http = false`).
    #[error("object store configuration: {message}")]
    Config { message: String },
    #[error("{url}: {message}")]
    Other { url: String, message: String },
}

impl ObjectError {
    /// Whether trying again later can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ObjectError::Unreachable { .. } | ObjectError::Transient { .. }
        )
    }

    /// A stable name for the class of error, stored in the database as `error_code`.
    pub fn code(&self) -> &'static str {
        match self {
            ObjectError::NotFound { .. } => "not_found",
            ObjectError::Unreachable { .. } => "unreachable",
            ObjectError::PermissionDenied { .. } => "permission_denied",
            ObjectError::Transient { .. } => "transient",
            ObjectError::LocalIo { .. } => "local_io",
            ObjectError::TooLarge { .. } => "too_large",
            ObjectError::ChecksumMismatch { .. } => "checksum_mismatch",
            ObjectError::Config { .. } => "config",
            ObjectError::Other { .. } => "other",
        }
    }

    fn local(path: &Path, source: std::io::Error) -> ObjectError {
        ObjectError::LocalIo {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Access to objects. Cheap to clone; clones share the per-bucket clients.
#[derive(Clone)]
pub struct Objects {
    inner: Arc<Inner>,
}

struct Inner {
    s3: S3Config,
    buckets: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl fmt::Debug for Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Objects")
            .field("s3", &self.inner.s3)
            .finish()
    }
}

/// Where one URL's bytes are.
enum Target {
    S3 {
        store: Arc<dyn ObjectStore>,
        path: StorePath,
    },
    File(PathBuf),
}

impl Objects {
    /// Builds the accessor. Unset S3 settings are filled from the AWS environment variables now;
    /// clients are created lazily, per bucket, on first use.
    pub fn new(cfg: ObjectsConfig) -> Self {
        let s3 = cfg.s3.with_env_fallback(|name| std::env::var(name).ok());
        Objects {
            inner: Arc::new(Inner {
                s3,
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Streams the object at `url` into `dest`, hashing as it goes. `dest` appears only when
    /// the whole object has arrived; on any failure (or if this future is dropped) nothing is
    /// left at `dest` or beside it.
    pub async fn get_to_file(&self, url: &ObjectUrl, dest: &Path) -> Result<Transfer, ObjectError> {
        let started = Instant::now();
        let target = self.target(url)?;
        let mut tmp = TempFile::create(dest).await?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        match target {
            Target::S3 { store, path } => {
                let got = store.get(&path).await.map_err(|e| classify(url, e))?;
                let expected = got.meta.size;
                let mut stream = got.into_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| classify_mid_stream(url, e))?;
                    hasher.update(&chunk);
                    bytes += chunk.len() as u64;
                    tmp.write(&chunk).await?;
                }
                // A connection that closes early can look like a clean end of stream.
                if bytes != expected {
                    return Err(ObjectError::Transient {
                        url: url.to_string(),
                        message: format!("body truncated: got {bytes} of {expected} bytes"),
                    });
                }
            }
            Target::File(src) => {
                let mut file = open_source(url, &src).await?;
                let mut buf = vec![0u8; READ_CHUNK];
                loop {
                    let n = file
                        .read(&mut buf)
                        .await
                        .map_err(|e| ObjectError::local(&src, e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    bytes += n as u64;
                    tmp.write(&buf[..n]).await?;
                }
            }
        }
        tmp.commit(dest).await?;
        let sha256 = hex(&hasher.finalize());
        tracing::debug!(%url, dest = %dest.display(), bytes, elapsed_ms = started.elapsed().as_millis() as u64, "object pulled");
        Ok(Transfer { bytes, sha256 })
    }

    /// Uploads a local file. Files up to [`PART_SIZE`] go in one PUT; larger ones as a
    /// multipart upload, streamed from disk, which is aborted if anything fails so no orphan
    /// parts are left on the server.
    pub async fn put_file(&self, src: &Path, url: &ObjectUrl) -> Result<Transfer, ObjectError> {
        let started = Instant::now();
        let target = self.target(url)?;
        let mut file = tokio::fs::File::open(src)
            .await
            .map_err(|e| ObjectError::local(src, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| ObjectError::local(src, e))?
            .len();
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        match target {
            Target::S3 { store, path } if size <= PART_SIZE as u64 => {
                let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(PART_SIZE));
                file.read_to_end(&mut buf)
                    .await
                    .map_err(|e| ObjectError::local(src, e))?;
                hasher.update(&buf);
                bytes = buf.len() as u64;
                store
                    .put(&path, PutPayload::from(buf))
                    .await
                    .map_err(|e| classify(url, e))?;
            }
            Target::S3 { store, path } => {
                let upload = store
                    .put_multipart(&path)
                    .await
                    .map_err(|e| classify(url, e))?;
                let mut upload =
                    UploadGuard::new(WriteMultipart::new_with_chunk_size(upload, PART_SIZE), url);
                let streamed = match upload.writer() {
                    Some(writer) => {
                        stream_parts(&mut file, src, url, writer, &mut hasher, &mut bytes).await
                    }
                    None => Ok(()),
                };
                match streamed {
                    // finish() aborts the upload itself when completing fails.
                    Ok(()) => upload.finish().await.map_err(|e| classify(url, e))?,
                    Err(e) => {
                        upload.abort().await;
                        return Err(e);
                    }
                }
            }
            Target::File(dest) => {
                let mut tmp = TempFile::create(&dest).await?;
                let mut buf = vec![0u8; READ_CHUNK];
                loop {
                    let n = file
                        .read(&mut buf)
                        .await
                        .map_err(|e| ObjectError::local(src, e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    bytes += n as u64;
                    tmp.write(&buf[..n]).await?;
                }
                tmp.commit(&dest).await?;
            }
        }
        let sha256 = hex(&hasher.finalize());
        tracing::debug!(%url, src = %src.display(), bytes, elapsed_ms = started.elapsed().as_millis() as u64, "object pushed");
        Ok(Transfer { bytes, sha256 })
    }

    /// Writes a small object (a manifest, a marker) from memory.
    pub async fn put_bytes(&self, url: &ObjectUrl, bytes: Bytes) -> Result<Transfer, ObjectError> {
        let transfer = Transfer {
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
        };
        match self.target(url)? {
            Target::S3 { store, path } => {
                store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(|e| classify(url, e))?;
            }
            Target::File(dest) => {
                let mut tmp = TempFile::create(&dest).await?;
                tmp.write(&bytes).await?;
                tmp.commit(&dest).await?;
            }
        }
        tracing::debug!(%url, bytes = transfer.bytes, "object written");
        Ok(transfer)
    }

    /// Reads a small object into memory, refusing (before reading the body) one that is bigger
    /// than `max_len`.
    pub async fn get_bytes(&self, url: &ObjectUrl, max_len: u64) -> Result<Bytes, ObjectError> {
        let too_large = |size| ObjectError::TooLarge {
            url: url.to_string(),
            size,
            max: max_len,
        };
        match self.target(url)? {
            Target::S3 { store, path } => {
                let got = store.get(&path).await.map_err(|e| classify(url, e))?;
                let expected = got.meta.size;
                if expected > max_len {
                    return Err(too_large(expected));
                }
                let mut out = BytesMut::with_capacity(usize::try_from(expected).unwrap_or(0));
                let mut stream = got.into_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| classify_mid_stream(url, e))?;
                    // The size header is the server's word; hold it to it.
                    if (out.len() + chunk.len()) as u64 > max_len {
                        return Err(too_large((out.len() + chunk.len()) as u64));
                    }
                    out.extend_from_slice(&chunk);
                }
                if out.len() as u64 != expected {
                    return Err(ObjectError::Transient {
                        url: url.to_string(),
                        message: format!("body truncated: got {} of {expected} bytes", out.len()),
                    });
                }
                Ok(out.freeze())
            }
            Target::File(src) => {
                let file = open_source(url, &src).await?;
                let mut out = Vec::new();
                // One byte past the limit tells "exactly max_len" from "more".
                let n = file
                    .take(max_len.saturating_add(1))
                    .read_to_end(&mut out)
                    .await
                    .map_err(|e| ObjectError::local(&src, e))?;
                if n as u64 > max_len {
                    let size = tokio::fs::metadata(&src)
                        .await
                        .map_or(n as u64, |m| m.len());
                    return Err(too_large(size));
                }
                Ok(Bytes::from(out))
            }
        }
    }

    /// Size, time and tag of an object; `None` when there is no object at `url`.
    pub async fn head(&self, url: &ObjectUrl) -> Result<Option<ObjectInfo>, ObjectError> {
        match self.target(url)? {
            Target::S3 { store, path } => match store.head(&path).await {
                Ok(meta) => Ok(Some(ObjectInfo {
                    size: meta.size,
                    last_modified: meta.last_modified,
                    e_tag: meta.e_tag,
                })),
                Err(e) => match classify(url, e) {
                    ObjectError::NotFound { .. } => Ok(None),
                    other => Err(other),
                },
            },
            Target::File(path) => match tokio::fs::metadata(&path).await {
                Ok(meta) if meta.is_file() => {
                    let modified = meta.modified().map_err(|e| ObjectError::local(&path, e))?;
                    Ok(Some(ObjectInfo {
                        size: meta.len(),
                        last_modified: DateTime::<Utc>::from(modified),
                        e_tag: Some(file_tag(&meta, modified)),
                    }))
                }
                // A directory is not an object, as an S3 prefix is not.
                Ok(_) => Ok(None),
                Err(e) if is_missing(&e) => Ok(None),
                Err(e) => Err(ObjectError::local(&path, e)),
            },
        }
    }

    /// Removes an object. Removing one that does not exist succeeds, as it does on S3, so a
    /// cleanup can be retried.
    pub async fn delete(&self, url: &ObjectUrl) -> Result<(), ObjectError> {
        match self.target(url)? {
            Target::S3 { store, path } => match store.delete(&path).await {
                Ok(()) => Ok(()),
                Err(e) => match classify(url, e) {
                    ObjectError::NotFound { .. } => Ok(()),
                    other => Err(other),
                },
            },
            Target::File(path) => match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ObjectError::local(&path, e)),
            },
        }
    }

    fn target(&self, url: &ObjectUrl) -> Result<Target, ObjectError> {
        // A prefix URL (from ObjectUrl::parse_prefix) names a folder, and these calls move
        // single objects.
        if url.key.is_empty() || url.key.ends_with('/') {
            return Err(ObjectError::Other {
                url: url.to_string(),
                message: "names a prefix, not an object".into(),
            });
        }
        match &url.location {
            Location::File => {
                url.local_path()
                    .map(Target::File)
                    .ok_or_else(|| ObjectError::Other {
                        url: url.to_string(),
                        message: "not a local path".into(),
                    })
            }
            Location::S3 { bucket } => {
                let path = StorePath::parse(&url.key).map_err(|e| ObjectError::Other {
                    url: url.to_string(),
                    message: format!("key not usable: {e}"),
                })?;
                Ok(Target::S3 {
                    store: self.bucket(bucket)?,
                    path,
                })
            }
        }
    }

    fn bucket(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, ObjectError> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still sound.
        let mut cache = self
            .inner
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(store) = cache.get(bucket) {
            return Ok(Arc::clone(store));
        }
        let store: Arc<dyn ObjectStore> = Arc::new(build_s3(&self.inner.s3, bucket)?);
        cache.insert(bucket.to_string(), Arc::clone(&store));
        Ok(store)
    }
}

fn build_s3(cfg: &S3Config, bucket: &str) -> Result<object_store::aws::AmazonS3, ObjectError> {
    let allow_http = cfg.allow_http_effective();
    if let Some(endpoint) = &cfg.endpoint {
        if endpoint.starts_with("http://") && !allow_http {
            return Err(ObjectError::Config {
                message: format!("endpoint {endpoint} is plain HTTP but allow_http is false"),
            });
        }
    }
    let client = ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
        .with_timeout_disabled()
        .with_read_timeout(Duration::from_secs(cfg.timeout_secs));
    // Our own retry policy (crate::retry: backoff, attempt counting, an event per retry)
    // decides whether to try an operation again. object_store retrying underneath it would
    // multiply attempts, hide failures from the events, and make one of our attempts cost an
    // unknown number of requests, so it does not retry at all: one attempt is one request. A
    // request lost on a stale pooled connection before it was written is resent by the HTTP
    // client itself (hyper retries canceled requests), which is the case a quick inner retry
    // used to cover.
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 0,
        retry_timeout: Duration::from_secs(10),
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(cfg.region.clone().unwrap_or_else(|| "us-east-1".into()))
        .with_virtual_hosted_style_request(!cfg.force_path_style)
        .with_client_options(client)
        .with_retry(retry);
    if let Some(endpoint) = &cfg.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    match (&cfg.access_key_id, &cfg.secret_access_key) {
        (Some(id), Some(secret)) => {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = &cfg.session_token {
                builder = builder.with_token(token);
            }
        }
        (None, None) => {
            // Without keys object_store would ask the cloud instance-metadata service for
            // credentials, which off-cloud means a slow timeout on every first request.
            // Unsigned requests fail fast and clearly instead (or work on a public bucket).
            tracing::info!(
                bucket,
                "no S3 credentials configured; requests are unsigned"
            );
            builder = builder.with_skip_signature(true);
        }
        _ => {
            return Err(ObjectError::Config {
                message: "access_key_id and secret_access_key must be set together".into(),
            })
        }
    }
    builder.build().map_err(|e| ObjectError::Config {
        message: format!("bucket {bucket}: {e}"),
    })
}

/// A `file://` object's tag: puts replace the file by rename, so a new upload always has a new
/// inode, and the mtime and size catch an edit in place.
fn file_tag(meta: &std::fs::Metadata, modified: std::time::SystemTime) -> String {
    use std::os::unix::fs::MetadataExt;
    let nanos = modified
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}-{:x}", meta.ino(), nanos, meta.len())
}

/// Owns a multipart upload until it is finished or aborted. Dropped before either (the caller's
/// future was cancelled, say by a drain timeout), it aborts the upload in the background, so
/// the server does not keep the uploaded parts forever.
struct UploadGuard {
    writer: Option<WriteMultipart>,
    url: String,
}

impl UploadGuard {
    fn new(writer: WriteMultipart, url: &ObjectUrl) -> Self {
        UploadGuard {
            writer: Some(writer),
            url: url.to_string(),
        }
    }

    fn writer(&mut self) -> Option<&mut WriteMultipart> {
        self.writer.as_mut()
    }

    async fn finish(mut self) -> Result<(), object_store::Error> {
        match self.writer.take() {
            Some(writer) => writer.finish().await.map(|_| ()),
            None => Ok(()),
        }
    }

    async fn abort(mut self) {
        if let Some(writer) = self.writer.take() {
            if let Err(e) = writer.abort().await {
                tracing::warn!(url = %self.url, error = %e, "aborting multipart upload failed; its parts stay until a bucket lifecycle rule removes them");
            }
        }
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let url = std::mem::take(&mut self.url);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = writer.abort().await {
                        tracing::warn!(%url, error = %e, "aborting cancelled multipart upload failed");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(%url, "multipart upload dropped outside a runtime; not aborted")
            }
        }
    }
}

/// Reads the next chunks of `file` into the multipart writer, hashing as it goes.
async fn stream_parts(
    file: &mut tokio::fs::File,
    src: &Path,
    url: &ObjectUrl,
    writer: &mut WriteMultipart,
    hasher: &mut Sha256,
    bytes: &mut u64,
) -> Result<(), ObjectError> {
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| ObjectError::local(src, e))?;
        if n == 0 {
            return Ok(());
        }
        // Bounded parts in flight: the file streams instead of piling up in memory.
        writer
            .wait_for_capacity(UPLOAD_CONCURRENCY)
            .await
            .map_err(|e| classify(url, e))?;
        hasher.update(&buf[..n]);
        *bytes += n as u64;
        writer.write(&buf[..n]);
    }
}

async fn open_source(url: &ObjectUrl, path: &Path) -> Result<tokio::fs::File, ObjectError> {
    match tokio::fs::File::open(path).await {
        Ok(f) => Ok(f),
        Err(e) if is_missing(&e) => Err(ObjectError::NotFound {
            url: url.to_string(),
        }),
        Err(e) => Err(ObjectError::local(path, e)),
    }
}

/// "No such object" for a path: the file is missing, or a parent is a file, not a folder.
fn is_missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

fn hex(digest: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(digest.len() * 2);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written beside its destination. Dropped before `commit`, it removes itself,
/// which covers both errors and a cancelled future.
struct TempFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
}

impl TempFile {
    async fn create(dest: &Path) -> Result<TempFile, ObjectError> {
        let name = dest
            .file_name()
            .ok_or_else(|| {
                ObjectError::local(
                    dest,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "destination has no file name",
                    ),
                )
            })?
            .to_string_lossy()
            .into_owned();
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ObjectError::local(&dir, e))?;
        // Same folder as the destination so the final rename stays on one filesystem (atomic);
        // the pid and counter keep concurrent pulls of the same name apart.
        let path = dir.join(format!(
            ".{name}.partial.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| ObjectError::local(&path, e))?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), ObjectError> {
        let Some(file) = self.file.as_mut() else {
            return Err(self.closed());
        };
        file.write_all(data)
            .await
            .map_err(|e| ObjectError::local(&self.path, e))
    }

    /// Flushes, syncs and renames into place. The sync comes first so that after a crash the
    /// destination holds either nothing or the whole object, never a renamed empty file.
    async fn commit(mut self, dest: &Path) -> Result<(), ObjectError> {
        let Some(mut file) = self.file.take() else {
            return Err(self.closed());
        };
        file.flush()
            .await
            .map_err(|e| ObjectError::local(&self.path, e))?;
        file.sync_all()
            .await
            .map_err(|e| ObjectError::local(&self.path, e))?;
        drop(file);
        tokio::fs::rename(&self.path, dest)
            .await
            .map_err(|e| ObjectError::local(dest, e))?;
        // Renamed: nothing left for Drop to clean up.
        self.path = PathBuf::new();
        Ok(())
    }

    fn closed(&self) -> ObjectError {
        ObjectError::local(
            &self.path,
            std::io::Error::other("temporary file already closed"),
        )
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        self.file.take();
        // Blocking, but a single unlink; Drop cannot await and leaving the file is worse.
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove partial download");
            }
        }
    }
}

/// Sorts an `object_store` error into our classes. object_store already maps 404/403/401;
/// everything else arrives as `Generic` with the HTTP failure somewhere in its source chain,
/// so the chain is searched for a transport error kind, an io error, or an HTTP status.
fn classify(url: &ObjectUrl, err: object_store::Error) -> ObjectError {
    let url_s = url.to_string();
    match err {
        object_store::Error::NotFound { .. } => ObjectError::NotFound { url: url_s },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => ObjectError::PermissionDenied {
            url: url_s,
            message: chain_text(&err),
        },
        other => match chain_class(&other) {
            Class::Unreachable => ObjectError::Unreachable {
                url: url_s,
                source: Box::new(other),
            },
            Class::Transient => ObjectError::Transient {
                url: url_s,
                message: chain_text(&other),
            },
            Class::Denied => ObjectError::PermissionDenied {
                url: url_s,
                message: chain_text(&other),
            },
            Class::NotFound => ObjectError::NotFound { url: url_s },
            Class::Unknown => ObjectError::Other {
                url: url_s,
                message: chain_text(&other),
            },
        },
    }
}

/// Like [`classify`], for a failure after the response had started. object_store resumes a
/// broken body itself; when that fails too it can report oddities (a resumed range that does
/// not line up, a changed object), and for all of them pulling again from the start is the
/// remedy, so what is not clearly missing or forbidden counts as transient.
fn classify_mid_stream(url: &ObjectUrl, err: object_store::Error) -> ObjectError {
    match classify(url, err) {
        ObjectError::Other { url, message } => ObjectError::Transient {
            url,
            message: format!("transfer interrupted: {message}"),
        },
        other => other,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Unreachable,
    Transient,
    Denied,
    NotFound,
    Unknown,
}

fn chain_class(err: &(dyn std::error::Error + 'static)) -> Class {
    use object_store::client::HttpErrorKind;
    use std::io::ErrorKind;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            match http.kind() {
                HttpErrorKind::Connect | HttpErrorKind::Timeout => return Class::Unreachable,
                HttpErrorKind::Request | HttpErrorKind::Interrupted | HttpErrorKind::Decode => {
                    return Class::Transient
                }
                // Unknown: keep looking further down for something more telling.
                _ => {}
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused
                | ErrorKind::NotConnected
                | ErrorKind::AddrNotAvailable
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::TimedOut => return Class::Unreachable,
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof => return Class::Transient,
                _ => {}
            }
        }
        if let Some(class) = status_class(&e.to_string()) {
            return class;
        }
        cur = e.source();
    }
    Class::Unknown
}

/// object_store's request error is private, so the HTTP status is read from its message
/// ("… status code: 503 Service Unavailable …"), and S3's "error in a 200 body" codes by name.
fn status_class(text: &str) -> Option<Class> {
    if let Some(idx) = text.find("status code: ") {
        let digits: String = text[idx + "status code: ".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(status) = digits.parse::<u16>() {
            return Some(match status {
                401 | 403 => Class::Denied,
                404 => Class::NotFound,
                408 | 429 => Class::Transient,
                500..=599 => Class::Transient,
                _ => Class::Unknown,
            });
        }
    }
    if text.contains("SlowDown") || text.contains("InternalError") {
        return Some(Class::Transient);
    }
    None
}

fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    // object_store's messages repeat their source's text; the outermost one is complete.
    err.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_is_classified() {
        let t = "Error performing GET http://x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: busy";
        assert_eq!(status_class(t), Some(Class::Transient));
        assert_eq!(
            status_class("non-2xx status code: 429 Too Many Requests"),
            Some(Class::Transient)
        );
        assert_eq!(
            status_class("non-2xx status code: 403 Forbidden"),
            Some(Class::Denied)
        );
        assert_eq!(
            status_class("Server returned error response: <Code>SlowDown</Code>"),
            Some(Class::Transient)
        );
        assert_eq!(status_class("something else"), None);
    }

    #[test]
    fn env_fallback_fills_only_unset_fields() {
        let cfg = S3Config {
            region: Some("eu-west-1".into()),
            ..S3Config::default()
        };
        let env = |name: &str| match name {
            "AWS_REGION" => Some("us-east-2".to_string()),
            "AWS_ENDPOINT" => Some("http://127.0.0.1:9".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("id".to_string()),
            _ => None,
        };
        let got = cfg.with_env_fallback(env);
        assert_eq!(got.region.as_deref(), Some("eu-west-1"));
        assert_eq!(got.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(got.access_key_id.as_deref(), Some("id"));
        assert!(got.allow_http_effective());
    }

    #[test]
    fn debug_hides_secrets() {
        let cfg = S3Config {
            secret_access_key: Some("hunter2".into()),
            ..S3Config::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
