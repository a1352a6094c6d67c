//! A stream that gives back bytes already read from it before reading on.
//!
//! The listener reads a connection's AMQP protocol header itself to choose between a SASL
//! negotiation (`AMQP 3 1 0 0`) and none (`AMQP 0 1 0 0`, which rhea-based clients such as the
//! Node service SDK send); the acceptor then reads the header again from this stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug)]
pub struct Replay<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Replay<S> {
        Replay {
            prefix,
            offset: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.offset < self.prefix.len() {
            let left = &self.prefix[self.offset..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            self.offset += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_prefix_comes_first_then_the_stream_and_writes_pass_through() {
        let (client, server) = tokio::io::duplex(64);
        let mut replay = Replay::new(b"AMQP".to_vec(), server);
        let mut client = client;
        client.write_all(b"\x00\x01\x00\x00").await.unwrap();
        let mut got = [0u8; 8];
        replay.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"AMQP\x00\x01\x00\x00");
        replay.write_all(b"ok").await.unwrap();
        let mut echoed = [0u8; 2];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ok");
    }
}
