//! A peer connection's limits below HTTP: who may connect and how often
//! (members only, a few connections each), and a write that makes no
//! progress for a while fails the connection, so a peer that stops reading
//! frees the upload slot its answer holds instead of keeping it for the
//! connection's lifetime.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Open connections per peer address: up to `per_member` for each member
/// at the address (several daemons may share one, as on 127.0.0.1 in
/// tests), and none from an address no member has, once the membership is
/// known (not empty). A member that connects from another address than the
/// one it listens on is refused: the peer list must name hosts by the
/// address they reach their peers from.
pub struct ConnLimits {
    per_member: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was closed at accept.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Stranger,
    TooMany,
}

/// An open connection, counted until dropped.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(per_member: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            per_member: per_member.max(1),
            open: Mutex::default(),
        })
    }

    /// Counts a connection from `ip`, if `members` allow it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, members: &[SocketAddr]) -> Result<ConnGuard, Refused> {
        let ip = ip.to_canonical();
        let there = members.iter().filter(|m| m.ip().to_canonical() == ip).count();
        if there == 0 && !members.is_empty() {
            return Err(Refused::Stranger);
        }
        let mut open = super::lock(&self.open);
        let n = open.entry(ip).or_default();
        if *n >= self.per_member * there.max(1) {
            return Err(Refused::TooMany);
        }
        *n += 1;
        Ok(ConnGuard {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = super::lock(&self.limits.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A stream whose writes fail after `limit` without progress.
pub struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write waits; when it fires, the write fails.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes on a write's outcome; a write still waiting after `limit` fails.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connections_are_capped_per_member_at_an_address_and_strangers_refused() {
        let limits = ConnLimits::new(2);
        let members = [addr("10.0.0.1:7000"), addr("127.0.0.1:7001"), addr("127.0.0.1:7002")];
        let (one, lo) = (addr("10.0.0.1:1").ip(), addr("127.0.0.1:1").ip());
        assert_eq!(
            limits.admit(addr("10.0.0.9:1").ip(), &members).err(),
            Some(Refused::Stranger)
        );
        let held: Vec<ConnGuard> = (0..2).map(|_| limits.admit(one, &members).unwrap()).collect();
        assert_eq!(limits.admit(one, &members).err(), Some(Refused::TooMany));
        // Two members share 127.0.0.1: twice the connections.
        let shared: Vec<ConnGuard> = (0..4).map(|_| limits.admit(lo, &members).unwrap()).collect();
        assert_eq!(limits.admit(lo, &members).err(), Some(Refused::TooMany));
        drop(held);
        assert!(limits.admit(one, &members).is_ok(), "a closed connection still counted");
        // An IPv4 peer on an IPv6 socket is the same address.
        let mapped = addr("[::ffff:127.0.0.1]:1").ip();
        assert_eq!(limits.admit(mapped, &members).err(), Some(Refused::TooMany));
        drop(shared);
        // No membership known: anyone, at the per-member cap.
        assert!(limits.admit(addr("10.0.0.9:1").ip(), &[]).is_ok());
    }
}
