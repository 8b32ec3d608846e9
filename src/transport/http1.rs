//! A lean HTTP/1.1 client for streams. A stream is one long GET whose response never ends, so
//! it needs no connection pool, no request body and no keep-alive: a socket (with TLS for
//! https), a request head written once, the response head parsed with httparse, and a body
//! read in 2 KiB pieces, de-chunked. hyper's client keeps about 25 KB of buffers per
//! connection, whatever the traffic; this keeps about 2 KiB while a stream is idle, which is
//! what lets thousands of template instances fit in a small process (BENCHMARKS.md).
//!
//! Deliveries, and streams behind an HTTP proxy (`HTTPS_PROXY` and the like), go through
//! reqwest as before.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time, and held while a stream is idle.
const READ_BYTES: usize = 2048;

/// The largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most response headers accepted.
const MAX_HEADERS: usize = 64;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive: an upstream that vanished without a FIN is noticed within minutes even if
/// the idle timeout is long.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// What the client needs to connect: the TLS settings of the stream.
#[derive(Clone)]
pub struct Http1Client {
    tls: tokio_rustls::TlsConnector,
    user_agent: &'static str,
}

/// A socket, plain or with TLS.
trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin> Io for T {}

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("cannot connect to {host}")]
    Connect {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {host}: no answer within {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout { host: String },
    #[error("the request has no host, or a scheme other than http or https")]
    BadUrl,
    #[error("cannot send the request: {0}")]
    Send(#[source] std::io::Error),
    #[error("cannot read the response: {0}")]
    Read(#[source] std::io::Error),
    #[error("the server closed the connection before it answered")]
    NoResponse,
    #[error("the server's response head is not valid HTTP/1.1: {0}")]
    BadHead(String),
}

/// A response head and the connection its body comes on.
pub struct Http1Response {
    pub head: http::response::Parts,
    pub body: Http1Body,
}

impl Http1Client {
    pub fn new(tls: Arc<rustls::ClientConfig>, user_agent: &'static str) -> Http1Client {
        Http1Client {
            tls: tokio_rustls::TlsConnector::from(tls),
            user_agent,
        }
    }

    /// Sends `GET uri` with `headers` and reads the response head.
    pub async fn get(&self, uri: &http::Uri, headers: &http::HeaderMap) -> Result<Http1Response, Http1Error> {
        let (https, host, port) = match (uri.scheme_str(), uri.host()) {
            (Some("https"), Some(host)) => (true, host, uri.port_u16().unwrap_or(443)),
            (Some("http"), Some(host)) => (false, host, uri.port_u16().unwrap_or(80)),
            _ => return Err(Http1Error::BadUrl),
        };
        // An IPv6 literal is bracketed in the URI, not in a socket address or a server name.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let host_and_port = match uri.port_u16() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let mut io = self.connect(https, bare_host, port, &host_and_port).await?;
        let head = request_head(uri, &host_and_port, headers, self.user_agent);
        io.write_all(&head).await.map_err(Http1Error::Send)?;
        io.flush().await.map_err(Http1Error::Send)?;
        read_response(io).await
    }

    async fn connect(&self, https: bool, host: &str, port: u16, shown: &str) -> Result<Box<dyn Io>, Http1Error> {
        let connect_error = |source| Http1Error::Connect {
            host: format!("{host}:{port}"),
            source,
        };
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| Http1Error::ConnectTimeout { host: shown.to_owned() })?
            .map_err(connect_error)?;
        connected.set_nodelay(true).map_err(connect_error)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&connected)
            .set_tcp_keepalive(&keepalive)
            .map_err(connect_error)?;
        if !https {
            return Ok(Box::new(connected));
        }
        let server_name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|err| connect_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, err)))?;
        let tls = self.tls.connect(server_name, connected).await.map_err(connect_error)?;
        Ok(Box::new(tls))
    }
}

