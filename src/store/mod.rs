//! The image store: manifests, chunks and names in a local directory, on an
//! HTTP(S) server or in an S3 bucket, through `object_store`. Layout:
//! `manifests/<image id>`, `chunks/<digest>`, `names/<name>` (holds an id),
//! `profiles/<image id>`. Everything read from a store is verified before use.

mod copies;
mod import;
pub mod manifest;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use copies::ManifestCopies;
pub use import::{import, ImportReport};
pub use manifest::{verify_chunk, verify_plain, ChunkEntry, ChunkIdx, Digest, Manifest};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// Longest a single store request may take before it is abandoned.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest manifest read from a store. A manifest's JSON takes about 90
/// bytes per stored chunk: 256 MiB holds about 2.9 million stored chunks,
/// 700 GiB of non-zero data at the default 256 KiB chunk size (all-zero
/// chunks cost 5 bytes each). A body read from a store is held in memory
/// whole, so every read has a cap and stops as soon as a body passes it.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Largest boot profile read from a store: a profile lists each chunk index
/// at most once, at most 11 bytes each, so 64 MiB is room for 6 million.
pub const MAX_PROFILE_BYTES: u64 = 64 << 20;
/// Largest name object (an image id and a newline).
pub const MAX_NAME_BYTES: u64 = 1024;

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
    #[error("read {key} from the store: larger than its cap of {cap} bytes")]
    TooLarge { key: String, cap: u64 },
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
    #[error("image {0}: manifest digest does not match its id (corrupt copy?)")]
    ManifestDigest(String),
    #[error("read the manifest copy {0}")]
    ReadCopy(std::path::PathBuf, #[source] std::io::Error),
    #[error("write the manifest copy {0}")]
    WriteCopy(std::path::PathBuf, #[source] std::io::Error),
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
        Self::open_via(location, create, None)
    }

    /// Opens `location` as [`open`](Self::open) does; an http(s):// or
    /// s3:// store's requests go through HTTP proxy `proxy`, if given.
    pub fn open_via(location: &str, create: bool, proxy: Option<&str>) -> Result<Self, Error> {
        let bad = |why: &str| Error::Location(location.to_string(), why.to_string());
        let mut client = ClientOptions::new()
            .with_allow_http(true)
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(5));
        if let Some(proxy) = proxy {
            client = client.with_proxy_url(proxy);
        }
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

    /// Reads the object at `key`, at most `cap` bytes of it: a larger body
    /// is an error, and its reading stops as soon as it passes the cap.
    async fn get(&self, key: &str, cap: u64) -> Result<Bytes, Error> {
        let get_err = |e| match e {
            object_store::Error::NotFound { .. } => Error::NotFound(key.to_string()),
            e => Error::Get(key.to_string(), e),
        };
        let too_large = || Error::TooLarge {
            key: key.to_string(),
            cap,
        };
        let r = self.inner.get(&ObjPath::from(key)).await.map_err(get_err)?;
        // The size the store announces (a file's length, an HTTP
        // Content-Length) refuses most oversized bodies before any is read.
        if r.meta.size > cap {
            return Err(too_large());
        }
        if matches!(r.payload, GetResultPayload::File(..)) {
            // A local file is read for the announced length and no further.
            return r.bytes().await.map_err(get_err);
        }
        // A server can send more than it announced: count as it comes.
        let announced = r.meta.size;
        collect_capped(r.into_stream(), announced, cap)
            .await
            .map_err(|e| match e {
                Capped::Over => too_large(),
                Capped::Read(e) => get_err(e),
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
        let id = self.resolve(image).await?;
        let (m, _) = self.manifest_of(image, &id).await?;
        Ok((id, m))
    }

    /// The id of `image`: itself if it is one (64 hex digits), else the id
    /// its name holds in the store.
    pub async fn resolve(&self, image: &str) -> Result<ImageId, Error> {
        if let Some(id) = Digest::from_hex(image) {
            return Ok(id);
        }
        check_name(image)?;
        let bytes = self
            .get(&format!("names/{image}"), MAX_NAME_BYTES)
            .await
            .map_err(|e| no_image(image, e))?;
        let text = String::from_utf8_lossy(&bytes);
        Digest::from_hex(text.trim()).ok_or_else(|| Error::NoImage(image.to_string()))
    }

    /// Image `id`'s manifest (`image` names it in errors), checked by
    /// [`check_manifest`], and the bytes it was read from.
    pub async fn manifest_of(&self, image: &str, id: &ImageId) -> Result<(Manifest, Bytes), Error> {
        let bytes = self
            .get(&format!("manifests/{id}"), MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| no_image(image, e))?;
        let m = check_manifest(image, id, &bytes)?;
        Ok((m, bytes))
    }

    /// A chunk's stored bytes, unverified (see [`verify_chunk`]); a body
    /// longer than the entry's stored length is refused unread.
    pub async fn chunk(&self, entry: &ChunkEntry) -> Result<Bytes, Error> {
        self.get(&format!("chunks/{}", entry.digest), u64::from(entry.stored_len))
            .await
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
        match self.get(&format!("profiles/{id}"), MAX_PROFILE_BYTES).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn put_profile(&self, id: &ImageId, profile: Bytes) -> Result<(), Error> {
        self.put(&format!("profiles/{id}"), profile).await
    }
}

/// A missing name or manifest means no such image.
fn no_image(image: &str, e: Error) -> Error {
    match e {
        Error::NotFound(_) => Error::NoImage(image.to_string()),
        e => e,
    }
}

/// Checks manifest bytes said to be image `id`'s, wherever they came from
/// (the store, a peer, this host's copy): they must hash to the id, and
/// parse and validate. `image` names the image in errors.
pub fn check_manifest(image: &str, id: &ImageId, bytes: &[u8]) -> Result<Manifest, Error> {
    if Digest::of(bytes) != *id {
        return Err(Error::ManifestDigest(image.to_string()));
    }
    Manifest::parse(bytes).map_err(|source| Error::BadManifest {
        image: image.to_string(),
        source,
    })
}

enum Capped {
    Over,
    Read(object_store::Error),
}

/// Collects a body of `announced` bytes, failing as soon as it passes `cap`
/// (the rest is never pulled from the stream).
async fn collect_capped(
    mut stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    announced: u64,
    cap: u64,
) -> Result<Bytes, Capped> {
    use futures::StreamExt;
    let mut buf = bytes::BytesMut::with_capacity(announced.min(cap) as usize);
    while let Some(part) = stream.next().await {
        let part = part.map_err(Capped::Read)?;
        if (buf.len() + part.len()) as u64 > cap {
            return Err(Capped::Over);
        }
        buf.extend_from_slice(&part);
    }
    Ok(buf.freeze())
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(Error::BadName(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use super::*;

    fn entry(digest: Digest, stored_len: u32) -> ChunkEntry {
        ChunkEntry {
            digest,
            stored_len,
            zstd: true,
        }
    }

    #[tokio::test]
    async fn a_chunk_file_longer_than_its_stored_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().to_str().unwrap(), false).unwrap();
        let d = Digest::of(b"x");
        store.put_chunk(&d, Bytes::from(vec![7u8; 1000])).await.unwrap();
        assert_eq!(store.chunk(&entry(d, 1000)).await.unwrap().len(), 1000);
        let e = store.chunk(&entry(d, 999)).await.unwrap_err();
        assert!(matches!(e, Error::TooLarge { cap: 999, .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("chunks/{d}")) && msg.contains("999 bytes"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn an_oversized_manifest_or_profile_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().to_str().unwrap(), false).unwrap();
        let id = Digest::of(b"huge");
        // Sparse files: nothing is written, and nothing must be read.
        for (sub, len) in [
            ("manifests", MAX_MANIFEST_BYTES + 1),
            ("profiles", MAX_PROFILE_BYTES + 1),
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            std::fs::File::create(dir.path().join(sub).join(id.to_hex()))
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        let e = store.manifest(&id.to_hex()).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLarge {
                    cap: MAX_MANIFEST_BYTES,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("manifests/{id}")), "{e}");
        let e = store.profile(&id).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::TooLarge {
                    cap: MAX_PROFILE_BYTES,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::create_dir_all(dir.path().join("names")).unwrap();
        std::fs::write(dir.path().join("names/big"), vec![b'a'; MAX_NAME_BYTES as usize + 1]).unwrap();
        let e = store.manifest("big").await.unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_body_longer_than_announced_stops_at_the_cap() {
        // A server that announced 10 bytes and then never stops sending.
        let pulled = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let p = pulled.clone();
        let endless = futures::stream::repeat_with(move || {
            p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Bytes::from(vec![0u8; 4096]))
        });
        let r = collect_capped(Box::pin(endless), 10, 100_000).await;
        assert!(matches!(r, Err(Capped::Over)));
        // 24 parts fit under the cap; the 25th passes it; no more are pulled.
        assert_eq!(pulled.load(std::sync::atomic::Ordering::Relaxed), 25);
        let exact = futures::stream::iter([Ok(Bytes::from_static(b"abc")), Ok(Bytes::from_static(b"de"))]);
        assert_eq!(&collect_capped(Box::pin(exact), 5, 5).await.ok().unwrap()[..], b"abcde");
    }

    #[tokio::test]
    async fn an_http_store_sending_an_endless_chunk_is_cut_off_at_the_cap() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (sent_tx, sent_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && !line.ends_with("\r\n\r\n") {}
            let mut out = conn;
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\
                        Last-Modified: Mon, 02 Nov 2026 10:00:00 GMT\r\nETag: \"1\"\r\n\r\n";
            let mut sent = 0u64;
            if out.write_all(head.as_bytes()).is_ok() {
                let block = vec![0u8; 65536];
                // Until the client hangs up (or far past any sane cap).
                while sent < (4 << 30) && out.write_all(&block).is_ok() {
                    sent += block.len() as u64;
                }
            }
            sent_tx.send(sent).unwrap();
        });
        let store = ImageStore::open(&url, false).unwrap();
        let e = store.chunk(&entry(Digest::of(b"c"), 65536)).await.unwrap_err();
        assert!(matches!(e, Error::TooLarge { cap: 65536, .. }), "{e}");
        // Wait off the runtime: the client's connection task must run to hang up.
        let sent = tokio::task::spawn_blocking(move || sent_rx.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("the client never hung up");
        // What the sockets' buffers took before the client hung up.
        assert!(sent < 32 << 20, "the server sent {sent} bytes");
    }
}
