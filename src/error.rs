//! One error type, tagged with the side it came from, turned into a wire reply in one place;
//! and every refusal cachefront itself answers a client with ([`Refusal`]), worded here and
//! nowhere else.
//!
//! Errors are cloneable (they carry rendered messages, not live sources) because one fill's
//! failure is handed to every client that coalesced behind it.

use bytes::Bytes;

use crate::protocol::{Proto, ProtocolError, Reply};

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

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        Error::Client(r.to_string())
    }
}

/// Every refusal cachefront answers a client with itself. Where Valkey has the same refusal
/// the wording is Valkey's, to the byte, because clients and tests match on it; cachefront's
/// own refusals name the setting or the reason, so the user knows what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    // Arguments, as Valkey words them.
    /// The command's name as Valkey shows it: lowercase, `container|sub` for a subcommand.
    #[error("ERR wrong number of arguments for '{0}' command")]
    WrongArity(String),
    #[error("ERR syntax error")]
    Syntax,
    #[error("ERR value is not an integer or out of range")]
    NotAnInteger,
    #[error("ERR Unrecognized option '{0}'")]
    UnknownOption(String),
    /// A subcommand that does not exist, and the command whose `HELP` lists them.
    #[error("ERR unknown subcommand or wrong number of arguments for '{0}'. Try {1} HELP.")]
    UnknownSubcommand(String, &'static str),
    #[error("ERR count should be greater than or equal to -1")]
    NegativeCount,
    #[error("ERR invalid cursor")]
    InvalidCursor,

    // Connection and authentication.
    #[error("NOAUTH Authentication required.")]
    NoAuth,
    #[error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")]
    HelloNoAuth,
    #[error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?")]
    AuthWithoutPassword,
    #[error("WRONGPASS invalid username-password pair or user is disabled.")]
    WrongPass,
    #[error("NOPROTO unsupported protocol version")]
    NoProto,
    #[error("ERR Protocol version is not an integer or out of range")]
    BadProtoVersion,
    #[error("ERR Syntax error in HELLO option '{0}'")]
    HelloOption(String),
    #[error("ERR Client names cannot contain spaces, newlines or special characters.")]
    BadClientName,
    /// `CLIENT SETINFO` with a value Valkey would refuse; the attribute, lowercase.
    #[error("ERR {0} cannot contain spaces, newlines or special characters.")]
    BadClientInfo(String),
    #[error("ERR The client ID you want redirect to does not exist")]
    NoRedirectClient,
    #[error("ERR max number of clients reached")]
    MaxClients,
    #[error("DENIED cachefront is running in protected mode because protected mode is enabled and no password is set for the default user. In this mode connections are only accepted from the loopback interface. Set auth.requirepass, or disable protected mode with auth.protected_mode = false.")]
    ProtectedMode,

    // Permissions.
    #[error("NOPERM User {user} has no permissions to run the '{command}' command")]
    NoPermCommand { user: String, command: String },
    #[error("NOPERM No permissions to access a key")]
    NoPermKey,
    #[error("NOPERM cachefront's own keys (under cache.meta_prefix) cannot be written, renamed or deleted by clients")]
    NoPermMeta,
    /// A restricted user's script or SORT with patterns when its Valkey ACL twin could not be
    /// set up: refused rather than run with cachefront's own Valkey rights.
    #[error("NOPERM cachefront cannot enforce this user's key and command rules inside scripts and SORT patterns: its Valkey ACL twin could not be set up (cachefront's Valkey user needs ACL SETUSER); see the log")]
    NoTwin,
    /// ACL subcommands other than WHOAMI; the subcommand, uppercase.
    #[error("ERR ACL {0} is not supported through cachefront: its users are configured in config.toml ([[auth.users]]); only ACL WHOAMI is answered")]
    AclSubcommand(String),

    // What cachefront does not relay, and why.
    #[error("ERR CLIENT KILL is not supported through cachefront: it would kill cachefront's own shared connections to Valkey; to drop a cachefront client, close it (or connect to Valkey directly to kill Valkey clients)")]
    ClientKill,
    #[error(
        "ERR CLIENT TRACKING is not supported by cachefront in cluster mode (tracking is per node)"
    )]
    TrackingInCluster,
    #[error("ERR SELECT is not allowed in cluster mode")]
    SelectInCluster,
    #[error("ERR cachefront does not relay replication; connect replicas to Valkey directly")]
    Replication,

    // Transactions and subscribed mode.
    #[error("EXECABORT Transaction discarded because of previous errors.")]
    ExecAbort,
    /// A command refused in MULTI, named as the client sent it.
    #[error("ERR {0} is not allowed inside MULTI: cachefront commands cannot be queued in a transaction")]
    NotInMulti(String),
    #[error(
        "ERR this command is answered by cachefront itself and cannot be queued in a transaction"
    )]
    LocalInMulti,
    /// A subscribed RESP2 client's other command (lowercase), as Valkey words it.
    #[error("ERR Can't execute '{0}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context")]
    Subscribed(String),
    /// The same for RESP3, where Valkey allows everything but cachefront's own commands
    /// (uppercase).
    #[error("ERR {0} is not available on a connection in subscribed mode; use another connection")]
    SubscribedResp3(String),

    // Cluster, as Valkey words it.
    #[error("CROSSSLOT Keys in request don't hash to the same slot")]
    CrossSlot,
    #[error("CLUSTERDOWN Hash slot not served")]
    ClusterDown,
    #[error("TRYAGAIN the key's slot moved to another node; retry")]
    TryAgain,

    // Cached commands.
    /// An argument of a named query that its type refuses: the argument's name, the value.
    #[error("ERR invalid {0} '{1}'")]
    InvalidArg(String, String),
    /// Arguments PostgreSQL refused for their types: the query, PostgreSQL's message.
    #[error("ERR invalid arguments for {0}: {1}")]
    InvalidArgs(String, String),
    #[error("ERR invalid table name '{0}'")]
    InvalidTable(String),
    #[error("ERR SQL.CACHED accepts a single read-only query")]
    NotReadOnly,
    /// Read-only as far as PostgreSQL can tell, but not analysable: the parser's reason.
    #[error("ERR SQL.CACHED accepts a single read-only query that cachefront can analyse (its SQL parser says: {0})")]
    NotAnalysable(String),
    /// PostgreSQL cannot report everything the query reads: the reason (`db::deps`).
    #[error("ERR SQL.CACHED cannot keep this query fresh: {0} (set sql.ttl_only = true to cache such queries until their TTL)")]
    UntrackableSql(String),
    /// The same for a named query: its command, the reason.
    #[error("ERR {0} cannot keep its query fresh: {1} (set ttl_only = true on the query to cache it until its TTL)")]
    UntrackableNamed(String, String),
    #[error("ERR invalid expire time in 'sql.cached' command")]
    InvalidExpire,
    #[error("ERR SQL.CACHED parameters must be valid UTF-8 text")]
    ParamsNotUtf8,
    #[error("ERR SQL.CACHED query must be valid UTF-8 text")]
    QueryNotUtf8,
    #[error("ERR SQL.CACHED is disabled on this server (sql.mode = \"off\")")]
    SqlOff,
    #[error("ERR SQL.CACHED query is longer than sql.max_sql_bytes ({0} bytes)")]
    QueryTooLong(usize),
    #[error(
        "ERR SQL.CACHED accepts only allowlisted queries on this server (sql.mode = \"allowlist\")"
    )]
    NotAllowlisted,
    #[error("ERR result has more than {0} rows (sql.max_rows); add a LIMIT")]
    TooManyRows(usize),
    #[error("ERR result is larger than sql.max_result_bytes ({0} bytes); add a LIMIT")]
    TooManyBytes(usize),

    // Read-your-writes (`CACHEFRONT.AFTER`).
    /// A token that is not a WAL position: the argument as sent (lossy).
    #[error("ERR invalid LSN '{0}': expected a PostgreSQL WAL position as text (X/Y in hex), e.g. the result of SELECT pg_current_wal_lsn() after the commit")]
    InvalidLsn(String),
    #[error("ERR invalid TIMEOUT in 'cachefront.after' command: milliseconds from 0 to {0}")]
    InvalidAfterTimeout(u64),
    #[error("ERR CACHEFRONT.AFTER needs invalidation, which is off on this server (invalidation.enabled = false)")]
    AfterWithoutInvalidation,
    /// The position waited for (PostgreSQL's text form) and how long it was waited for.
    #[error("TRYAGAIN cachefront has not applied invalidations up to {0} yet (waited {1} ms)")]
    NotAppliedYet(String, u64),

    // cachefront's own failures, as the client sees them (the cause is in the log).
    #[error("ERR internal error while running the command")]
    Internal,
    #[error("ERR permission check failed")]
    CheckFailed,
}

