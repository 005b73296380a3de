//! Turning CSV bytes into rows, one record at a time.
//!
//! Problems with the file as a whole (no header, a missing key column, a duplicate column
//! name) are errors; problems with one record (wrong field count, invalid UTF-8, an empty key,
//! a quoted value spanning lines without `multiline`, a field or record over its size bound)
//! become [`Record::Bad`] so the caller can reject that row and go on with the rest. A bad
//! record says whether it may hide other accounts ([`BadRow::may_hide_accounts`]), which
//! withholds the pass's deletes. No message quotes the file's content (a header may be a
//! password file's first line): lines, column positions, configured names and sizes only.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Cursor;

use csv::{ByteRecord, Position, ReaderBuilder};
use idsync_core::{AdapterError, AttrMap, Value};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::FlatFileConfig;

/// A row that became an account.
#[derive(Debug)]
pub(crate) struct Row {
    /// The (possibly composite) account key.
    pub key: String,
    /// The physical line the record starts on, 1-based.
    pub line: u64,
    /// The content hash of the row's attributes, equal to [`AttrMap::content_hash`] of
    /// `attrs` but computed straight from the fields.
    pub hash: u64,
    /// Column name -> value; empty fields are absent. Only built when asked for
    /// ([`Rows::build_attrs`]): an unchanged row never needs it.
    pub attrs: Option<AttrMap>,
}

/// A record that could not become an account.
#[derive(Debug)]
pub(crate) struct BadRow {
    /// The key, when its fields could still be read.
    pub key: Option<String>,
    /// The physical line the record starts on, 1-based.
    pub line: u64,
    /// The physical line it ends on: after `line` when a quoted value spans lines, so the
    /// record may have swallowed other rows.
    pub last_line: u64,
    /// Why, for the user. Never quotes the record's content: it names lines, columns and
    /// sizes.
    pub reason: String,
}

impl BadRow {
    /// Whether this record may hide accounts: its key could not be read, or it spans
    /// lines (a stray quote swallows the rows up to the next quote). Any account missing
    /// from the file might be in it, so the pass must not delete.
    pub fn may_hide_accounts(&self) -> bool {
        self.key.is_none() || self.last_line > self.line
    }
}

/// One record of the file.
#[derive(Debug)]
pub(crate) enum Record {
    Good(Row),
    Bad(BadRow),
}

/// Streams the records of one CSV buffer.
pub(crate) struct Rows<'a> {
    data: &'a [u8],
    reader: csv::Reader<Cursor<&'a [u8]>>,
    columns: Vec<String>,
    key_index: Vec<usize>,
    trim: bool,
    delimiter: u8,
    /// The quote byte, `None` when quoting is off.
    quote: Option<u8>,
    /// Whether a quoted value may span lines.
    multiline: bool,
    /// `max_field_bytes` and `max_record_bytes`.
    max_field: u64,
    max_record: u64,
    /// Per column: the separator of a multi-valued column.
    separators: Vec<Option<String>>,
    /// Column indexes with their folded names, in the order [`AttrMap::content_hash`] visits.
    hash_order: Vec<(usize, String)>,
    /// Whether good rows carry their attribute map.
    build_attrs: bool,
    /// Where the record returned last started (to read it again with [`Rows::read_at`]).
    last_start: Position,
    record: ByteRecord,
    /// The bytes [`Rows::hash`] hashes, reused from row to row.
    hash_input: RefCell<Vec<u8>>,
}

impl<'a> Rows<'a> {
    /// Reads the header (or takes the configured columns) and checks the key columns.
    /// `data` is the whole file, `shown_path` its path for messages.
    pub fn open(
        data: &'a [u8],
        config: &FlatFileConfig,
        resource: &str,
        shown_path: &str,
    ) -> Result<Rows<'a>, AdapterError> {
        let permanent = |message| AdapterError::Permanent {
            resource: resource.to_owned(),
            message,
        };
        let transient = |message| AdapterError::Transient {
            resource: resource.to_owned(),
            message,
        };
        // A UTF-8 byte order mark is not part of the first column's name or value.
        let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
        let delimiter = u8::try_from(config.delimiter)
            .ok()
            .filter(u8::is_ascii)
            .ok_or_else(|| permanent(format!("delimiter {:?} is not ASCII", config.delimiter)))?;
        let quote = u8::try_from(config.quote)
            .ok()
            .filter(u8::is_ascii)
            .ok_or_else(|| permanent(format!("quote {:?} is not ASCII", config.quote)))?;
        let comment = match config.comment {
            Some(c) => Some(
                u8::try_from(c)
                    .ok()
                    .filter(u8::is_ascii)
                    .ok_or_else(|| permanent(format!("comment {c:?} is not ASCII")))?,
            ),
            None => None,
        };
        let mut reader = ReaderBuilder::new()
            .delimiter(delimiter)
            .quote(quote)
            .quoting(config.quoting)
            .comment(comment)
            .has_headers(config.header)
            .flexible(true)
            .from_reader(Cursor::new(data));

