//! The SQL layer every repository module talks to: one connection, to SQLite or to
//! PostgreSQL, behind one small API ([`Conn`]), so the modules write each statement once.
//!
//! - Statements are written in the SQL both databases share (`ON CONFLICT`, `RETURNING`,
//!   `IS NOT DISTINCT FROM`, `coalesce`), with `?N` (or `?`) parameters; for PostgreSQL
//!   they are rewritten to `$N` once and kept prepared, like SQLite's statement cache. The
//!   few statements that cannot be shared ask [`Conn::dialect`].
//! - Parameters are [`Arg`]s, built by the [`args!`](crate::args) macro from borrowed
//!   values; the PostgreSQL conversion follows the parameter's type as the server inferred
//!   it (an integer bound to a `BIGINT` or an `INTEGER` column alike).
//! - Rows are read through [`Row::get`] with the Rust type wanted ([`Column`]): integers,
//!   text, bytes, each optionally `Option`. The PostgreSQL schema stores every integer as
//!   `BIGINT` and every flag as a `BIGINT` 0 or 1, as SQLite does.
//! - An `INSERT … RETURNING id` goes through [`Conn::insert_id`]: PostgreSQL runs it as
//!   written; SQLite without the `RETURNING` (which buffers its output in a temporary table
//!   on every execution: a quarter of an initial load) and reads the last row id.
//! - Errors are [`DbError`], which keeps the driver's error for the decisions callers make
//!   on it (busy, conflict, storage failure: module `error`).
//!
//! A PostgreSQL client needs `&mut` for every call while SQLite's connection does not; the
//! client sits in a `RefCell` (a [`Conn`] is used by one thread at a time, behind the
//! repository's mutex), and rows are fetched whole before a caller's closure sees them, so
//! a closure may run statements of its own.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::{Context, RepoError};
use crate::merge::{Merger, SetWise};

/// Which database a [`Conn`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// An SQLite file (or memory).
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// An error of either driver, or of a value that does not fit the type asked for.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// From SQLite.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// From PostgreSQL (the server, or the connection to it). Its message already holds
    /// the driver's causes (not a `source`, which would print them twice).
    #[error("{}", describe_pg(.0))]
    Postgres(tokio_postgres::Error),
    /// A row had fewer or other values than the statement promised.
    #[error("{0}")]
    Shape(String),
    /// A write sent ahead ([`Conn::send_ahead`]) failed, or changed other rows than its
    /// sender predicted: what the caller did after it rests on a wrong guess, and the
    /// transaction must be rolled back (module `speculation`).
    #[error("a write sent ahead did not go as predicted: {0}")]
    Mispredicted(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

/// PostgreSQL's own message (its `Display` says only "db error" for server errors).
fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            // The client's own errors say what failed; their sources say why (a
            // certificate, a refused connection).
            let mut out = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                out.push_str(": ");
                out.push_str(&cause.to_string());
                source = cause.source();
            }
            out
        }
    }
}

impl DbError {
    /// The SQLSTATE of a PostgreSQL server error.
    pub(crate) fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// One statement parameter, borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
    /// A PostgreSQL `TEXT[]` (`= ANY(?N)`); SQLite has no arrays.
    Texts(&'a [&'a str]),
}

/// What can be bound as a parameter.
pub(crate) trait ToArg {
    fn to_arg(&self) -> Arg<'_>;
}

impl ToArg for str {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Text(self)
    }
}
impl ToArg for String {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Text(self)
    }
}
impl ToArg for [u8] {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Blob(self)
    }
}
impl ToArg for Vec<u8> {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Blob(self)
    }
}
impl ToArg for i64 {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(*self)
    }
}
impl ToArg for i32 {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(i64::from(*self))
    }
}
impl ToArg for u32 {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(i64::from(*self))
    }
}
impl ToArg for bool {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Int(i64::from(*self))
    }
}
impl ToArg for f64 {
    fn to_arg(&self) -> Arg<'_> {
        Arg::Real(*self)
    }
}
impl<T: ToArg + ?Sized> ToArg for &T {
    fn to_arg(&self) -> Arg<'_> {
        (**self).to_arg()
    }
}
impl<T: ToArg> ToArg for Option<T> {
    fn to_arg(&self) -> Arg<'_> {
        match self {
            Some(v) => v.to_arg(),
            None => Arg::Null,
        }
    }
}
impl ToArg for Arg<'_> {
    fn to_arg(&self) -> Arg<'_> {
        *self
    }
}

