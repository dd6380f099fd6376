//! One error type, tagged with the side it came from, turned into a wire reply in one place.
//!
//! Errors are cloneable (they carry rendered messages, not live sources) because one fill's
//! failure is handed to every client that coalesced behind it.

use crate::protocol::Reply;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The client's own mistake; the text is the whole reply, prefix included (`ERR …`).
    #[error("{0}")]
    Client(String),
    /// Valkey could not be reached or did not answer in time.
    #[error("UPSTREAM {0}")]
    Upstream(String),
    /// PostgreSQL refused or failed the query; the text is PostgreSQL's message.
    #[error("DBERR {0}")]
    Db(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A client error with the usual `ERR` prefix.
    pub fn client(msg: impl std::fmt::Display) -> Error {
        Error::Client(format!("ERR {msg}"))
    }

    pub fn upstream(msg: impl std::fmt::Display) -> Error {
        Error::Upstream(msg.to_string())
    }

    pub fn db(msg: impl std::fmt::Display) -> Error {
        Error::Db(msg.to_string())
    }

    /// The reply a client sees: `-ERR …`, `-UPSTREAM …` or `-DBERR …`.
    pub fn to_reply(&self) -> Reply {
        Reply::Error(self.to_string())
    }
}

impl From<redis::ParsingError> for Error {
    fn from(e: redis::ParsingError) -> Error {
        Error::Upstream(format!("unexpected reply from Valkey: {e}"))
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Error {
        Error::Upstream(e.to_string())
    }
}
