//! S3 backend (`s3://BUCKET/PREFIX`) on aws-sdk-s3, for AWS and S3-compatible servers.
//!
//! Invariants:
//! - Every object lives under `PREFIX/` in `BUCKET`; keys given to and returned by this store
//!   are relative to it, so one store can never see or touch objects outside its prefix.
//! - IfAbsent is `If-None-Match: *`; S3's 412 becomes `PreconditionFailed`. Whether a server
//!   really honours it is checked separately (`probe_if_absent`), not assumed here.
//! - Bytes returned are exactly the bytes asked for: a body shorter or longer than requested
//!   is a retried transient failure, never data; a range past the end is `InvalidRange`.
//! - Retries are ours, not the SDK's (its retry layer is disabled), so the bound is explicit:
//!   transient failures (5xx, 429/503 throttling, 409 ConditionalRequestConflict, timeouts,
//!   connection errors, truncated bodies) are retried with exponential backoff and full
//!   jitter until `retry_max_elapsed` has passed (a last attempt starts at its end; none
//!   after it) or `retry_attempts_max` attempts were made, and each attempt is cut off by
//!   a size-aware timeout. The SDK keeps its connect timeout and stalled-stream protection.
//! - An IfAbsent put whose earlier attempt failed ambiguously (timeout, 5xx: it may have been
//!   applied) and whose retry then gets 412 reads the object back: identical bytes mean our
//!   own write landed, so the put succeeded.
//! - Errors carry the key and a reason with the HTTP status and S3 error code;
//!   `describe()` never includes credentials.
//! - One client (one connection pool) per store, shared by all concurrent calls.
//!
//! Listing order is the server's. AWS and moto return keys in byte order, as the store
//! contract says. SeaweedFS (a filer underneath) returns them in *component order*: sorted as
//! lists of `/`-separated components, i.e. as if `/` sorted below every other byte. The two
//! orders differ only when a "directory" has a sibling that extends its name with a byte below
//! `/` (space through `.`): SeaweedFS lists `a/x` before `a-b`, byte order `a-b` first.
//! Paging with `ListPage::next` still visits every key exactly once on SeaweedFS; callers
//! that need byte order must keep such sibling names apart (fixed-width names in one
//! directory, or listing with a `dir/` prefix, are safe everywhere).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use rand::Rng;

use super::*;

/// Region used when neither the options nor the AWS config chain name one.
const REGION_DEFAULT: &str = "us-east-1";
/// DeleteObjects accepts at most this many keys per request.
const DELETE_BATCH_MAX: usize = 1000;
/// First backoff step; doubled per attempt up to [`BACKOFF_CAP`], then fully jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Placeholder size in an `InvalidRange` from a 416 without `Content-Range`; `get_range`
/// replaces it with the size from a HEAD before returning.
const SIZE_UNKNOWN: u64 = u64::MAX;

/// Connection settings for the S3 backend (credentials come from the standard AWS chain:
/// environment, profile, web identity, container/instance metadata).
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible server; `None` is AWS.
    pub endpoint: Option<String>,
    /// Region; `None` takes the AWS config chain's, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style URLs (`http://host/bucket/key`), needed by most self-hosted servers.
    pub path_style: bool,
    /// TCP/TLS connect timeout (SDK-enforced).
    pub connect_timeout: Duration,
    /// Per-attempt time limit for a request moving no payload (HEAD, LIST, DELETE, small
    /// objects); larger transfers get `payload_bytes / attempt_bytes_per_sec_min` more.
    pub attempt_timeout: Duration,
    /// Slowest transfer rate tolerated before an attempt is cut off and retried.
    pub attempt_bytes_per_sec_min: u64,
    /// Retries go on for this long after the first attempt (the last one starts at the
    /// end of the window at the latest; none starts after it).
    pub retry_max_elapsed: Duration,
    /// At most this many attempts per operation (1 = no retries). The default is only a
    /// sanity bound: with backoff capped at 5 s, the time window is what ends retries.
    pub retry_attempts_max: u32,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            path_style: false,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
            attempt_bytes_per_sec_min: 1 << 20,
            retry_max_elapsed: Duration::from_secs(30),
            retry_attempts_max: 64,
        }
    }
}

pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or the store prefix followed by `/`.
    key_prefix: String,
    opts: S3Options,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The SDK client's Debug output is large; the store is identified by its URL.
        f.debug_struct("S3Store")
            .field("url", &self.describe())
            .field("endpoint", &self.opts.endpoint)
            .finish()
    }
}