/// The parameters of a statement: `args![resource, key, 3]`.
#[macro_export]
#[doc(hidden)]
macro_rules! args {
    () => { &[][..] as &[$crate::db::Arg<'_>] };
    ($($a:expr),+ $(,)?) => {
        &[$($crate::db::ToArg::to_arg(&$a)),+][..]
    };
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match *self {
            Arg::Null => ToSqlOutput::Owned(Value::Null),
            Arg::Int(v) => ToSqlOutput::Owned(Value::Integer(v)),
            Arg::Real(v) => ToSqlOutput::Owned(Value::Real(v)),
            Arg::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Arg::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Arg::Texts(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "SQLite has no array parameters".into(),
                ));
            }
        })
    }
}

impl tokio_postgres::types::ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::Type;
        match *self {
            Arg::Null => Ok(tokio_postgres::types::IsNull::Yes),
            Arg::Int(v) => match *ty {
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::BOOL => (v != 0).to_sql(ty, out),
                #[allow(clippy::cast_precision_loss)]
                Type::FLOAT8 => (v as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::UNKNOWN => v.to_string().to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Arg::Real(v) => v.to_sql(ty, out),
            Arg::Text(s) => match *ty {
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => s.to_sql(ty, out),
            },
            Arg::Blob(b) => b.to_sql(ty, out),
            Arg::Texts(list) => list.to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A result row of either database.
pub(crate) enum Row<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a tokio_postgres::Row),
}

impl Row<'_> {
    /// Column `i` (from 0) as a `T`.
    pub(crate) fn get<T: Column>(&self, i: usize) -> Result<T, DbError> {
        match self {
            Row::Sqlite(r) => T::from_sqlite(r, i).map_err(DbError::from),
            Row::Postgres(r) => T::from_postgres(r, i),
        }
    }

    /// Column `i` as text borrowed from the row (no copy).
    pub(crate) fn str(&self, i: usize) -> Result<&str, DbError> {
        match self {
            Row::Sqlite(r) => r
                .get_ref(i)?
                .as_str()
                .map_err(|e| DbError::Shape(format!("column {i}: {e}"))),
            Row::Postgres(r) => Ok(r.try_get::<_, &str>(i)?),
        }
    }
}

/// A value of any column, owned: what a copy between databases carries.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl ToArg for Value {
    fn to_arg(&self) -> Arg<'_> {
        match self {
            Value::Null => Arg::Null,
            Value::Int(v) => Arg::Int(*v),
            Value::Real(v) => Arg::Real(*v),
            Value::Text(s) => Arg::Text(s),
            Value::Blob(b) => Arg::Blob(b),
        }
    }
}

impl Row<'_> {
    /// Column `i` whatever its type (text, integer, real, bytes, NULL).
    pub(crate) fn value(&self, i: usize) -> Result<Value, DbError> {
        match self {
            Row::Sqlite(r) => {
                use rusqlite::types::ValueRef;
                Ok(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => Value::Real(v),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                })
            }
            Row::Postgres(r) => {
                use tokio_postgres::types::Type;
                let ty = r
                    .columns()
                    .get(i)
                    .map(|c| c.type_().clone())
                    .ok_or_else(|| DbError::Shape(format!("no column {i}")))?;
                Ok(match ty {
                    Type::INT8 => r
                        .try_get::<_, Option<i64>>(i)?
                        .map_or(Value::Null, Value::Int),
                    Type::INT4 => r
                        .try_get::<_, Option<i32>>(i)?
                        .map_or(Value::Null, |v| Value::Int(i64::from(v))),
                    Type::BOOL => r
                        .try_get::<_, Option<bool>>(i)?
                        .map_or(Value::Null, |v| Value::Int(i64::from(v))),
                    Type::FLOAT8 => r
                        .try_get::<_, Option<f64>>(i)?
                        .map_or(Value::Null, Value::Real),
                    Type::BYTEA => r
                        .try_get::<_, Option<Vec<u8>>>(i)?
                        .map_or(Value::Null, Value::Blob),
                    _ => r
                        .try_get::<_, Option<String>>(i)?
                        .map_or(Value::Null, Value::Text),
                })
            }
        }
    }
}