/// `GET path HTTP/1.1` with `Host`, the stream's headers, and what the relay always sends.
fn request_head(uri: &http::Uri, host: &str, headers: &http::HeaderMap, user_agent: &str) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    head.extend_from_slice(host.as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut has_user_agent = false;
    for (name, value) in headers {
        if name == http::header::HOST || name == http::header::CONNECTION || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        has_user_agent |= name == http::header::USER_AGENT;
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !has_user_agent {
        head.extend_from_slice(b"user-agent: ");
        head.extend_from_slice(user_agent.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Reads the response head; what came after it is the start of the body.
async fn read_response(mut io: Box<dyn Io>) -> Result<Http1Response, Http1Error> {
    let mut buffer = BytesMut::with_capacity(READ_BYTES);
    loop {
        if let Some((head, head_len, framing)) = parse_head(&buffer)? {
            buffer.advance(head_len);
            let body = Http1Body::new(io, buffer, framing);
            return Ok(Http1Response { head, body });
        }
        if buffer.len() >= MAX_HEAD_BYTES {
            return Err(Http1Error::BadHead(format!(
                "the head is longer than {MAX_HEAD_BYTES} bytes"
            )));
        }
        buffer.reserve(READ_BYTES);
        if io.read_buf(&mut buffer).await.map_err(Http1Error::Read)? == 0 {
            return Err(Http1Error::NoResponse);
        }
    }
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

/// The head, its length and the body's framing, once the buffer holds a whole head.
fn parse_head(buffer: &[u8]) -> Result<Option<(http::response::Parts, usize, Framing)>, Http1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buffer) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(Http1Error::BadHead(err.to_string())),
    };
    let status = response.code.unwrap_or(0);
    let mut builder = http::Response::builder().status(status);
    let mut framing = Framing::UntilClose;
    for header in response.headers.iter() {
        let name = http::HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|err| Http1Error::BadHead(format!("header {:?}: {err}", header.name)))?;
        let value = http::HeaderValue::from_bytes(header.value)
            .map_err(|err| Http1Error::BadHead(format!("header {name}: {err}")))?;
        if name == http::header::TRANSFER_ENCODING
            && String::from_utf8_lossy(header.value)
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
        {
            framing = Framing::Chunked;
        } else if name == http::header::CONTENT_LENGTH && framing != Framing::Chunked {
            let length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .ok_or_else(|| Http1Error::BadHead("Content-Length is not a number".to_owned()))?;
            framing = Framing::Length(length);
        }
        builder = builder.header(name, value);
    }
    let (parts, ()) = builder
        .body(())
        .map_err(|err| Http1Error::BadHead(err.to_string()))?
        .into_parts();
    // 1xx, 204 and 304 have no body.
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        framing
    };
    Ok(Some((parts, head_len, framing)))
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers up to a blank line.
    Trailers,
    Done,
}

/// A response body as it arrives, de-chunked. An error ends it.
pub struct Http1Body {
    io: Box<dyn Io>,
    /// Read but not yet passed on (or, chunked, not yet decoded).
    buffer: BytesMut,
    framing: Framing,
    chunk: Chunk,
    finished: bool,
}

impl Http1Body {
    fn new(io: Box<dyn Io>, buffer: BytesMut, framing: Framing) -> Http1Body {
        Http1Body {
            io,
            buffer,
            chunk: Chunk::Size,
            finished: framing == Framing::Length(0),
            framing,
        }
    }

    /// What the buffer holds of the body, decoded; `None` when more must be read first.
    fn take_decoded(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        match self.framing {
            Framing::UntilClose => Ok((!self.buffer.is_empty()).then(|| self.buffer.split().freeze())),
            Framing::Length(left) => {
                if self.buffer.is_empty() || left == 0 {
                    self.finished |= left == 0;
                    return Ok(None);
                }
                let n = (self.buffer.len() as u64).min(left) as usize;
                let piece = self.buffer.split_to(n).freeze();
                self.framing = Framing::Length(left - n as u64);
                self.finished = left == n as u64;
                Ok(Some(piece))
            }
            Framing::Chunked => self.take_chunked(),
        }
    }

    fn take_chunked(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        loop {
            match self.chunk {
                Chunk::Size | Chunk::Trailers | Chunk::DataEnd => {
                    let Some(line_end) = self.buffer.windows(2).position(|pair| pair == b"\r\n") else {
                        if self.buffer.len() > 4096 {
                            return Err(invalid("a chunk-size line or trailer longer than 4 KiB"));
                        }
                        return Ok(None);
                    };
                    let line = self.buffer.split_to(line_end + 2);
                    let line = &line[..line_end];
                    self.chunk = match self.chunk {
                        Chunk::DataEnd if line.is_empty() => Chunk::Size,
                        Chunk::DataEnd => return Err(invalid("a chunk's data does not end with CRLF")),
                        Chunk::Trailers if line.is_empty() => {
                            self.finished = true;
                            Chunk::Done
                        }
                        Chunk::Trailers => Chunk::Trailers,
                        _ => {
                            let digits = line.split(|byte| *byte == b';').next().unwrap_or_default();
                            let size = std::str::from_utf8(digits)
                                .ok()
                                .and_then(|text| u64::from_str_radix(text.trim(), 16).ok())
                                .ok_or_else(|| invalid("a chunk size is not hexadecimal"))?;
                            if size == 0 { Chunk::Trailers } else { Chunk::Data(size) }
                        }
                    };
                    if self.chunk == Chunk::Done {
                        return Ok(None);
                    }
                }
                Chunk::Data(left) => {
                    if self.buffer.is_empty() {
                        return Ok(None);
                    }
                    let n = (self.buffer.len() as u64).min(left) as usize;
                    let piece = self.buffer.split_to(n).freeze();
                    self.chunk = if left == n as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n as u64)
                    };
                    return Ok(Some(piece));
                }
                Chunk::Done => return Ok(None),
            }
        }
    }
}

