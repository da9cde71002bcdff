//! Reading a snapshot bucket (a JetStream object store) with direct gets only: its
//! entries (`list`) and one object's bytes (`open`), checked against the object's size
//! and SHA-256 digest as the object store's own reader checks them.
//!
//! Why not the object store's reader: it creates an ordered push consumer per read
//! (`$JS.API.CONSUMER.CREATE.<bucket>`), and recreating one after a lost delivery is a
//! consumer delete and a create by name. Granting those on another node's bucket lets a
//! node delete or update any consumer there whose name it knows (an operator's durable
//! reader) and hold the bucket's consumers; the create request's body is beyond any
//! permission. A direct get changes nothing and leaves nothing behind, so in the secure
//! deployment a node has no consumer right on any snapshot bucket (deploy/secure/README.md).
//! Each chunk is one request (`next_by_subj` on the object's chunk subject), so a read is
//! as many round trips as the object has chunks (128 KiB each).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::jetstream::object_store::ObjectInfo;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, ReadBuf};

use super::jetstream;

/// Most entries one listing reads from a bucket: a bound on its requests.
const MAX_ENTRIES: usize = 100_000;

/// The object store's metadata subject of `name` in `bucket` (`$O.<bucket>.M.<name in
/// base64url, padded>`, as async-nats writes it).
fn meta_subject(bucket: &str, name: &str) -> String {
    format!("$O.{bucket}.M.{}", base64url(name.as_bytes()))
}

/// Base64 with the URL-safe alphabet and padding (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bucket's stream (`OBJ_<bucket>`): one STREAM.INFO.
async fn stream_of(js: &jetstream::Context, bucket: &str) -> Result<Stream, String> {
    js.get_stream(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| e.to_string())
}

/// Every entry of `bucket` in stream order, deleted ones included: each an object info,
/// or why that entry's metadata does not parse (`Err` for the whole listing only when
/// the bucket cannot be read). Metadata subjects are rolled up by the object store, so
/// each entry is its object's latest.
pub(super) async fn list(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<Vec<Result<ObjectInfo, String>>, String> {
    let stream = stream_of(js, bucket).await?;
    let subject = format!("$O.{bucket}.M.>");
    let mut out = Vec::new();
    let mut seq = 1;
    while out.len() < MAX_ENTRIES {
        match stream
            .direct_get_next_for_subject(subject.clone(), Some(seq))
            .await
        {
            Ok(m) => {
                seq = m.sequence + 1;
                out.push(
                    serde_json::from_slice::<ObjectInfo>(&m.payload)
                        .map_err(|e| format!("entry at sequence {}: {e}", m.sequence)),
                );
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(format!("listing: {e}")),
        }
    }
    Err(format!("more than {MAX_ENTRIES} entries"))
}

/// Opens object `name` of `bucket` for reading; `None` if the bucket has no such object
/// (or only a deleted one).
pub(super) async fn open(
    js: &jetstream::Context,
    bucket: &str,
    name: &str,
) -> Result<Option<DirectObject>, String> {
    let stream = stream_of(js, bucket).await?;
    let info = match stream
        .direct_get_last_for_subject(meta_subject(bucket, name))
        .await
    {
        Ok(m) => serde_json::from_slice::<ObjectInfo>(&m.payload)
            .map_err(|e| format!("object {name:?}: its info: {e}"))?,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("object {name:?}: {e}")),
    };
    if info.deleted {
        return Ok(None);
    }
    Ok(Some(DirectObject {
        stream,
        subject: format!("$O.{bucket}.C.{}", info.nuid),
        next_seq: 1,
        chunks_left: info.chunks,
        size: info.size as u64,
        read: 0,
        digest: info.digest.clone(),
        hash: ring::digest::Context::new(&ring::digest::SHA256),
        buf: Bytes::new(),
        pending: None,
        done: false,
        info,
    }))
}

type Chunk = Result<(u64, Bytes), io::Error>;

/// An object's bytes, chunk by chunk, each a direct get; the end checks the size and the
/// SHA-256 digest the object's info records (an error if either differs).
pub(super) struct DirectObject {
    stream: Stream,
    subject: String,
    next_seq: u64,
    chunks_left: usize,
    size: u64,
    read: u64,
    digest: Option<String>,
    hash: ring::digest::Context,
    buf: Bytes,
    pending: Option<BoxFuture<'static, Chunk>>,
    done: bool,
    /// The object's info.
    pub(super) info: ObjectInfo,
}

impl DirectObject {
    /// The checks at the end: every byte the info promises, and its digest.
    fn finish(&mut self) -> io::Result<()> {
        if self.read != self.size {
            return Err(io::Error::other(format!(
                "object {:?}: {} bytes read, its info says {}",
                self.info.name, self.read, self.size
            )));
        }
        let hash = std::mem::replace(
            &mut self.hash,
            ring::digest::Context::new(&ring::digest::SHA256),
        )
        .finish();
        let got = format!("SHA-256={}", base64url(hash.as_ref()));
        match &self.digest {
            Some(want) if *want == got => Ok(()),
            Some(want) => Err(io::Error::other(format!(
                "object {:?}: wrong digest ({got}, its info says {want})",
                self.info.name
            ))),
            None => Err(io::Error::other(format!(
                "object {:?}: its info has no digest",
                self.info.name
            ))),
        }
    }
}

impl AsyncRead for DirectObject {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            if this.chunks_left == 0 {
                this.done = true;
                return Poll::Ready(this.finish());
            }
            let pending = this.pending.get_or_insert_with(|| {
                let (stream, subject, seq) =
                    (this.stream.clone(), this.subject.clone(), this.next_seq);
                Box::pin(async move {
                    stream
                        .direct_get_next_for_subject(subject, Some(seq))
                        .await
                        .map(|m| (m.sequence, m.payload))
                        .map_err(|e| {
                            let kind = match e.kind() {
                                DirectGetErrorKind::TimedOut => io::ErrorKind::TimedOut,
                                DirectGetErrorKind::NotFound => io::ErrorKind::UnexpectedEof,
                                _ => io::ErrorKind::Other,
                            };
                            io::Error::new(kind, format!("chunk after sequence {seq}: {e}"))
                        })
                })
            });
            let (seq, chunk) = match pending.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    this.pending = None;
                    r?
                }
            };
            this.next_seq = seq + 1;
            this.chunks_left -= 1;
            this.read += chunk.len() as u64;
            if this.read > this.size {
                this.done = true;
                return Poll::Ready(Err(io::Error::other(format!(
                    "object {:?}: more bytes than its info's {}",
                    this.info.name, this.size
                ))));
            }
            this.hash.update(&chunk);
            this.buf = chunk;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_pads_as_the_object_store_does() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg==");
        assert_eq!(base64url(b"fo"), "Zm8=");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8=");
        assert_eq!(meta_subject("B", "berlin.1"), "$O.B.M.YmVybGluLjE=");
    }
}