impl Refusal {
    pub fn reply(&self) -> Reply {
        Reply::Error(self.to_string())
    }

    /// The encoded error frame, for replies written without a [`Reply`] (same in both
    /// protocols).
    pub fn frame(&self) -> Bytes {
        self.reply().to_bytes(Proto::Resp2)
    }
}

impl From<Refusal> for Reply {
    fn from(r: Refusal) -> Reply {
        r.reply()
    }
}

/// A malformed request's reply: `-ERR Protocol error: ` and the parser's text, its bytes as
/// they came (Valkey quotes the offending byte as it is), CR and LF shown as spaces.
pub fn protocol_error(e: &ProtocolError) -> Bytes {
    let mut out = b"-ERR Protocol error: ".to_vec();
    out.extend(
        e.0.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_one_error_line_in_either_protocol() {
        assert_eq!(
            &Refusal::CrossSlot.frame()[..],
            b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
        );
        assert_eq!(
            Refusal::WrongArity("client|setname".into()).reply(),
            Reply::Error("ERR wrong number of arguments for 'client|setname' command".into())
        );
        let e: Error = Refusal::NoPermKey.into();
        assert_eq!(
            e.to_reply().to_bytes(Proto::Resp3),
            Bytes::from_static(b"-NOPERM No permissions to access a key\r\n")
        );
    }

    #[test]
    fn protocol_errors_keep_the_offending_bytes_and_blank_line_breaks() {
        let e = ProtocolError(b"expected '$', got '\xff\r\n'".to_vec());
        assert_eq!(
            &protocol_error(&e)[..],
            b"-ERR Protocol error: expected '$', got '\xff  '\r\n"
        );
    }
}