impl Stream for Http1Body {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let body = &mut *self;
        loop {
            match body.take_decoded() {
                Ok(Some(piece)) => return Poll::Ready(Some(Ok(piece))),
                Ok(None) if body.finished => return Poll::Ready(None),
                Ok(None) => {}
                Err(err) => {
                    body.finished = true;
                    return Poll::Ready(Some(Err(err)));
                }
            }
            if body.buffer.capacity() - body.buffer.len() < READ_BYTES / 2 {
                body.buffer.reserve(READ_BYTES);
            }
            let spare = body.buffer.spare_capacity_mut();
            let mut read = ReadBuf::uninit(spare);
            match Pin::new(&mut body.io).poll_read(context, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => {
                    body.finished = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        body.finished = true;
                        return match body.framing {
                            Framing::UntilClose => Poll::Ready(None),
                            _ => Poll::Ready(Some(Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the server closed the connection before the body's end",
                            )))),
                        };
                    }
                    // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
                    unsafe { body.buffer.set_len(body.buffer.len() + n) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    /// The body of a response whose bytes after the head arrive in `pieces`.
    async fn decode(framing: Framing, pieces: &[&[u8]]) -> Result<Vec<u8>, std::io::Error> {
        let (client, mut server) = tokio::io::duplex(64);
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|piece| piece.to_vec()).collect();
        tokio::spawn(async move {
            for piece in pieces {
                server.write_all(&piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut body = Http1Body::new(Box::new(client), BytesMut::new(), framing);
        let mut decoded = Vec::new();
        while let Some(piece) = body.next().await {
            decoded.extend_from_slice(&piece?);
        }
        Ok(decoded)
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_across_any_split() {
        let encoded: &[u8] = b"5;ext=1\r\ndata:\r\n6\r\n x\n\nda\r\n0\r\nTrailer: t\r\n\r\n";
        for split in 1..encoded.len() {
            let (first, second) = encoded.split_at(split);
            let decoded = decode(Framing::Chunked, &[first, second]).await.unwrap();
            assert_eq!(decoded, b"data: x\n\nda", "split at {split}");
        }
        assert!(decode(Framing::Chunked, &[b"zz\r\n"]).await.is_err());
        assert!(
            decode(Framing::Chunked, &[b"5\r\nabc"]).await.is_err(),
            "closed mid-chunk"
        );
    }

    #[tokio::test]
    async fn a_length_or_the_close_ends_a_body() {
        assert_eq!(decode(Framing::Length(4), &[b"ab", b"cdef"]).await.unwrap(), b"abcd");
        assert!(decode(Framing::Length(4), &[b"ab"]).await.is_err());
        assert_eq!(decode(Framing::UntilClose, &[b"ab", b"cd"]).await.unwrap(), b"abcd");
    }

    #[test]
    fn a_head_says_how_its_body_ends() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        let (parts, length, framing) = parse_head(head).unwrap().unwrap();
        assert_eq!(
            (parts.status.as_u16(), length, framing),
            (200, head.len() - 4, Framing::Chunked)
        );
        assert_eq!(parts.headers["content-type"], "text/event-stream");
        let (_, _, framing) = parse_head(b"HTTP/1.1 401 No\r\nContent-Length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(framing, Framing::Length(12));
        let (_, _, framing) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(framing, Framing::UntilClose);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Ty").unwrap().is_none());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    #[test]
    fn the_request_head_has_host_the_headers_and_a_user_agent() {
        let uri: http::Uri = "http://127.0.0.1:8080/chats/a%3Ab/listen?x=1".parse().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", http::HeaderValue::from_static("Bearer t"));
        headers.insert("host", http::HeaderValue::from_static("evil"));
        let head = String::from_utf8(request_head(&uri, "127.0.0.1:8080", &headers, "sse-relay/1")).unwrap();
        assert_eq!(
            head,
            "GET /chats/a%3Ab/listen?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nauthorization: Bearer t\r\n\
             user-agent: sse-relay/1\r\n\r\n"
        );
    }
}