/// Appends `v` as a field of COPY's text format: `\N` for NULL, backslash escapes in
/// text, `\\x…` hex for bytes.
pub(crate) fn copy_text(v: &Value, out: &mut Vec<u8>) {
    use std::io::Write as _;
    match v {
        Value::Null => out.extend_from_slice(b"\\N"),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Real(r) => {
            let _ = write!(out, "{r:?}");
        }
        Value::Text(t) => {
            for b in t.bytes() {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    other => out.push(other),
                }
            }
        }
        Value::Blob(bytes) => {
            out.extend_from_slice(b"\\\\x");
            for b in bytes {
                let _ = write!(out, "{b:02x}");
            }
        }
    }
}

/// A Rust type a column can be read as.
pub(crate) trait Column: Sized {
    fn from_sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self>;
    fn from_postgres(row: &tokio_postgres::Row, i: usize) -> Result<Self, DbError>;
}

macro_rules! native_column {
    ($($t:ty),*) => {$(
        impl Column for $t {
            fn from_sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
                row.get(i)
            }
            fn from_postgres(row: &tokio_postgres::Row, i: usize) -> Result<Self, DbError> {
                Ok(row.try_get(i)?)
            }
        }
    )*};
}
native_column!(
    i64,
    Option<i64>,
    String,
    Option<String>,
    Vec<u8>,
    Option<Vec<u8>>,
    f64,
    Option<f64>
);

impl Column for bool {
    fn from_sqlite(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Self> {
        row.get(i)
    }
    fn from_postgres(row: &tokio_postgres::Row, i: usize) -> Result<Self, DbError> {
        // Flags are BIGINT 0/1 in both schemas; a computed boolean (`EXISTS`) is a bool.
        match row.try_get::<_, i64>(i) {
            Ok(v) => Ok(v != 0),
            Err(_) => Ok(row.try_get::<_, bool>(i)?),
        }
    }
}

/// A write whose outcome its caller predicts ([`Conn::send_ahead`]).
pub(crate) struct Predicted<'a> {
    /// The single-row statement (run as it is when writes are not sent ahead).
    pub sql: &'a str,
    /// Its set-wise form.
    pub set: &'static SetWise,
    /// The single-row statement's parameters.
    pub args: &'a [Arg<'a>],
    /// The rows it must change (`None`: any number).
    pub expect: Option<u64>,
    /// The rows it writes ([`merge::entity`](crate::merge::entity)).
    pub entities: &'a [u64],
    /// The rows it needs written before it (the identity a link refers to).
    pub after: &'a [u64],
}

/// The reply of a write sent ahead ([`Conn::send_ahead`]): how many rows it changed.
type Reply = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;

/// A write sent ahead, and what its reply must say.
struct Ahead {
    reply: Reply,
    /// The rows it must change; `None`: any number.
    expect: Option<u64>,
    /// What it does, for the message when it did not.
    what: String,
}

/// A PostgreSQL connection and what SQLite's connection tracks by itself.
///
/// The client is tokio-postgres's, driven by a runtime of the connection's own (one
/// thread: the caller's), as the synchronous `postgres` crate does; driving it here lets a
/// write be *sent ahead*: its request leaves at once and its reply is checked with the next
/// statement that waits ([`Conn::send_ahead`]). The server runs requests in the order they
/// were sent, so a read after writes sent ahead sees them.
pub(crate) struct PgConn {
    runtime: tokio::runtime::Runtime,
    client: Arc<tokio_postgres::Client>,
    /// Prepared statements by their SQLite text.
    statements: RefCell<HashMap<String, tokio_postgres::Statement>>,
    /// Whether a transaction is open (`BEGIN` sent, no `COMMIT` or `ROLLBACK` since).
    in_tx: Cell<bool>,
    /// Rows inserted, updated or deleted through this connection (SQLite's
    /// `total_changes`); a write sent ahead counts the rows it is expected to change.
    changes: Cell<u64>,
    /// Writes held to be sent ahead, merged (module `merge`).
    merger: RefCell<Merger<tokio_postgres::Statement>>,
    /// Writes sent ahead whose replies are not checked yet, in the order sent.
    ahead: RefCell<Vec<Ahead>>,
    /// Whether writes may be sent ahead now (the repository speculates).
    sending_ahead: Cell<bool>,
    /// The first write sent ahead that did not go as predicted in this transaction: no
    /// `COMMIT` is sent while it is set, only a `ROLLBACK` clears it.
    mispredicted: RefCell<Option<String>>,
    /// Cursors of [`Conn::each_paged`] open now (one inside another's callback gets the
    /// next name).
    cursors: Cell<u32>,
}