        let columns = match (&config.columns, config.header) {
            (Some(columns), false) => columns.clone(),
            (None, true) => {
                let header = reader.byte_headers().map_err(|e| {
                    transient(format!(
                        "cannot read the header of {shown_path}: {}",
                        describe_csv_error(&e)
                    ))
                })?;
                if header.is_empty() {
                    return Err(transient(format!(
                        "{shown_path} is empty: expected a header line"
                    )));
                }
                let mut columns = Vec::with_capacity(header.len());
                for (i, field) in header.iter().enumerate() {
                    let name = std::str::from_utf8(field).map_err(|_| {
                        permanent(format!(
                            "the header of {shown_path} is not valid UTF-8 (column {})",
                            i + 1
                        ))
                    })?;
                    let name = if config.trim { name.trim() } else { name };
                    if name.is_empty() {
                        return Err(permanent(format!(
                            "column {} in the header of {shown_path} has no name",
                            i + 1
                        )));
                    }
                    columns.push(name.to_owned());
                }
                columns
            }
            _ => {
                return Err(permanent(
                    "columns must be given exactly when `header: false`".to_owned(),
                ));
            }
        };

        // Names from the file are not quoted back in messages (the "header" may be
        // anything at all); positions and the configured names are.
        let mut first_at: HashMap<String, usize> = HashMap::new();
        for (i, name) in columns.iter().enumerate() {
            if let Some(prev) = first_at.insert(name.to_lowercase(), i) {
                return Err(permanent(format!(
                    "columns {} and {} of the header of {shown_path} have the same name \
                     (names are case-insensitive)",
                    prev + 1,
                    i + 1
                )));
            }
        }
        let mut key_index = Vec::with_capacity(config.key.len());
        for key in &config.key {
            match first_at.get(&key.to_lowercase()) {
                Some(&i) => key_index.push(i),
                None => {
                    let found = if config.header {
                        format!(
                            "the header of {shown_path} ({} column{})",
                            columns.len(),
                            if columns.len() == 1 { "" } else { "s" }
                        )
                    } else {
                        format!("`columns` ({})", columns.join(", "))
                    };
                    return Err(permanent(format!("key column '{key}' is not in {found}")));
                }
            }
        }
        if key_index.is_empty() {
            return Err(permanent("no key column is configured".to_owned()));
        }

        let mut separators = vec![None; columns.len()];
        for (column, sep) in &config.multi_valued {
            if let Some(&i) = first_at.get(&column.to_lowercase()) {
                separators[i] = Some(sep.clone());
            }
        }

