//! Reading and writing witness frames on a tokio stream (shared by the server and the client).

use metroblk_protocol::witness::{decode_body, encode_message, frame_body_len, WITNESS_FRAME_PREFIX_LEN};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A witness connection: plain TCP or TLS (tokio-rustls), the same to the protocol.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Reads one message; the length is checked before the body's buffer is allocated.
pub(crate) async fn read_message<T, S>(stream: &mut S) -> Result<T, String>
where
    T: DeserializeOwned,
    S: AsyncReadExt + Unpin,
{
    let mut prefix = [0u8; WITNESS_FRAME_PREFIX_LEN];
    stream.read_exact(&mut prefix).await.map_err(io_text)?;
    read_body(stream, prefix).await
}

/// The rest of a message whose length prefix was read.
pub(crate) async fn read_body<T, S>(stream: &mut S, prefix: [u8; WITNESS_FRAME_PREFIX_LEN]) -> Result<T, String>
where
    T: DeserializeOwned,
    S: AsyncReadExt + Unpin,
{
    let len = frame_body_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(io_text)?;
    decode_body(&body).map_err(|e| e.to_string())
}

pub(crate) async fn write_message<T, S>(stream: &mut S, message: &T) -> Result<(), String>
where
    T: Serialize,
    S: AsyncWriteExt + Unpin,
{
    stream.write_all(&encode_message(message)).await.map_err(io_text)?;
    stream.flush().await.map_err(io_text)
}

pub(crate) fn io_text(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the connection was closed".into(),
        _ => e.to_string(),
    }
}