/// Rows a [`Conn::each_paged`] cursor fetches at a time.
const PAGE_ROWS: usize = 10_000;

impl PgConn {
    /// Connects with `config` (and `tls`).
    pub(crate) fn connect<T>(config: &tokio_postgres::Config, tls: T) -> Result<PgConn, DbError>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Send,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| DbError::Shape(format!("starting the database client: {e}")))?;
        let client = block_on_here(&runtime, async {
            let (client, connection) = config.connect(tls).await?;
            // Runs whenever the runtime does: while a statement is waited for.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("repository connection ended: {e}");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        })?;
        Ok(PgConn {
            runtime,
            client: Arc::new(client),
            statements: RefCell::new(HashMap::new()),
            in_tx: Cell::new(false),
            changes: Cell::new(0),
            merger: RefCell::new(Merger::default()),
            ahead: RefCell::new(Vec::new()),
            sending_ahead: Cell::new(false),
            mispredicted: RefCell::new(None),
            cursors: Cell::new(0),
        })
    }

    /// Drives `call` (and the replies of the writes sent ahead) to the end. A write sent
    /// ahead that failed or changed other rows than expected is the error, whatever `call`
    /// gave: the transaction is aborted by then, or holds what was not meant.
    fn wait<T: Send>(
        &self,
        call: impl Future<Output = Result<T, tokio_postgres::Error>> + Send,
    ) -> Result<T, DbError> {
        if !self.merger.borrow().is_empty() {
            self.flush();
        }
        let ahead = std::mem::take(&mut *self.ahead.borrow_mut());
        if ahead.is_empty() {
            return Ok(block_on_here(&self.runtime, call)?);
        }
        let (mispredicted, result) = block_on_here(&self.runtime, async move {
            let replies = futures_util::future::join_all(ahead.into_iter().map(|a| async move {
                let reply = a.reply.await;
                (reply, a.expect, a.what)
            }));
            let (replies, result) = futures_util::future::join(replies, call).await;
            let mispredicted = replies
                .into_iter()
                .find_map(|(reply, expect, what)| match reply {
                    Err(e) => Some(format!("{what}: {}", describe_pg(&e))),
                    Ok(n) if expect.is_some_and(|x| x != n) => Some(format!(
                        "{what}: changed {n} row(s), {} expected",
                        expect.unwrap_or_default()
                    )),
                    Ok(_) => None,
                });
            (mispredicted, result)
        });
        match mispredicted {
            Some(message) => {
                self.mispredicted
                    .borrow_mut()
                    .get_or_insert_with(|| message.clone());
                Err(DbError::Mispredicted(message))
            }
            None => Ok(result?),
        }
    }

    /// Checks the replies of every write sent ahead.
    fn settle(&self) -> Result<(), DbError> {
        self.wait(std::future::ready(Ok(())))?;
        match &*self.mispredicted.borrow() {
            Some(message) => Err(DbError::Mispredicted(message.clone())),
            None => Ok(()),
        }
    }

    fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement, DbError> {
        if let Some(st) = self.statements.borrow().get(sql) {
            return Ok(st.clone());
        }
        let text = to_postgres(sql);
        let client = &self.client;
        let st = self.wait(async move { client.prepare(&text).await })?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    fn query(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<tokio_postgres::Row>, DbError> {
        let st = self.prepare(sql)?;
        let params = pg_params(args);
        let client = &self.client;
        self.wait(async move { client.query(&st, &params).await })
    }

    fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, DbError> {
        let st = self.prepare(sql)?;
        let params = pg_params(args);
        let client = &self.client;
        let n = self.wait(async move { client.execute(&st, &params).await })?;
        self.changes.set(self.changes.get() + n);
        Ok(n)
    }

    fn batch_execute(&self, sql: &str) -> Result<(), DbError> {
        let client = &self.client;
        self.wait(async move { client.batch_execute(sql).await })
    }

    /// A statement prepared for this call only (a `FETCH`, whose rows are those of the
    /// cursor it names: a cached statement would keep the first cursor's columns).
    fn query_once(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>, DbError> {
        let client = &self.client;
        self.wait(async move { client.query(sql, &[]).await })
    }

    /// [`Conn::each_paged`] on PostgreSQL: the query through a cursor, [`PAGE_ROWS`] rows
    /// a fetch, in the caller's transaction or in one of its own (a cursor needs one).
    fn each_paged(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        context: &dyn Fn() -> String,
        f: &mut dyn FnMut(&Row<'_>) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        let depth = self.cursors.get();
        let name = format!("idsync_each_{depth}");
        let own_tx = !self.in_tx.get();
        if own_tx {
            self.batch_execute("BEGIN").with_ctx(context)?;
        }
        self.cursors.set(depth + 1);
        let read = (|| {
            self.execute(&format!("DECLARE {name} NO SCROLL CURSOR FOR {sql}"), args)
                .with_ctx(context)?;
            let fetch = format!("FETCH {PAGE_ROWS} FROM {name}");
            loop {
                let rows = self.query_once(&fetch).with_ctx(context)?;
                for r in &rows {
                    f(&Row::Postgres(r))?;
                }
                if rows.len() < PAGE_ROWS {
                    return Ok(());
                }
            }
        })();
        self.cursors.set(depth);
        let end = match (own_tx, read.is_ok()) {
            (true, true) => "COMMIT",
            (true, false) => "ROLLBACK",
            // The caller's transaction goes on: the name is free for the next cursor.
            (false, _) => &format!("CLOSE {name}"),
        };
        let ended = self.batch_execute(end);
        read?;
        ended.with_ctx(context)
    }

    /// Holds a write to send ahead (see [`Conn::send_ahead`]), merged with others of its
    /// kind (module `merge`).
    fn send_ahead(&self, w: &Predicted<'_>, what: impl FnOnce() -> String) -> Result<(), DbError> {
        let st = self.prepare(w.set.sql)?;
        let full = {
            let mut merger = self.merger.borrow_mut();
            merger.add(w.set, &st, w.args, w.expect, (w.entities, w.after), what)?;
            merger.is_full()
        };
        self.changes.set(self.changes.get() + w.expect.unwrap_or(1));
        if full {
            self.flush();
        }
        Ok(())
    }

    /// Sends the writes held, as set-wise statements, without waiting for their replies.
    fn flush(&self) {
        let groups = self.merger.borrow_mut().take();
        for group in groups {
            let expect = group.expect;
            let what = group.what();
            let st = group.statement.clone();
            let params = group.params();
            let client = Arc::clone(&self.client);
            let mut reply: Reply = Box::pin(async move {
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                client.execute(&st, &refs).await
            });
            // The first poll encodes the request and hands it to the connection, which
            // sends it (in order, before any later statement) the next time the runtime
            // runs; the reply is awaited with the next statement that waits.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if let std::task::Poll::Ready(done) = reply.as_mut().poll(&mut cx) {
                reply = Box::pin(std::future::ready(done));
            }
            self.ahead.borrow_mut().push(Ahead {
                reply,
                expect,
                what,
            });
        }
    }

    /// Whether the connection to the server is gone (a new one is needed).
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Runs `future` on `runtime` to the end. The runtime cannot start inside another one:
/// called from async code (the outbox dispatcher's round), it runs on a scoped thread.
fn block_on_here<T: Send>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send,
) -> T {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(
            |scope| match scope.spawn(|| runtime.block_on(future)).join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            },
        )
    } else {
        runtime.block_on(future)
    }
}

fn pg_params<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    args.iter()
        .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// SQLite's `?N` and `?` parameters as PostgreSQL's `$N` (outside quoted text).
pub(crate) fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 1;
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                out.push('$');
                if digits.is_empty() {
                    out.push_str(&next.to_string());
                    next += 1;
                } else {
                    out.push_str(&digits);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// One connection to the repository's database.
pub(crate) enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgConn>),
}

