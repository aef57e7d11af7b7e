//! The image manifest: size, chunk size, and per chunk its digest, stored
//! length and compression; all-zero chunks are marked and never fetched.
//! Manifests come from the store and are untrusted: `parse` checks every
//! field, and the image id is the blake3 digest of the manifest's bytes.

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
pub const MIN_CHUNK: u32 = 64 << 10;
pub const MAX_CHUNK: u32 = 4 << 20;
pub const DEFAULT_CHUNK: u32 = 256 << 10;

/// Index of a chunk of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIdx(pub u32);

/// A blake3 digest, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Digest(*h.as_bytes()))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad digest"))
    }
}

/// How a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// blake3 of the chunk's (uncompressed) bytes; also its name in the store.
    #[serde(rename = "d")]
    pub digest: Digest,
    /// Bytes in the store.
    #[serde(rename = "n")]
    pub stored_len: u32,
    /// zstd-compressed in the store.
    #[serde(rename = "z")]
    pub zstd: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub size: u64,
    pub chunk_size: u32,
    /// One per chunk; `None` for an all-zero chunk.
    pub chunks: Vec<Option<ChunkEntry>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest does not parse")]
    Parse(#[source] serde_json::Error),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(Error::Parse)?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::Invalid(why));
        if self.version != VERSION {
            return bad(format!("version {} (this build reads {VERSION})", self.version));
        }
        if !self.chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) {
            return bad(format!("chunk size {}", self.chunk_size));
        }
        if self.size == 0 || !self.size.is_multiple_of(512) {
            return bad(format!("image size {} is not a positive multiple of 512", self.size));
        }
        if self.chunks.len() as u64 != self.size.div_ceil(self.chunk_size as u64) {
            return bad(format!("{} chunks for {} bytes", self.chunks.len(), self.size));
        }
        let limit = zstd::zstd_safe::compress_bound(self.chunk_size as usize) as u32;
        for (i, c) in self.chunks.iter().enumerate() {
            if let Some(c) = c {
                let len = self.chunk_len(ChunkIdx(i as u32));
                if c.stored_len == 0 || c.stored_len > limit || (!c.zstd && c.stored_len as u64 != len) {
                    return bad(format!("chunk {i}: stored length {}", c.stored_len));
                }
            }
        }
        Ok(())
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    pub fn chunk_offset(&self, c: ChunkIdx) -> u64 {
        c.0 as u64 * self.chunk_size as u64
    }

    /// Bytes of chunk `c` (the last one may be short).
    pub fn chunk_len(&self, c: ChunkIdx) -> u64 {
        (self.size - self.chunk_offset(c)).min(self.chunk_size as u64)
    }

    /// The chunks covering `offset..offset+len`.
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.chunk_size as u64;
        let last = (offset + len - 1) / self.chunk_size as u64;
        first as u32..(last as u32 + 1).min(self.chunk_count())
    }

    /// Bytes the store holds for this image, each distinct chunk once.
    pub fn stored_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .flatten()
            .filter(|c| seen.insert(c.digest))
            .map(|c| c.stored_len as u64)
            .sum()
    }

    pub fn zero_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_none()).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("stored length {got}, manifest says {want}")]
    Length { got: usize, want: u32 },
    #[error("does not decompress")]
    Decompress(#[source] std::io::Error),
    #[error("decompresses to {got} bytes, expected {want}")]
    Size { got: usize, want: u64 },
    #[error("digest mismatch")]
    Digest,
}

/// Checks a chunk as fetched against its manifest entry and returns its
/// bytes. Nothing that fails here may reach a guest.
pub fn verify_chunk(entry: &ChunkEntry, len: u64, stored: &[u8]) -> Result<Vec<u8>, ChunkError> {
    if stored.len() != entry.stored_len as usize {
        return Err(ChunkError::Length {
            got: stored.len(),
            want: entry.stored_len,
        });
    }
    let data = if entry.zstd {
        // The capacity bounds what a hostile frame can make us allocate.
        zstd::bulk::decompress(stored, len as usize).map_err(ChunkError::Decompress)?
    } else {
        stored.to_vec()
    };
    verify_plain(entry, len, &data)?;
    Ok(data)
}

/// Checks a chunk's plaintext (as a peer sends it) against its manifest
/// entry: its length and its digest. Nothing that fails here may reach a guest.
pub fn verify_plain(entry: &ChunkEntry, len: u64, data: &[u8]) -> Result<(), ChunkError> {
    if data.len() as u64 != len {
        return Err(ChunkError::Size {
            got: data.len(),
            want: len,
        });
    }
    if Digest::of(data) != entry.digest {
        return Err(ChunkError::Digest);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let data = vec![7u8; 65536];
        Manifest {
            version: 1,
            size: 3 * 65536 - 512,
            chunk_size: 65536,
            chunks: vec![
                Some(ChunkEntry {
                    digest: Digest::of(&data),
                    stored_len: 65536,
                    zstd: false,
                }),
                None,
                Some(ChunkEntry {
                    digest: Digest::of(&data[..65024]),
                    stored_len: 65024,
                    zstd: false,
                }),
            ],
        }
    }

    #[test]
    fn manifest_round_trips_and_maps_offsets_to_chunks() {
        let m = manifest();
        let back = Manifest::parse(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.chunks_of(0, 512), 0..1);
        assert_eq!(m.chunks_of(65535, 2), 0..2);
        assert_eq!(m.chunks_of(131072, 65024), 2..3);
        assert_eq!(m.chunk_len(ChunkIdx(2)), 65024);
        assert_eq!(m.zero_chunks(), 1);
    }

    #[test]
    fn invalid_manifests_are_refused() {
        let mut m = manifest();
        m.chunks.pop();
        assert!(Manifest::parse(&m.to_bytes()).is_err());
        let mut m = manifest();
        m.chunk_size = 1000;
        assert!(Manifest::parse(&m.to_bytes()).is_err());
        let mut m = manifest();
        m.chunks[0].as_mut().unwrap().stored_len = 5;
        assert!(Manifest::parse(&m.to_bytes()).is_err());
        assert!(Manifest::parse(b"{not json").is_err());
        assert!(Manifest::parse(b"{\"version\":1}").is_err());
    }

    #[test]
    fn corrupt_truncated_and_bombing_chunks_fail_verification() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let entry = ChunkEntry {
            digest: Digest::of(&data),
            stored_len: z.len() as u32,
            zstd: true,
        };
        assert_eq!(verify_chunk(&entry, 65536, &z).unwrap(), data);
        let mut bad = z.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xff;
        assert!(verify_chunk(&entry, 65536, &bad).is_err());
        assert!(matches!(
            verify_chunk(&entry, 65536, &z[..n - 1]),
            Err(ChunkError::Length { .. })
        ));
        // A frame that inflates past the chunk size is refused, not allocated.
        let big = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        let bomb = ChunkEntry {
            stored_len: big.len() as u32,
            ..entry
        };
        assert!(verify_chunk(&bomb, 65536, &big).is_err());
    }
}
