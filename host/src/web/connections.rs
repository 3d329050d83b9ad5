//! The server's connections, bounded before any request is read: at most
//! [`MAX_CONNECTIONS`] at once (more wait in the kernel's queue), each
//! closed once nothing has moved either way for [`IDLE_TIMEOUT`]. The token
//! is checked per request, so without these anyone who could reach the port
//! could open connections that never finish a request until the process ran
//! out of file descriptors (a daemon serving `--http` then could not open
//! its agents) or memory (hyper buffers ~400 KB of unfinished headers each).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Most connections served at once: a dashboard holds one event stream per
/// open page, scripts a few more. Bounds unfinished headers to ~100 MB.
pub const MAX_CONNECTIONS: usize = 256;

/// A connection that neither sends nor receives a byte for this long is
/// closed: a request's headers are slower than any client's, a kept-alive
/// connection is idle (an event stream sends a keep-alive every 15 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// `TcpListener` for `axum::serve`, with the bounds above.
pub struct Bounded {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl Bounded {
    pub fn new(listener: TcpListener) -> Bounded {
        Bounded::with_limits(listener, MAX_CONNECTIONS, IDLE_TIMEOUT)
    }

    fn with_limits(listener: TcpListener, max: usize, idle_timeout: Duration) -> Bounded {
        Bounded {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            idle_timeout,
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Guarded, std::net::SocketAddr) {
        // A free slot first: past the cap, connections wait in the kernel's
        // queue rather than here, holding no descriptor of ours.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        let idle = Box::pin(tokio::time::sleep(self.idle_timeout));
        let guarded = Guarded {
            stream,
            _slot: slot,
            idle,
            idle_timeout: self.idle_timeout,
        };
        (guarded, addr)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// One accepted connection: holds its slot until dropped, and fails its
/// reads once idle for too long (hyper then closes it).
pub struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
}

impl Guarded {
    fn moved(&mut self) {
        let deadline = Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// `polled` as it is, or the idle error once nothing moved for too
    /// long while it waits: a client that stops reading its answers holds
    /// a write as long as one that never sends a request holds a read.
    fn unless_idle<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        self.unless_idle(read, cx)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        self.unless_idle(written, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        self.unless_idle(flushed, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        self.unless_idle(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Past the cap a connection is not accepted until one closes; an
    /// idle one fails its reads after the timeout, a busy one does not.
    #[tokio::test]
    async fn connections_are_capped_and_idle_ones_time_out() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut bounded = Bounded::with_limits(tcp, 2, Duration::from_millis(1500));
        let _a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (mut first, _) = bounded.accept().await;
        let (mut second, _) = bounded.accept().await;
        let third = tokio::time::timeout(Duration::from_millis(200), bounded.accept()).await;
        assert!(
            third.is_err(),
            "a third connection was accepted past the cap of 2"
        );
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), bounded.accept()).await;
        assert!(third.is_ok(), "a slot freed, yet nothing was accepted");

        // `b` talks every 100 ms for 2 s: never idle for 1.5 s.
        let talker = tokio::spawn(async move {
            for _ in 0..20 {
                b.write_all(b"x").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            b
        });
        let mut got = [0u8; 1];
        for _ in 0..20 {
            second.read_exact(&mut got).await.unwrap();
        }
        let _b = talker.await.unwrap();
        let idle = second.read(&mut got).await.unwrap_err();
        assert_eq!(idle.kind(), io::ErrorKind::TimedOut);
        first = third.unwrap().0;
        drop(first);
    }
}