impl Conn {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The SQLite connection, for what only SQLite has (pragmas, `VACUUM INTO`, hooks).
    pub(crate) fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Conn::Sqlite(c) => Some(c),
            Conn::Postgres(_) => None,
        }
    }

    /// Runs a statement; how many rows it changed.
    pub(crate) fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, DbError> {
        match self {
            Conn::Sqlite(c) => {
                let n = c
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(args.iter()))?;
                Ok(n as u64)
            }
            Conn::Postgres(p) => p.execute(sql, args),
        }
    }

    /// Runs statements without parameters, separated by `;` (schema, transaction control).
    pub(crate) fn batch(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(p) => p.batch_execute(sql),
        }
    }

    /// The first row of a query through `f`, if there is one.
    pub(crate) fn query_row<T>(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Option<T>, DbError> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
                match rows.next()? {
                    Some(r) => f(&Row::Sqlite(r)).map(Some),
                    None => Ok(None),
                }
            }
            Conn::Postgres(p) => {
                let rows = p.query(sql, args)?;
                match rows.first() {
                    Some(r) => f(&Row::Postgres(r)).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    /// The one row a query always returns (`count(*)`, `INSERT … RETURNING`) through `f`.
    pub(crate) fn query_one<T>(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.query_row(sql, args, f)?
            .ok_or_else(|| DbError::Shape("the statement returned no row".to_owned()))
    }

    /// An `INSERT … RETURNING id`: the new row's id, `None` when nothing was inserted (`ON
    /// CONFLICT DO NOTHING`). SQLite runs the statement without its `RETURNING id` (which
    /// would buffer the output in a temporary table each time, a quarter of an initial
    /// load's cost) and reads the connection's last row id instead.
    pub(crate) fn insert_id(&self, sql: &str, args: &[Arg<'_>]) -> Result<Option<i64>, DbError> {
        match self {
            Conn::Sqlite(c) => {
                let plain = sql.strip_suffix(" RETURNING id").ok_or_else(|| {
                    DbError::Shape("insert_id: the statement must end with RETURNING id".to_owned())
                })?;
                let n = c
                    .prepare_cached(plain)?
                    .execute(rusqlite::params_from_iter(args.iter()))?;
                Ok((n > 0).then(|| c.last_insert_rowid()))
            }
            Conn::Postgres(_) => self.query_row(sql, args, |r| r.get(0)),
        }
    }

    /// [`Conn::insert_id`] of a statement that always inserts.
    pub(crate) fn insert_one_id(&self, sql: &str, args: &[Arg<'_>]) -> Result<i64, DbError> {
        self.insert_id(sql, args)?
            .ok_or_else(|| DbError::Shape("the insert returned no id".to_owned()))
    }

    /// Every row of a query through `f`.
    pub(crate) fn query_map<T>(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        let mut out = Vec::new();
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
            }
            Conn::Postgres(p) => {
                for r in p.query(sql, args)? {
                    out.push(f(&Row::Postgres(&r))?);
                }
            }
        }
        Ok(out)
    }

    /// Calls `f` with every row of a query, in order (SQLite: as they are read, so a
    /// million rows are never held at once). `f` may fail with any repository error and
    /// may use the connection; an error of the query itself is reported with `context`.
    pub(crate) fn each(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        context: &dyn Fn() -> String,
        mut f: impl FnMut(&Row<'_>) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        match self {
            Conn::Sqlite(c) => {
                let mut st = c.prepare_cached(sql).with_ctx(context)?;
                let mut rows = st
                    .query(rusqlite::params_from_iter(args.iter()))
                    .with_ctx(context)?;
                while let Some(r) = rows.next().with_ctx(context)? {
                    f(&Row::Sqlite(r))?;
                }
                Ok(())
            }
            Conn::Postgres(p) => {
                for r in p.query(sql, args).with_ctx(context)? {
                    f(&Row::Postgres(&r))?;
                }
                Ok(())
            }
        }
    }

    /// [`Conn::each`] for a query whose result may be large (every shadow of a resource,
    /// every identity, a whole table): PostgreSQL reads it through a cursor, a page at a
    /// time, instead of holding every row at once. A small query is faster with `each`
    /// (one round trip instead of three).
    pub(crate) fn each_paged(
        &self,
        sql: &str,
        args: &[Arg<'_>],
        context: &dyn Fn() -> String,
        mut f: impl FnMut(&Row<'_>) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        match self {
            Conn::Sqlite(_) => self.each(sql, args, context, f),
            Conn::Postgres(p) => p.each_paged(sql, args, context, &mut f),
        }
    }

    /// PostgreSQL's bulk load: `sql` is a `COPY … FROM STDIN` (text format) and `data` its
    /// rows, encoded with [`copy_text`]; how many rows it loaded. SQLite has no such path.
    pub(crate) fn copy_in(&self, sql: &str, data: &[u8]) -> Result<u64, DbError> {
        match self {
            Conn::Sqlite(_) => Err(DbError::Shape("COPY is PostgreSQL's".to_owned())),
            Conn::Postgres(p) => {
                let client = &p.client;
                let data = bytes::Bytes::copy_from_slice(data);
                p.wait(async move {
                    use futures_util::SinkExt as _;
                    let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
                    let mut sink = std::pin::pin!(sink);
                    sink.send(data).await?;
                    sink.finish().await
                })
            }
        }
    }

    /// Whether writes are sent ahead now (PostgreSQL, while the repository speculates:
    /// module `speculation`).
    pub(crate) fn sends_ahead(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(p) => p.sending_ahead.get(),
        }
    }

    /// Starts or stops sending writes ahead (PostgreSQL only; SQLite runs every statement
    /// at once). Stopping checks what was sent.
    pub(crate) fn send_writes_ahead(&self, on: bool) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(_) => Ok(()),
            Conn::Postgres(p) => {
                p.sending_ahead.set(on);
                if on { Ok(()) } else { p.settle() }
            }
        }
    }

    /// A write whose outcome the caller predicts (`w.expect` rows changed; `None`: any
    /// number), while writes are sent ahead ([`Conn::sends_ahead`]): it is held, merged
    /// with others of its kind into one set-wise statement (module `merge`), sent before
    /// the next statement that waits, and its reply checked with that statement (at the
    /// latest before `COMMIT`). A failure or another row count is
    /// [`DbError::Mispredicted`]: the caller went on as if it had gone as predicted.
    pub(crate) fn send_ahead(
        &self,
        w: &Predicted<'_>,
        what: impl FnOnce() -> String,
    ) -> Result<(), DbError> {
        match self {
            Conn::Postgres(p) if p.sending_ahead.get() => p.send_ahead(w, what),
            _ => Err(DbError::Shape(
                "a write is sent ahead only while the repository speculates".to_owned(),
            )),
        }
    }

    /// A write whose reply the caller does not use (`w.expect` is `None`): sent ahead
    /// while writes are, run at once otherwise.
    pub(crate) fn write(
        &self,
        w: &Predicted<'_>,
        what: impl FnOnce() -> String,
    ) -> Result<(), DbError> {
        if self.sends_ahead() {
            self.send_ahead(w, what)
        } else {
            self.execute(w.sql, w.args).map(drop)
        }
    }

    /// Whether a transaction is open.
    pub(crate) fn in_transaction(&self) -> bool {
        match self {
            Conn::Sqlite(c) => !c.is_autocommit(),
            Conn::Postgres(p) => p.in_tx.get(),
        }
    }

    /// Runs transaction control (`BEGIN …`, `COMMIT`, `ROLLBACK`, savepoints) and keeps
    /// track of whether a transaction is open.
    pub(crate) fn control(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(c) => {
                c.prepare_cached(sql)?.execute([])?;
                Ok(())
            }
            Conn::Postgres(p) => {
                let upper = sql.trim_start().to_ascii_uppercase();
                if upper == "ROLLBACK" {
                    // What was sent ahead is undone with the rest: its replies do not
                    // matter any more (they are still read, in order).
                    let _ = p.settle();
                    p.mispredicted.borrow_mut().take();
                } else if let Err(e) = p.settle() {
                    // Nothing is committed or released over a wrong guess: the transaction
                    // is ended (as PostgreSQL ends an aborted one at COMMIT).
                    if upper == "COMMIT" {
                        let _ = p.batch_execute("ROLLBACK");
                        p.mispredicted.borrow_mut().take();
                        p.in_tx.set(false);
                    }
                    return Err(e);
                }
                let result = p.batch_execute(sql);
                if upper.starts_with("BEGIN") {
                    p.in_tx.set(result.is_ok());
                    if result.is_err() {
                        // BEGIN passed but what followed it (the write lock) failed: end the
                        // aborted transaction; on a closed connection this fails too.
                        let _ = p.batch_execute("ROLLBACK");
                    }
                } else if upper == "COMMIT" || upper == "ROLLBACK" {
                    // Either way the transaction is over (a failed COMMIT rolls back).
                    p.in_tx.set(false);
                }
                result
            }
        }
    }

    /// Rows inserted, updated or deleted through this connection so far.
    pub(crate) fn total_changes(&self) -> u64 {
        match self {
            Conn::Sqlite(c) => c.total_changes(),
            Conn::Postgres(p) => p.changes.get(),
        }
    }

    /// Whether the connection is gone for good (PostgreSQL: the server closed it).
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(p) => p.is_closed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn parameters_are_rewritten_outside_quotes() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c IN (?, ?) AND d = '?x' AND \"?\" = ?2"),
            "SELECT a FROM t WHERE b = $1 AND c IN ($1, $2) AND d = '?x' AND \"?\" = $2"
        );
    }

    /// A large result read a page at a time: every row once, in order, outside a
    /// transaction and inside one, with another paged read inside the callback, and a
    /// callback's error leaving the connection and the transaction usable.
    #[test]
    fn a_paged_read_sees_every_row_once_in_order() {
        let pg = idsync_testkit::postgres::Postgres::start().unwrap();
        pg.create_database("idsync").unwrap();
        let conn =
            crate::postgres::connect(&pg.url("idsync"), &crate::PgOptions::default()).unwrap();
        conn.batch("CREATE TABLE t AS SELECT g::bigint AS n FROM generate_series(1, 25000) g")
            .unwrap();
        let context = || "reading t".to_owned();
        let read = |from: i64| -> Vec<i64> {
            let mut seen = Vec::new();
            conn.each_paged(
                "SELECT n FROM t WHERE n >= ?1 ORDER BY n",
                crate::args![from],
                &context,
                |r| {
                    seen.push(r.get::<i64>(0).ctx("n")?);
                    Ok(())
                },
            )
            .unwrap();
            seen
        };
        assert_eq!(read(1), (1..=25_000).collect::<Vec<i64>>());
        assert!(!conn.in_transaction(), "its own transaction ended");
        conn.control("BEGIN").unwrap();
        assert_eq!(read(24_990).len(), 11);
        let mut inner = 0;
        conn.each_paged(
            "SELECT n FROM t WHERE n <= 3",
            crate::args![],
            &context,
            |_| {
                inner += read(24_999).len();
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(inner, 6);
        let failed = conn.each_paged("SELECT n FROM t", crate::args![], &context, |_| {
            Err(RepoError::EmptyName)
        });
        assert!(failed.is_err());
        assert_eq!(
            read(25_000),
            vec![25_000],
            "the cursor's name is free again"
        );
        conn.control("COMMIT").unwrap();
    }

    /// An agent paused while the server sends it a reply larger than the sockets' buffers:
    /// its session stays *active* (writing), which the idle-in-transaction timeout does not
    /// end. The session must still end after the agent's timeout, and with it the write
    /// lock every agent's batches share (without `tcp_user_timeout` it never did).
    #[test]
    fn a_paused_client_that_leaves_a_large_reply_unread_loses_its_session() {
        let pg = idsync_testkit::postgres::Postgres::start().unwrap();
        pg.create_database("idsync").unwrap();
        let url = pg.url("idsync");
        let options = crate::PgOptions {
            unresponsive_timeout: Some(Duration::from_secs(2)),
            ..crate::PgOptions::default()
        };
        let paused = crate::postgres::connect(&url, &options).unwrap();
        paused.control("BEGIN").unwrap();
        paused
            .execute("SELECT pg_advisory_xact_lock(?1)", crate::args![42i64])
            .unwrap();
        let Conn::Postgres(p) = &paused else {
            panic!("a PostgreSQL connection")
        };
        let client = Arc::clone(&p.client);
        let mut large = Box::pin(async move {
            client
                .simple_query(
                    "SELECT pg_sleep(0.5); \
                     SELECT repeat('x', 1000) FROM generate_series(1, 100000)",
                )
                .await
        });
        // The request leaves; then nothing reads the connection any more, as in a paused
        // process.
        block_on_here(&p.runtime, async {
            let _ = tokio::time::timeout(Duration::from_millis(100), &mut large).await;
        });
        let watcher = crate::postgres::connect(&url, &crate::PgOptions::default()).unwrap();
        let seen = |sql: &str| -> bool {
            watcher
                .query_one(sql, crate::args![], |r| r.get(0))
                .unwrap()
        };
        let start = std::time::Instant::now();
        while !seen(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
             WHERE application_name = 'idsync' AND wait_event = 'ClientWrite')",
        ) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "never blocked writing"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let blocked = std::time::Instant::now();
        while !seen("SELECT pg_try_advisory_lock(42)") {
            assert!(
                blocked.elapsed() < Duration::from_secs(30),
                "the paused session kept the lock"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(large);
    }
}
