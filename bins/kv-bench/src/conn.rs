//! One keep-alive HTTP/1.1 connection per worker (hyper's low-level client on a TCP stream with
//! `TCP_NODELAY`), reopened after any failure, with a deadline on every exchange.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::request::Api;
use crate::stats::Outcome;
use crate::workload::Op;

/// A worker's connection to the target; opened lazily, dropped after a failure.
#[derive(Debug)]
pub struct Conn {
    addr: SocketAddr,
    timeout: Duration,
    /// How answers are classified.
    api: Api,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// Why an exchange failed before a status line arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Connecting or the HTTP handshake failed.
    Connect,
    /// The connection broke or spoke invalid HTTP.
    Io,
}

impl Conn {
    /// A connection to `addr` whose exchanges give up after `timeout` (connecting included) and
    /// whose answers are classified as `api` answers.
    pub fn new(addr: SocketAddr, timeout: Duration, api: Api) -> Self {
        Conn {
            addr,
            timeout,
            api,
            sender: None,
        }
    }

    /// Sends `req`, reads the whole answer and classifies it for `op`.
    ///
    /// After a timeout or a transport error the connection is dropped: its state is unknown, and
    /// the next call reconnects.
    pub async fn exchange(&mut self, op: Op, req: Request<Full<Bytes>>) -> Outcome {
        match tokio::time::timeout(self.timeout, self.send(req)).await {
            Ok(Ok((status, body))) => self.api.classify(op, status, &body),
            Ok(Err(failure)) => {
                self.sender = None;
                match failure {
                    Failure::Connect => Outcome::Connect,
                    Failure::Io => Outcome::Io,
                }
            }
            Err(_elapsed) => {
                self.sender = None;
                Outcome::Timeout
            }
        }
    }

    /// Sends on the open connection (opening one if needed) and reads the whole body; returns
    /// the status and the body when the API's classification needs it (an empty one otherwise).
    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), Failure> {
        let needs_body = self.api.needs_body();
        let sender = self.ready_sender().await?;
        let response = sender.send_request(req).await.map_err(|_| Failure::Io)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|_| Failure::Io)?;
        Ok((
            status,
            if needs_body {
                body.to_bytes()
            } else {
                Bytes::new()
            },
        ))
    }

    /// The sender of a live connection: the kept-alive one if the server has not closed it,
    /// otherwise a new one. Replacing a connection the server closed while idle is not an error.
    async fn ready_sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, Failure> {
        let reusable = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.sender = Some(open(self.addr).await?);
        }
        self.sender.as_mut().ok_or(Failure::Connect)
    }
}

/// Opens a TCP connection with `TCP_NODELAY` and runs the HTTP/1.1 handshake; the connection's
/// driver runs as its own task until either side closes it.
async fn open(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| Failure::Connect)?;
    stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
    let (sender, connection) = handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Failure::Connect)?;
    tokio::spawn(async move {
        // Ends with an error when the peer resets; the next exchange sees it through `ready()`.
        let _ = connection.await;
    });
    Ok(sender)
}