        let mut hash_order: Vec<(usize, String)> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.to_lowercase()))
            .collect();
        hash_order.sort_by(|a, b| a.1.cmp(&b.1));

        Ok(Rows {
            data,
            reader,
            columns,
            key_index,
            trim: config.trim,
            delimiter,
            quote: config.quoting.then_some(quote),
            multiline: config.multiline,
            max_field: config.max_field_bytes,
            max_record: config.max_record_bytes,
            separators,
            hash_order,
            build_attrs: true,
            last_start: Position::new(),
            record: ByteRecord::new(),
            hash_input: RefCell::new(Vec::with_capacity(512)),
        })
    }

    /// Whether good rows carry their attribute map (default true).
    pub fn build_attrs(&mut self, yes: bool) {
        self.build_attrs = yes;
    }

    /// Where the record returned last started.
    pub fn last_start(&self) -> &Position {
        &self.last_start
    }

    /// Reads the record that starts at `pos` (from [`Rows::last_start`]) again.
    pub fn read_at(&mut self, pos: &Position) -> Result<Option<Record>, String> {
        self.reader.seek(pos.clone()).map_err(|e| {
            format!(
                "cannot go back to line {}: {}",
                pos.line(),
                describe_csv_error(&e)
            )
        })?;
        self.next_record()
    }

    /// The column names, from the header or the config.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The next record, `None` at the end of the file. An error here means the reader cannot
    /// go on at all (never happens on an in-memory buffer, but the diff must not continue
    /// from a partial read: absent rows would become deletes).
    pub fn next_record(&mut self) -> Result<Option<Record>, String> {
        loop {
            let start = self.reader.position().clone();
            match self.reader.read_byte_record(&mut self.record) {
                Ok(false) => return Ok(None),
                Ok(true) => {
                    self.last_start = start.clone();
                    let pos = self.record.position().cloned().unwrap_or(start);
                    let line = self.start_line(pos.byte(), pos.line());
                    if self.ends_inside_quotes(pos.byte()) {
                        // The reader took the rest of the file as one field: every row after
                        // this one is unknown, so no diff (it would delete them) is possible.
                        return Err(format!(
                            "the file ends inside a quoted field of the record on line {line} \
                             (an unbalanced quote, or the file is still being written)"
                        ));
                    }
                    let size = self.reader.position().byte().saturating_sub(pos.byte());
                    if let Some(record) = self.convert(line, size) {
                        return Ok(Some(record));
                    }
                }
                Err(e) => {
                    let reason = describe_csv_error(&e);
                    if self.reader.position().byte() == start.byte() {
                        return Err(format!(
                            "reading stopped at line {}: {reason}",
                            start.line()
                        ));
                    }
                    let line = self.start_line(start.byte(), start.line());
                    return Ok(Some(Record::Bad(BadRow {
                        key: None,
                        line,
                        last_line: line,
                        reason: format!("not valid CSV: {reason}"),
                    })));
                }
            }
        }
    }

    /// The line a record really starts on: the reader's position is where the previous record
    /// ended, before any blank lines the reader skipped.
    fn start_line(&self, byte: u64, line: u64) -> u64 {
        let from = usize::try_from(byte).unwrap_or(usize::MAX);
        let skipped = self.data.get(from..).unwrap_or_default();
        let newlines = skipped
            .iter()
            .take_while(|b| matches!(b, b'\n' | b'\r'))
            .filter(|b| **b == b'\n')
            .count() as u64;
        line + newlines
    }

    /// Whether the record read last, starting at byte `start`, reached the end of the file
    /// inside a quoted field. The CSV reader accepts that silently.
    fn ends_inside_quotes(&self, start: u64) -> bool {
        let end = self.reader.position().byte();
        if usize::try_from(end).ok() != Some(self.data.len()) {
            return false;
        }
        let raw = usize::try_from(start)
            .ok()
            .and_then(|s| self.data.get(s..))
            .unwrap_or_default();
        let Some(quote) = self.quote else {
            return false;
        };
        let (mut in_quotes, mut field_start) = (false, true);
        let mut bytes = raw.iter().peekable();
        while let Some(&b) = bytes.next() {
            if in_quotes {
                if b == quote && bytes.next_if_eq(&&quote).is_none() {
                    in_quotes = false;
                }
            } else if b == quote && field_start {
                in_quotes = true;
                field_start = false;
            } else {
                field_start = b == self.delimiter || b == b'\n' || b == b'\r';
            }
        }
        in_quotes
    }

    /// Turns the current record into a row or a bad row; `None` for a record with no data
    /// at all (every field empty, e.g. `,,,` or a line of spaces), which is skipped. `size`
    /// is the record's length in the file, in bytes.
    fn convert(&self, line: u64, size: u64) -> Option<Record> {
        let record = &self.record;
        // A line break inside a field: a quoted value spans lines (`\r` alone ends a line
        // for the reader too).
        let raw = record.as_slice();
        let breaks = raw.contains(&b'\n') || raw.contains(&b'\r');
        let last_line = if breaks {
            let newlines = raw.iter().filter(|b| **b == b'\n').count() as u64;
            line + newlines.max(1)
        } else {
            line
        };
        let bad = |key: Option<String>, reason: String| {
            Some(Record::Bad(BadRow {
                key,
                line,
                last_line,
                reason,
            }))
        };
        let lines = || {
            if last_line > line {
                format!("lines {line}-{last_line}")
            } else {
                format!("line {line}")
            }
        };
        if size > self.max_record {
            // Neither its key nor the rows it may hold can be trusted.
            return bad(
                None,
                format!(
                    "the record on {} is {size} bytes, more than max_record_bytes {}",
                    lines(),
                    self.max_record
                ),
            );
        }

        let mut texts: Vec<Option<&str>> = Vec::with_capacity(record.len());
        let mut not_utf8 = Vec::new();
        let mut too_long = Vec::new();
        // The record keeps its fields back to back in one buffer, cut at ASCII delimiters:
        // if the buffer is valid UTF-8, each field is a slice of it at character
        // boundaries. One check per record instead of one per field; an invalid record is
        // checked field by field, to name the columns.
        let whole = std::str::from_utf8(raw).ok();
        let mut offset = 0;
        for (i, field) in record.iter().enumerate() {
            let end = offset + field.len();
            if field.len() as u64 > self.max_field {
                too_long.push(i);
            }
            let text = whole
                .and_then(|w| w.get(offset..end))
                .or_else(|| std::str::from_utf8(field).ok());
            offset = end;
            match text {
                Some(s) => texts.push(Some(if self.trim { s.trim() } else { s })),
                None => {
                    texts.push(None);
                    not_utf8.push(self.column_name(i));
                }
            }
        }
        if not_utf8.is_empty() && texts.iter().all(|t| t.is_some_and(|s| s.trim().is_empty())) {
            return None;
        }

        // The first field that holds a line break: key columns after it belong to whatever
        // row closed the quote, so they are not this record's key.
        let first_break = if breaks {
            record
                .iter()
                .position(|f| f.contains(&b'\n') || f.contains(&b'\r'))
        } else {
            None
        };
        let key_parts: Vec<Option<&str>> = self
            .key_index
            .iter()
            .map(|&i| texts.get(i).copied().flatten().filter(|s| !s.is_empty()))
            .collect();
        let key_trusted = self
            .key_index
            .iter()
            .all(|i| first_break.is_none_or(|b| *i < b) && !too_long.contains(i));
        let key = match key_parts.as_slice() {
            _ if !key_trusted => None,
            [one] => one.map(str::to_owned),
            parts => parts
                .iter()
                .copied()
                .collect::<Option<Vec<&str>>>()
                .map(|parts| join_key(&parts)),
        };

        if !too_long.is_empty() {
            let sizes: Vec<String> = too_long
                .iter()
                .map(|&i| {
                    let len = record.get(i).map_or(0, <[u8]>::len);
                    format!("'{}' ({len} bytes)", self.column_name(i))
                })
                .collect();
            return bad(
                key,
                format!(
                    "the value in column{} {} is more than max_field_bytes {}",
                    if sizes.len() == 1 { "" } else { "s" },
                    sizes.join(", "),
                    self.max_field
                ),
            );
        }
        if let Some(b) = first_break
            && !self.multiline
        {
            return bad(
                key,
                format!(
                    "a quoted value in column '{}' opens on line {line} and runs to line \
                     {last_line}; values spanning lines are not allowed (`multiline: true` \
                     allows them): is a quote unbalanced?",
                    self.column_name(b)
                ),
            );
        }
        if record.len() != self.columns.len() {
            let mut reason = format!(
                "has {} fields, expected {} ({})",
                record.len(),
                self.columns.len(),
                self.columns.join(", ")
            );
            if last_line > line {
                reason.push_str(&format!(
                    "; the record spans lines {line}-{last_line}: is a quote unbalanced?"
                ));
            }
            return bad(key, reason);
        }
        if !not_utf8.is_empty() {
            let reason = format!(
                "not valid UTF-8 in column{} {}",
                if not_utf8.len() == 1 { "" } else { "s" },
                quoted_list(&not_utf8)
            );
            return bad(key, reason);
        }
        let Some(key) = key else {
            let empty: Vec<&str> = self
                .key_index
                .iter()
                .zip(&key_parts)
                .filter(|(_, part)| part.is_none())
                .map(|(&i, _)| self.column_name(i))
                .collect();
            let reason = format!(
                "empty key column{} {}",
                if empty.len() == 1 { "" } else { "s" },
                quoted_list(&empty)
            );
            return bad(None, reason);
        };

        let hash = self.hash(&texts);
        let attrs = self.build_attrs.then(|| {
            let mut attrs = AttrMap::new();
            for ((name, text), sep) in self.columns.iter().zip(&texts).zip(&self.separators) {
                let Some(text) = text.filter(|t| !t.is_empty()) else {
                    continue;
                };
                match sep {
                    None => attrs.set_text(name, text),
                    Some(sep) => {
                        let values: Vec<Value> = self.split(text, sep).map(Value::from).collect();
                        if !values.is_empty() {
                            attrs.set(name, values);
                        }
                    }
                }
            }
            debug_assert_eq!(
                attrs.content_hash(),
                hash,
                "row hash differs from the map's"
            );
            attrs
        });
        Some(Record::Good(Row {
            key,
            line,
            hash,
            attrs,
        }))
    }

    /// The values of a multi-valued field.
    fn split<'t>(&self, text: &'t str, sep: &'t str) -> impl Iterator<Item = &'t str> {
        let trim = self.trim;
        text.split(sep)
            .map(move |v| if trim { v.trim() } else { v })
            .filter(|v| !v.is_empty())
    }

    /// [`AttrMap::content_hash`] of the row's attributes, without building the map: the same
    /// bytes (folded names sorted, each field length-prefixed, see
    /// [`idsync_core::attrs::hash_field`]) gathered in one buffer and hashed at once.
    fn hash(&self, texts: &[Option<&str>]) -> u64 {
        use idsync_core::attrs::hash_field as field;
        let mut h = self.hash_input.borrow_mut();
        let h = &mut *h;
        h.clear();
        for (i, folded) in &self.hash_order {
            let Some(text) = texts.get(*i).copied().flatten().filter(|t| !t.is_empty()) else {
                continue;
            };
            match self.separators.get(*i).and_then(Option::as_deref) {
                None => {
                    field(h, 0, folded.as_bytes());
                    h.extend_from_slice(&1u64.to_le_bytes());
                    field(h, 1, text.as_bytes());
                }
                Some(sep) => {
                    let count = self.split(text, sep).count() as u64;
                    if count == 0 {
                        continue;
                    }
                    field(h, 0, folded.as_bytes());
                    h.extend_from_slice(&count.to_le_bytes());
                    for v in self.split(text, sep) {
                        field(h, 1, v.as_bytes());
                    }
                }
            }
        }
        xxh3_64(h)
    }

    fn column_name(&self, i: usize) -> &str {
        self.columns.get(i).map_or("(extra field)", String::as_str)
    }
}