/// How one failed attempt should be treated.
enum Failure {
    /// Worth another attempt; `ambiguous` when the request may have been applied.
    Retry { reason: String, ambiguous: bool },
    /// Final answer.
    Fail(StoreError),
}

/// What an S3 error means, independent of the operation.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    NotFound,
    Precondition,
    InvalidRange,
    Retry { ambiguous: bool },
    Permanent,
}

/// Classify by HTTP status and S3 error code. `None` status: no HTTP response at all.
fn classify_status(status: u16, code: Option<&str>) -> Class {
    match (status, code) {
        // A missing bucket is a configuration error, not a missing object.
        (404, Some("NoSuchBucket")) => Class::Permanent,
        (404, _) => Class::NotFound,
        (412, _) => Class::Precondition,
        (416, _) => Class::InvalidRange,
        // Concurrent conditional writes to one key: S3 asks us to retry.
        (409, Some("ConditionalRequestConflict" | "OperationAborted")) => {
            Class::Retry { ambiguous: false }
        }
        (400, Some("RequestTimeout")) | (408, _) => Class::Retry { ambiguous: true },
        // The body's checksum did not match what arrived: nothing was stored; send again.
        (400, Some("BadDigest" | "XAmzContentChecksumMismatch")) => {
            Class::Retry { ambiguous: false }
        }
        (429, _) => Class::Retry { ambiguous: false },
        (503, Some("SlowDown")) => Class::Retry { ambiguous: false },
        (500..=599, _) => Class::Retry { ambiguous: true },
        _ => Class::Permanent,
    }
}

/// The `x-amz-checksum-crc32` value of `data`: the CRC-32 (IEEE, as zlib and `crc32fast`)
/// as 4 big-endian bytes, base64-encoded.
fn crc32_base64(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(crc32fast::hash(data).to_be_bytes())
}

/// Status, code and a human reason for an SDK error, plus its class.
fn classify<E>(err: &SdkError<E, HttpResponse>) -> (Class, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code();
            let reason = format!(
                "HTTP {status} {}: {}",
                code.unwrap_or("(no error code)"),
                ctx.err().message().unwrap_or("(no message)")
            );
            (classify_status(status, code), reason)
        }
        SdkError::TimeoutError(_) => (
            Class::Retry { ambiguous: true },
            "timed out (SDK timeout)".into(),
        ),
        SdkError::DispatchFailure(d) => {
            let reason = format!(
                "request not completed: {}",
                aws_sdk_s3::error::DisplayErrorContext(err)
            );
            if d.is_user() {
                // Bad endpoint URL, invalid header … retrying cannot help.
                (Class::Permanent, reason)
            } else {
                (Class::Retry { ambiguous: true }, reason)
            }
        }
        SdkError::ResponseError(r) => (
            Class::Retry { ambiguous: true },
            format!(
                "unreadable response (HTTP {}): {}",
                r.raw().status().as_u16(),
                aws_sdk_s3::error::DisplayErrorContext(err)
            ),
        ),
        _ => (
            Class::Permanent,
            format!(
                "request could not be built: {}",
                aws_sdk_s3::error::DisplayErrorContext(err)
            ),
        ),
    }
}

/// Turn an SDK error into an attempt outcome; `NotFound`/`Precondition` map to store errors,
/// an `InvalidRange` needs the operation's context, so callers handle 416 before this.
fn failure<E>(key: &str, err: &SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let (class, reason) = classify(err);
    match class {
        Class::NotFound => Failure::Fail(StoreError::NotFound { key: key.into() }),
        Class::Precondition => Failure::Fail(StoreError::PreconditionFailed { key: key.into() }),
        Class::Retry { ambiguous } => Failure::Retry { reason, ambiguous },
        Class::InvalidRange | Class::Permanent => Failure::Fail(StoreError::Permanent {
            key: key.into(),
            reason,
        }),
    }
}

/// Parse `bytes a-b/total` or `bytes */total`; returns the total size when given.
fn content_range_total(v: &str) -> Option<u64> {
    let (_, total) = v.trim().strip_prefix("bytes")?.trim().split_once('/')?;
    total.trim().parse().ok()
}

/// Full-jitter backoff for attempt `n` (1-based): uniform in `0..=min(cap, base * 2^(n-1))`.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceiling = exp.min(BACKOFF_CAP);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

