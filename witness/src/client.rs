//! The data node's side of the witness link: connect, authenticate both ways, ask.
//!
//! A [`Client`] believes nothing from the witness before the witness has proven it holds the
//! authkey ([`ServerVerdict::verify`]): a fake witness cannot tell a node to go on alone.

use std::net::SocketAddr;
use std::time::Duration;

use metroblk_protocol::witness::{ClientHello, Reply, Request, ServerHello, ServerVerdict};
use metroblk_tls::TlsSetup;
use rand::RngCore;
use tokio::net::TcpStream;

use crate::io::{read_message, write_message, BoxStream};

/// An authenticated connection to the witness.
pub struct Client {
    stream: BoxStream,
    addr: SocketAddr,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the witness at `addr` as `node` over plain TCP and runs the mutual
    /// authentication, all within `timeout`.
    pub async fn connect(addr: SocketAddr, node: &str, key: &[u8], timeout: Duration) -> Result<Client, String> {
        Self::connect_over(addr, node, key, None, timeout).await
    }

    /// [`Client::connect`], over TLS 1.3 (tokio-rustls) where `tls` is given; the HMAC
    /// authentication then runs inside the encrypted stream.
    pub async fn connect_over(
        addr: SocketAddr,
        node: &str,
        key: &[u8],
        tls: Option<&TlsSetup>,
        timeout: Duration,
    ) -> Result<Client, String> {
        let fail = |m: String| format!("witness {addr}: {m}");
        tokio::time::timeout(timeout, async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let mut stream: BoxStream = match tls {
                None => Box::new(tcp),
                Some(t) => Box::new(
                    tokio_rustls::TlsConnector::from(t.client.clone())
                        .connect(t.server_name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {}", metroblk_tls::handshake_error_text(&e)))?,
                ),
            };
            let hello: ServerHello = read_message(&mut stream).await.map_err(|e| match tls {
                // A TLS witness waits for a ClientHello and closes a plaintext link.
                None if e.contains("closed") => {
                    format!("{e} before its hello (is the witness's transport \"tls\"? ours is \"tcp\")")
                }
                _ => e,
            })?;
            let server_nonce = hello.check().map_err(|e| e.to_string())?;
            let mut client_nonce = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut client_nonce);
            let ch = ClientHello::new(key, &server_nonce, &client_nonce, node).map_err(|e| e.to_string())?;
            write_message(&mut stream, &ch).await?;
            let verdict: ServerVerdict = read_message(&mut stream).await?;
            verdict.verify(key, &server_nonce, &client_nonce, node).map_err(|e| e.to_string())?;
            Ok(Client { stream, addr })
        })
        .await
        .map_err(|_| fail(format!("no answer within {} ms", timeout.as_millis())))?
        .map_err(fail)
    }

    /// Sends one request and waits up to `timeout` for its reply. After an error the connection
    /// is in an unknown state: drop it and connect again.
    pub async fn request(&mut self, req: &Request, timeout: Duration) -> Result<Reply, String> {
        let addr = self.addr;
        let stream = &mut self.stream;
        tokio::time::timeout(timeout, async {
            write_message(stream, req).await?;
            read_message::<Reply, _>(stream).await
        })
        .await
        .map_err(|_| format!("witness {addr}: no reply to {} within {} ms", req.kind(), timeout.as_millis()))?
        .map_err(|e| format!("witness {addr}: {e}"))
    }

    /// The witness's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
