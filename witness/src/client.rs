//! The data node's side of the witness link: connect, authenticate both ways, ask.
//!
//! A [`Client`] believes nothing from the witness before the witness has proven it holds the
//! authkey ([`ServerVerdict::verify`]): a fake witness cannot tell a node to go on alone.

use std::net::SocketAddr;
use std::time::Duration;

use metroblk_protocol::witness::{ClientHello, Reply, Request, ServerHello, ServerVerdict};
use rand::RngCore;
use tokio::net::TcpStream;

use crate::io::{read_message, write_message};

/// An authenticated connection to the witness.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    addr: SocketAddr,
}

impl Client {
    /// Connects to the witness at `addr` as `node` and runs the mutual authentication, all
    /// within `timeout`.
    pub async fn connect(addr: SocketAddr, node: &str, key: &[u8], timeout: Duration) -> Result<Client, String> {
        let fail = |m: String| format!("witness {addr}: {m}");
        tokio::time::timeout(timeout, async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let hello: ServerHello = read_message(&mut stream).await?;
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
