//! The image store: manifests, chunks and names in a local directory, on an
//! HTTP(S) server or in an S3 bucket, through `object_store`. Layout:
//! `manifests/<image id>`, `chunks/<digest>`, `names/<name>` (holds an id),
//! `profiles/<image id>`. Everything read from a store is verified before use.

mod import;
pub mod manifest;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use import::{import, ImportReport};
pub use manifest::{verify_chunk, ChunkEntry, ChunkIdx, Digest, Manifest};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// Longest a single store request may take before it is abandoned.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store location {0:?}: {1}")]
    Location(String, String),
    #[error("open store {0}")]
    Open(String, #[source] object_store::Error),
    #[error("{0} not found in the store")]
    NotFound(String),
    #[error("read {0} from the store")]
    Get(String, #[source] object_store::Error),
    #[error("write {0} to the store")]
    Put(String, #[source] object_store::Error),
    #[error("image {0:?}: no such name or id in the store")]
    NoImage(String),
    #[error("image {image}: {source}")]
    BadManifest {
        image: String,
        #[source]
        source: manifest::Error,
    },
    #[error("image {0}: manifest digest does not match its id (corrupt store?)")]
    ManifestDigest(String),
    #[error("invalid image name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }
}

/// An image id: the digest of its manifest.
pub type ImageId = Digest;

#[derive(Clone, Debug)]
pub struct ImageStore {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

impl ImageStore {
    /// Opens `location`: a directory path or `file://` URL, an `http(s)://`
    /// URL, or `s3://bucket/prefix` (credentials and region from the usual
    /// AWS environment variables). `create` makes a missing directory.
    pub fn open(location: &str, create: bool) -> Result<Self, Error> {
        let bad = |why: &str| Error::Location(location.to_string(), why.to_string());
        let client = ClientOptions::new()
            .with_allow_http(true)
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(5));
        // The fetch scheduler retries with its own deadlines and failover.
        let retry = RetryConfig {
            max_retries: 0,
            ..Default::default()
        };
        let inner: Arc<dyn ObjectStore> = if location.starts_with("http://") || location.starts_with("https://") {
            Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(location.trim_end_matches('/'))
                    .with_client_options(client)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| Error::Open(location.to_string(), e))?,
            )
        } else if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(client)
                .with_retry(retry)
                .build()
                .map_err(|e| Error::Open(location.to_string(), e))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else {
            let dir = location.strip_prefix("file://").unwrap_or(location);
            if dir.is_empty() {
                return Err(bad("empty path"));
            }
            if create {
                std::fs::create_dir_all(dir).map_err(|e| bad(&e.to_string()))?;
            }
            if !std::path::Path::new(dir).is_dir() {
                return Err(bad("not a directory"));
            }
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| Error::Open(location.to_string(), e))?,
            )
        };
        Ok(ImageStore {
            inner,
            url: location.to_string(),
        })
    }

    /// A store over any `object_store` backend (tests use the in-memory one).
    pub fn with_backend(inner: Arc<dyn ObjectStore>, url: &str) -> Self {
        ImageStore {
            inner,
            url: url.to_string(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn get(&self, key: &str) -> Result<Bytes, Error> {
        let path = ObjPath::from(key);
        let res = self.inner.get(&path).await;
        let res = match res {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        res.map_err(|e| match e {
            object_store::Error::NotFound { .. } => Error::NotFound(key.to_string()),
            e => Error::Get(key.to_string(), e),
        })
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), Error> {
        self.inner
            .put(&ObjPath::from(key), PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| Error::Put(key.to_string(), e))
    }

    async fn exists(&self, key: &str) -> Result<bool, Error> {
        match self.inner.head(&ObjPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::Get(key.to_string(), e)),
        }
    }

    /// Resolves a name or an image id, and fetches and checks its manifest.
    pub async fn manifest(&self, image: &str) -> Result<(ImageId, Manifest), Error> {
        let id = match Digest::from_hex(image) {
            Some(id) => id,
            None => {
                check_name(image)?;
                let bytes = self.get(&format!("names/{image}")).await.map_err(|e| match e {
                    Error::NotFound(_) => Error::NoImage(image.to_string()),
                    e => e,
                })?;
                let text = String::from_utf8_lossy(&bytes);
                Digest::from_hex(text.trim()).ok_or_else(|| Error::NoImage(image.to_string()))?
            }
        };
        let bytes = self.get(&format!("manifests/{id}")).await.map_err(|e| match e {
            Error::NotFound(_) => Error::NoImage(image.to_string()),
            e => e,
        })?;
        if Digest::of(&bytes) != id {
            return Err(Error::ManifestDigest(image.to_string()));
        }
        let m = Manifest::parse(&bytes).map_err(|source| Error::BadManifest {
            image: image.to_string(),
            source,
        })?;
        Ok((id, m))
    }

    /// A chunk's stored bytes, unverified (see [`verify_chunk`]).
    pub async fn chunk(&self, digest: &Digest) -> Result<Bytes, Error> {
        self.get(&format!("chunks/{digest}")).await
    }

    pub async fn has_chunk(&self, digest: &Digest) -> Result<bool, Error> {
        self.exists(&format!("chunks/{digest}")).await
    }

    pub async fn put_chunk(&self, digest: &Digest, stored: Bytes) -> Result<(), Error> {
        self.put(&format!("chunks/{digest}"), stored).await
    }

    /// Stores a manifest (if new) and returns the image id.
    pub async fn put_manifest(&self, m: &Manifest) -> Result<(ImageId, bool), Error> {
        let bytes = m.to_bytes();
        let id = Digest::of(&bytes);
        let key = format!("manifests/{id}");
        if self.exists(&key).await? {
            return Ok((id, false));
        }
        self.put(&key, Bytes::from(bytes)).await?;
        Ok((id, true))
    }

    pub async fn put_name(&self, name: &str, id: &ImageId) -> Result<(), Error> {
        check_name(name)?;
        self.put(&format!("names/{name}"), Bytes::from(format!("{id}\n"))).await
    }

    /// The boot profile stored with an image, if any.
    pub async fn profile(&self, id: &ImageId) -> Result<Option<Bytes>, Error> {
        match self.get(&format!("profiles/{id}")).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn put_profile(&self, id: &ImageId, profile: Bytes) -> Result<(), Error> {
        self.put(&format!("profiles/{id}"), profile).await
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(Error::BadName(name.to_string()));
    }
    Ok(())
}