impl S3Store {
    /// Open `BUCKET[/PREFIX]` (the part of an `s3://` URL after the scheme).
    pub async fn open(bucket_and_prefix: &str, opts: &S3Options) -> StoreResult<Self> {
        let region = match &opts.region {
            Some(r) => Region::new(r.clone()),
            None => aws_config::meta::region::RegionProviderChain::default_provider()
                .or_else(Region::new(REGION_DEFAULT))
                .region()
                .await
                .unwrap_or_else(|| Region::new(REGION_DEFAULT)),
        };
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(ep) = &opts.endpoint {
            conf = conf.endpoint_url(ep);
        }
        let conf = Self::tune(conf, opts);
        Self::with_client(Client::from_conf(conf.build()), bucket_and_prefix, opts)
    }

    /// Settings every client gets, whatever its credentials source.
    fn tune(conf: aws_sdk_s3::config::Builder, opts: &S3Options) -> aws_sdk_s3::config::Builder {
        conf.force_path_style(opts.path_style)
            // Retries are ours (see module doc): the SDK's would multiply our bound.
            .retry_config(RetryConfig::disabled())
            // Connect timeout from the SDK; the whole-attempt limit is ours and size-aware,
            // because the SDK's read timeout (to first response byte) includes the upload.
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(opts.connect_timeout)
                    .disable_read_timeout()
                    .disable_operation_timeout()
                    .disable_operation_attempt_timeout()
                    .build(),
            )
            // Only the checksums S3 requires (DeleteObjects): many S3-compatible servers reject
            // the default streaming-trailer checksums, and our objects carry their own crc32.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
    }

    /// Build a store around an existing client (tests use static credentials this way).
    fn with_client(client: Client, bucket_and_prefix: &str, opts: &S3Options) -> StoreResult<Self> {
        let bad = |reason: &str| StoreError::Permanent {
            key: bucket_and_prefix.to_string(),
            reason: reason.to_string(),
        };
        let (bucket, prefix) = match bucket_and_prefix.split_once('/') {
            Some((b, p)) => (b, p.trim_end_matches('/')),
            None => (bucket_and_prefix, ""),
        };
        if bucket.is_empty() {
            return Err(bad("missing bucket name (expected s3://BUCKET[/PREFIX])"));
        }
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| bad(&format!("invalid prefix: {e}")))?;
        }
        if opts.retry_attempts_max == 0 {
            return Err(bad("retry_attempts_max must be at least 1"));
        }
        Ok(Self {
            client,
            bucket: bucket.to_string(),
            key_prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            opts: opts.clone(),
        })
    }

    /// Validate a store key and return the full S3 key.
    fn full_key(&self, key: &str) -> StoreResult<String> {
        validate_key(key)?;
        let full = format!("{}{key}", self.key_prefix);
        if full.len() > KEY_BYTES_MAX {
            return Err(StoreError::InvalidKey {
                key: key.chars().take(200).collect(),
                reason: format!(
                    "with the store prefix the S3 key is {} bytes, over S3's {KEY_BYTES_MAX}",
                    full.len()
                ),
            });
        }
        Ok(full)
    }

    fn attempt_timeout(&self, payload_bytes: u64) -> Duration {
        let rate = self.opts.attempt_bytes_per_sec_min.max(1);
        self.opts
            .attempt_timeout
            .saturating_add(Duration::from_secs(payload_bytes / rate))
    }

    /// Run `attempt` until it succeeds, fails for good, or the retry budget is spent.
    /// `ambiguous` is set when a failed attempt may nevertheless have been applied.
    async fn retry<T, F, Fut>(
        &self,
        key: &str,
        op: &'static str,
        payload_bytes: u64,
        ambiguous: &AtomicBool,
        mut attempt: F,
    ) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let per_attempt = self.attempt_timeout(payload_bytes);
        let mut n: u32 = 0;
        loop {
            n += 1;
            let reason = match tokio::time::timeout(per_attempt, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(Failure::Fail(e))) => return Err(e),
                Ok(Err(Failure::Retry {
                    reason,
                    ambiguous: a,
                })) => {
                    if a {
                        ambiguous.store(true, Ordering::Relaxed);
                    }
                    reason
                }
                Err(_) => {
                    ambiguous.store(true, Ordering::Relaxed);
                    format!("attempt timed out after {per_attempt:?}")
                }
            };
            // The last wait is cut short so that a final attempt starts right at the end of
            // the window: an outage that ends within it is ridden out, however the jitter
            // fell (giving up when the next full wait would cross it ended a 2 s window
            // after 0.7 s of refused connections).
            let spent = started.elapsed();
            let remaining = self.opts.retry_max_elapsed.saturating_sub(spent);
            let delay = backoff(n).min(remaining);
            if n >= self.opts.retry_attempts_max || remaining.is_zero() {
                return Err(StoreError::Transient {
                    key: key.into(),
                    reason: format!(
                        "{op} failed after {n} attempts in {:.1}s; last: {reason}",
                        spent.as_secs_f64()
                    ),
                });
            }
            tracing::debug!(store = %self.describe(), key, op, attempt = n, ?delay, %reason, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One PUT attempt of `data` that declares `crc32_b64` as its checksum, right or not:
    /// for tests that check the server verifies the checksum `put` sends. Not for use.
    #[doc(hidden)]
    pub async fn put_once_declaring_crc32(
        &self,
        key: &str,
        data: Bytes,
        crc32_b64: &str,
    ) -> StoreResult<()> {
        let full = self.full_key(key)?;
        match self
            .put_once(&full, key, &data, crc32_b64, PutMode::Overwrite)
            .await
        {
            Ok(()) => Ok(()),
            Err(Failure::Fail(e)) => Err(e),
            Err(Failure::Retry { reason, .. }) => Err(StoreError::Transient {
                key: key.into(),
                reason,
            }),
        }
    }

    async fn put_once(
        &self,
        full: &str,
        key: &str,
        data: &Bytes,
        crc32_b64: &str,
        mode: PutMode,
    ) -> Result<(), Failure> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .content_length(data.len() as i64)
            // The body's integrity check: the server recomputes it and refuses a body that
            // changed on the way (`BadDigest`, retried). CRC32 costs a fraction of the SHA-256
            // that signing the payload would (SigV4 hashed every uploaded byte: ~16% of the
            // daemon's CPU in random writes against SeaweedFS), so the payload goes unsigned
            // (`UNSIGNED-PAYLOAD`; the headers, this checksum among them, are still signed).
            .checksum_crc32(crc32_b64)
            // Bytes clone is a refcount bump; each attempt sends the same buffer.
            .body(ByteStream::from(data.clone()));
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        req.customize()
            .disable_payload_signing()
            .send()
            .await
            .map(|_| ())
            .map_err(|e| failure(key, &e))
    }

    async fn get_once(
        &self,
        full: &str,
        key: &str,
        range: Option<&Range<u64>>,
    ) -> Result<Bytes, Failure> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(full);
        if let Some(r) = range {
            // HTTP ranges are inclusive; callers guarantee start < end.
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        let out = match req.send().await {
            Ok(o) => o,
            Err(e) => {
                if let (Some(r), Some(raw)) = (range, e.raw_response()) {
                    if raw.status().as_u16() == 416 {
                        // `Content-Range: bytes */SIZE` tells the size when the server sends it.
                        let size_bytes = raw
                            .headers()
                            .get("content-range")
                            .and_then(content_range_total)
                            .unwrap_or(SIZE_UNKNOWN);
                        return Err(Failure::Fail(StoreError::InvalidRange {
                            key: key.into(),
                            start: r.start,
                            end: r.end,
                            size_bytes,
                        }));
                    }
                }
                return Err(failure(key, &e));
            }
        };
        let expected = match range {
            Some(r) => {
                // S3 answers a range that starts inside the object but ends past it with the
                // available bytes; the contract wants an error, never a short read.
                if let Some(total) = out.content_range().and_then(content_range_total) {
                    if r.end > total {
                        return Err(Failure::Fail(StoreError::InvalidRange {
                            key: key.into(),
                            start: r.start,
                            end: r.end,
                            size_bytes: total,
                        }));
                    }
                }
                r.end - r.start
            }
            None => match out.content_length().and_then(|n| u64::try_from(n).ok()) {
                Some(n) => n,
                None => {
                    return Err(Failure::Retry {
                        reason: "response has no valid Content-Length".into(),
                        ambiguous: false,
                    })
                }
            },
        };
        let body = match out.body.collect().await {
            Ok(b) => b.into_bytes(),
            Err(e) => {
                return Err(Failure::Retry {
                    reason: format!("reading body: {e}"),
                    ambiguous: false,
                })
            }
        };
        if body.len() as u64 != expected {
            return Err(Failure::Retry {
                reason: format!("body is {} bytes, expected {expected}", body.len()),
                ambiguous: false,
            });
        }
        Ok(body)
    }

    async fn delete_batch_once(&self, batch: &[(String, String)]) -> Result<(), Failure> {
        let first = batch.first().map(|(k, _)| k.as_str()).unwrap_or_default();
        let objects = batch
            .iter()
            .map(|(_, full)| ObjectIdentifier::builder().key(full).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                Failure::Fail(StoreError::Permanent {
                    key: first.into(),
                    reason: format!("building DeleteObjects request: {e}"),
                })
            })?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| {
                Failure::Fail(StoreError::Permanent {
                    key: first.into(),
                    reason: format!("building DeleteObjects request: {e}"),
                })
            })?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| match failure(first, &e) {
                // A 404 here is about the bucket, not a key.
                Failure::Fail(StoreError::NotFound { key }) => {
                    Failure::Fail(StoreError::Permanent {
                        key,
                        reason: "DeleteObjects answered 404".into(),
                    })
                }
                f => f,
            })?;
        // Per-key failures arrive inside a 200. Missing keys are fine; throttling and
        // internal errors are retried (deleting twice is harmless); anything else is final.
        let mut retry = None;
        for err in out.errors() {
            let code = err.code().unwrap_or("(no error code)");
            let key = err
                .key()
                .map(|k| {
                    k.strip_prefix(self.key_prefix.as_str())
                        .unwrap_or(k)
                        .to_string()
                })
                .unwrap_or_default();
            let reason = format!(
                "DeleteObjects: {code}: {}",
                err.message().unwrap_or("(no message)")
            );
            match code {
                "NoSuchKey" => {}
                "InternalError" | "SlowDown" | "ServiceUnavailable" | "OperationAborted" => {
                    retry = Some(format!("{key}: {reason}"));
                }
                _ => return Err(Failure::Fail(StoreError::Permanent { key, reason })),
            }
        }
        match retry {
            Some(reason) => Err(Failure::Retry {
                reason,
                ambiguous: false,
            }),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<()> {
        let full = self.full_key(key)?;
        let ambiguous = AtomicBool::new(false);
        let crc = crc32_base64(&data);
        let result = self
            .retry(key, "put", data.len() as u64, &ambiguous, || {
                self.put_once(&full, key, &data, &crc, mode)
            })
            .await;
        match result {
            Err(StoreError::PreconditionFailed { .. })
                if mode == PutMode::IfAbsent && ambiguous.load(Ordering::Relaxed) =>
            {
                // An earlier attempt may have created the object before its response was lost.
                // Identical bytes mean the outcome is the one we asked for.
                match self.get(key).await {
                    Ok(existing) if existing == data => {
                        tracing::info!(store = %self.describe(), key, "IfAbsent put: 412 after an ambiguous attempt, object holds our bytes; treating as success");
                        Ok(())
                    }
                    _ => result,
                }
            }
            other => other,
        }
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let full = self.full_key(key)?;
        let ambiguous = AtomicBool::new(false);
        // The size is unknown up front; allow the timeout for a large segment.
        self.retry(key, "get", 64 << 20, &ambiguous, || {
            self.get_once(&full, key, None)
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let full = self.full_key(key)?;
        if range.start >= range.end {
            // No HTTP range expresses an empty one; report it with the real size (or NotFound).
            let meta = self.head(key).await?;
            return Err(StoreError::InvalidRange {
                key: key.into(),
                start: range.start,
                end: range.end,
                size_bytes: meta.size_bytes,
            });
        }
        let ambiguous = AtomicBool::new(false);
        let result = self
            .retry(
                key,
                "get_range",
                range.end - range.start,
                &ambiguous,
                || self.get_once(&full, key, Some(&range)),
            )
            .await;
        match result {
            Err(StoreError::InvalidRange {
                size_bytes: SIZE_UNKNOWN,
                ..
            }) => {
                // The server did not say how big the object is; ask, so the error is useful.
                let meta = self.head(key).await?;
                Err(StoreError::InvalidRange {
                    key: key.into(),
                    start: range.start,
                    end: range.end,
                    size_bytes: meta.size_bytes,
                })
            }
            other => other,
        }
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let full = self.full_key(key)?;
        let ambiguous = AtomicBool::new(false);
        self.retry(key, "head", 0, &ambiguous, || async {
            let out = self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| failure(key, &e))?;
            match out.content_length().and_then(|n| u64::try_from(n).ok()) {
                Some(size_bytes) => Ok(ObjectMeta {
                    key: key.into(),
                    size_bytes,
                }),
                None => Err(Failure::Retry {
                    reason: "HEAD response has no valid Content-Length".into(),
                    ambiguous: false,
                }),
            }
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ListPage> {
        validate_prefix(prefix)?;
        let limit = limit.clamp(1, LIST_PAGE_MAX);
        let full_prefix = format!("{}{prefix}", self.key_prefix);
        let full_after = start_after.map(|a| format!("{}{a}", self.key_prefix));
        let ambiguous = AtomicBool::new(false);
        let (keys, truncated) = self
            .retry(prefix, "list", 0, &ambiguous, || async {
                let mut req = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .max_keys(limit as i32);
                // A cursor below the prefix excludes nothing: leave it out (some SeaweedFS
                // versions answer such a request with an empty listing).
                if let Some(a) = full_after.as_ref().filter(|a| **a >= full_prefix) {
                    req = req.start_after(a);
                }
                let out = req.send().await.map_err(|e| match failure(prefix, &e) {
                    Failure::Fail(StoreError::NotFound { key }) => {
                        Failure::Fail(StoreError::Permanent {
                            key,
                            reason: "ListObjectsV2 answered 404 (missing bucket?)".into(),
                        })
                    }
                    f => f,
                })?;
                let mut keys = Vec::with_capacity(out.contents().len());
                for obj in out.contents() {
                    let (Some(k), Some(size)) = (obj.key(), obj.size()) else {
                        return Err(Failure::Retry {
                            reason: "listing entry without key or size".into(),
                            ambiguous: false,
                        });
                    };
                    let size_bytes = u64::try_from(size).map_err(|_| Failure::Retry {
                        reason: format!("listing entry {k} with negative size {size}"),
                        ambiguous: false,
                    })?;
                    keys.push((k.to_string(), size_bytes));
                }
                Ok((keys, out.is_truncated().unwrap_or(false)))
            })
            .await?;
        // Check what the server sent before trusting it. Byte order is NOT checked: SeaweedFS
        // lists in component order (see module doc), and its own cursor still pages through
        // everything. What would break pagination is checked: keys outside the prefix, an
        // oversized page, or the cursor/duplicate keys coming back (an endless loop).
        let mut objects = Vec::with_capacity(keys.len());
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        for (k, size_bytes) in &keys {
            let bad = |what: &str| StoreError::Permanent {
                key: k.clone(),
                reason: format!("server listing violates S3 semantics: {what}"),
            };
            if !k.starts_with(&full_prefix) {
                return Err(bad("key outside the requested prefix"));
            }
            if full_after.as_deref() == Some(k.as_str()) || !seen.insert(k.as_str()) {
                return Err(bad("start_after key or a duplicate key returned"));
            }
            if objects.len() == limit {
                return Err(bad("more keys than max-keys"));
            }
            objects.push(ObjectMeta {
                key: k[self.key_prefix.len()..].to_string(),
                size_bytes: *size_bytes,
            });
        }
        let next = if truncated {
            match objects.last() {
                Some(o) => Some(o.key.clone()),
                // A truncated empty page gives no cursor to continue from; rare enough (only
                // seen with delete markers) to report rather than loop on.
                None => {
                    return Err(StoreError::Transient {
                        key: prefix.into(),
                        reason: "ListObjectsV2 returned an empty truncated page".into(),
                    })
                }
            }
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let full = self.full_key(key)?;
        let ambiguous = AtomicBool::new(false);
        let result = self
            .retry(key, "delete", 0, &ambiguous, || async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| failure(key, &e))
            })
            .await;
        match result {
            // Deleting a missing object is fine (S3 answers 204 anyway; some clones 404).
            Err(StoreError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        // Validate everything before deleting anything.
        let items = keys
            .iter()
            .map(|k| Ok((k.clone(), self.full_key(k)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        for batch in items.chunks(DELETE_BATCH_MAX) {
            let first = batch.first().map(|(k, _)| k.as_str()).unwrap_or_default();
            let ambiguous = AtomicBool::new(false);
            self.retry(first, "delete_many", 0, &ambiguous, || {
                self.delete_batch_once(batch)
            })
            .await?;
        }
        Ok(())
    }

    /// A GET costs a round trip of tens of milliseconds and a billed request; at the ~100
    /// MiB/s one stream moves, that is worth about 1 MiB of transfer (which is free within
    /// a region).
    fn request_cost_bytes(&self) -> u64 {
        1 << 20
    }

    fn hedge_puts(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "s3://{}/{}",
            self.bucket,
            self.key_prefix.trim_end_matches('/')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(classify_status(404, Some("NoSuchKey")), Class::NotFound);
        assert_eq!(classify_status(404, None), Class::NotFound);
        assert_eq!(classify_status(404, Some("NoSuchBucket")), Class::Permanent);
        assert_eq!(
            classify_status(412, Some("PreconditionFailed")),
            Class::Precondition
        );
        assert_eq!(classify_status(416, None), Class::InvalidRange);
        assert_eq!(
            classify_status(409, Some("ConditionalRequestConflict")),
            Class::Retry { ambiguous: false }
        );
        assert_eq!(
            classify_status(409, Some("BucketNotEmpty")),
            Class::Permanent
        );
        assert_eq!(
            classify_status(503, Some("SlowDown")),
            Class::Retry { ambiguous: false }
        );
        assert_eq!(
            classify_status(429, None),
            Class::Retry { ambiguous: false }
        );
        assert_eq!(classify_status(500, None), Class::Retry { ambiguous: true });
        assert_eq!(classify_status(403, Some("AccessDenied")), Class::Permanent);
        assert_eq!(
            classify_status(400, Some("InvalidArgument")),
            Class::Permanent
        );
        assert_eq!(
            classify_status(400, Some("BadDigest")),
            Class::Retry { ambiguous: false }
        );
    }

    #[test]
    fn crc32_header_values() {
        // CRC-32 of "123456789" is the standard check value 0xCBF43926.
        assert_eq!(crc32_base64(b"123456789"), "y/Q5Jg==");
        assert_eq!(crc32_base64(b""), "AAAAAA==");
        assert_eq!(crc32_base64(b"nbds3"), "hRMpZg==");
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(content_range_total("bytes 0-9/100"), Some(100));
        assert_eq!(content_range_total("bytes */42"), Some(42));
        assert_eq!(content_range_total("bytes 0-9/*"), None);
        assert_eq!(content_range_total("garbage"), None);
    }

    #[test]
    fn backoff_is_bounded() {
        for n in 1..40 {
            assert!(backoff(n) <= BACKOFF_CAP);
        }
        assert!(backoff(1) <= BACKOFF_BASE);
    }

    fn test_client(endpoint: &str, opts: &S3Options) -> Client {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "k", "s", None, None, "test",
            ))
            .endpoint_url(endpoint);
        Client::from_conf(S3Store::tune(conf, opts).build())
    }

    #[test]
    fn url_parsing_and_describe() {
        let opts = S3Options::default();
        let c = || test_client("http://127.0.0.1:1", &opts);
        let s = S3Store::with_client(c(), "bkt/some/prefix/", &opts).expect("open");
        assert_eq!(s.describe(), "s3://bkt/some/prefix");
        assert_eq!(s.full_key("a/b").expect("key"), "some/prefix/a/b");
        let s = S3Store::with_client(c(), "bkt", &opts).expect("open");
        assert_eq!(s.describe(), "s3://bkt/");
        assert_eq!(s.full_key("a").expect("key"), "a");
        assert!(S3Store::with_client(c(), "", &opts).is_err());
        assert!(S3Store::with_client(c(), "bkt/../x", &opts).is_err());
        let s =
            S3Store::with_client(c(), &format!("bkt/{}", "p".repeat(1000)), &opts).expect("open");
        assert!(matches!(
            s.full_key(&"k".repeat(100)),
            Err(StoreError::InvalidKey { .. })
        ));
    }

    /// A one-shot HTTP server: answers each connection with the next canned response.
    async fn fake_server(responses: Vec<String>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for resp in responses {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                // Read the request head (and any small body) before answering.
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        format!("http://{addr}")
    }

    fn fast_opts() -> S3Options {
        S3Options {
            path_style: true,
            attempt_timeout: Duration::from_secs(2),
            retry_max_elapsed: Duration::from_secs(5),
            retry_attempts_max: 4,
            ..S3Options::default()
        }
    }

    /// An HTTP response with a correct Content-Length unless `declared_len` overrides it.
    fn resp(status: &str, body: &str, declared_len: Option<usize>) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            declared_len.unwrap_or(body.len())
        )
    }
    fn ok_body() -> String {
        resp("200 OK", "hello", None)
    }
    fn short_body() -> String {
        resp("200 OK", "hello", Some(10))
    }
    fn slow_down() -> String {
        resp(
            "503 Slow Down",
            "<Error><Code>SlowDown</Code><Message>slow down</Message></Error>",
            None,
        )
    }
    fn precondition() -> String {
        resp(
            "412 Precondition Failed",
            "<Error><Code>PreconditionFailed</Code><Message>exists</Message></Error>",
            None,
        )
    }

    #[tokio::test]
    async fn retries_throttling_then_succeeds() {
        let opts = fast_opts();
        let ep = fake_server(vec![slow_down(), slow_down(), ok_body()]).await;
        let s = S3Store::with_client(test_client(&ep, &opts), "b/p", &opts).expect("open");
        assert_eq!(&s.get("k").await.expect("get after retries")[..], b"hello");
    }

    #[tokio::test]
    async fn short_body_is_transient_never_data() {
        let opts = fast_opts();
        let ep = fake_server(vec![short_body(); 4]).await;
        let s = S3Store::with_client(test_client(&ep, &opts), "b", &opts).expect("open");
        let err = s.get("k").await.expect_err("short body");
        assert!(matches!(err, StoreError::Transient { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn precondition_failed_maps() {
        let opts = fast_opts();
        let ep = fake_server(vec![precondition()]).await;
        let s = S3Store::with_client(test_client(&ep, &opts), "b", &opts).expect("open");
        let err = s
            .put("k", Bytes::from_static(b"x"), PutMode::IfAbsent)
            .await
            .expect_err("412");
        assert!(err.is_precondition_failed(), "{err:?}");
    }

    fn internal_error() -> String {
        resp(
            "500 Internal Server Error",
            "<Error><Code>InternalError</Code><Message>oops</Message></Error>",
            None,
        )
    }

    #[tokio::test]
    async fn if_absent_412_after_ambiguous_attempt_checks_the_bytes() {
        let opts = fast_opts();
        // 500 (may have been applied) → retry gets 412 → read back: our bytes → success.
        let ep = fake_server(vec![internal_error(), precondition(), ok_body()]).await;
        let s = S3Store::with_client(test_client(&ep, &opts), "b", &opts).expect("open");
        s.put("k", Bytes::from_static(b"hello"), PutMode::IfAbsent)
            .await
            .expect("our own earlier attempt landed");
        // Same, but someone else's bytes are there: the 412 stands.
        let ep = fake_server(vec![internal_error(), precondition(), ok_body()]).await;
        let s = S3Store::with_client(test_client(&ep, &opts), "b", &opts).expect("open");
        let err = s
            .put("k", Bytes::from_static(b"other"), PutMode::IfAbsent)
            .await
            .expect_err("another writer won");
        assert!(err.is_precondition_failed(), "{err:?}");
    }

    /// A store whose endpoint no one listens on: every attempt is a refused connection.
    fn store_at_a_dead_endpoint(opts: &S3Options) -> S3Store {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let ep = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        S3Store::with_client(test_client(&ep, opts), "b", opts).expect("open")
    }

    #[tokio::test]
    async fn retries_use_the_whole_window() {
        let opts = S3Options {
            retry_max_elapsed: Duration::from_millis(1500),
            retry_attempts_max: 1000,
            ..fast_opts()
        };
        let s = store_at_a_dead_endpoint(&opts);
        let started = Instant::now();
        let err = s.head("k").await.expect_err("no server");
        let took = started.elapsed();
        // Refused connections fail at once: only the window ends the retries, and the last
        // attempt starts at its end, not a backoff step before it.
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
            "{took:?}: {err:?}"
        );
        assert!(matches!(err, StoreError::Transient { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn retry_budget_is_bounded() {
        let opts = S3Options {
            retry_attempts_max: 3,
            ..fast_opts()
        };
        let s = store_at_a_dead_endpoint(&opts);
        let started = Instant::now();
        let err = s.head("k").await.expect_err("no server");
        assert!(
            matches!(&err, StoreError::Transient { reason, .. } if reason.contains("3 attempts")),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