/// Joins composite key parts with `+`, escaping `\` as `\\` and `+` as `\+`, so distinct
/// part lists never give the same key. A single part is the key itself.
pub(crate) fn join_key(parts: &[&str]) -> String {
    if let [only] = parts {
        return (*only).to_owned();
    }
    let mut key = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push('+');
        }
        for c in part.chars() {
            if matches!(c, '\\' | '+') {
                key.push('\\');
            }
            key.push(c);
        }
    }
    key
}

/// A CSV reader error for the user, from its kind: never the record's content (the csv
/// crate's messages do not quote it today, but that is not theirs to decide here).
pub(crate) fn describe_csv_error(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Io(io) => format!("read error: {io}"),
        csv::ErrorKind::Utf8 { err, .. } => format!(
            "invalid UTF-8 in field {} near byte {}",
            err.field() + 1,
            err.valid_up_to()
        ),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("a record has {len} fields, expected {expected_len}"),
        csv::ErrorKind::Seek => "cannot seek in the file".to_owned(),
        _ => "unreadable record".to_owned(),
    }
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_key_escapes() {
        assert_eq!(join_key(&["a+b"]), "a+b");
        assert_eq!(join_key(&["a", "b"]), "a+b");
        assert_eq!(join_key(&["a+", "b"]), "a\\++b");
        assert_eq!(join_key(&["a", "+b"]), "a+\\+b");
        assert_eq!(join_key(&["a\\", "b"]), "a\\\\+b");
        assert_ne!(join_key(&["a+", "b"]), join_key(&["a", "+b"]));
    }
}
