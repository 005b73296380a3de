//! Output a terminal cannot be tricked by: values from feeds and directories (names, keys,
//! attribute values, errors quoting them) may hold escape sequences, carriage returns, NUL or
//! line breaks that would recolour the terminal, overwrite what was printed, or forge lines
//! of the command's output.
//!
//! Two layers: [`inline`] escapes every control character of one value printed inside a
//! line (line breaks included, so a value cannot forge a line), and [`Escaping`] wraps the
//! human-readable output of the commands and escapes every control character but the line
//! breaks and tabs the command writes itself, so that a value printed without [`inline`]
//! still cannot reach the terminal raw. Escapes are written `\u001b`, as JSON writes them,
//! so JSON output passes through [`Escaping`] unharmed (serde_json escapes C0 controls but
//! leaves DEL and the C1 controls raw; this writer escapes those inside its strings).
//!
//! A closed standard output (`idsync run --once | head -1`) ends the output quietly:
//! [`stdout`] and [`line`] write through [`EndQuietly`], which turns the first broken pipe
//! into silence for the rest of the process, so a command finishes its work (every
//! resource of a pass) instead of panicking in `println!` or failing half-way. Rust ignores
//! SIGPIPE, so the closed pipe arrives as an `EPIPE` write error, decided on its
//! [`io::ErrorKind::BrokenPipe`] kind.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `c` is escaped inside a value: C0 and C1 controls and DEL.
fn is_control(c: char) -> bool {
    c.is_control()
}

/// `s` with every control character written as `\n`, `\r`, `\t`, `\0` or `\u00XX`.
pub fn inline(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\0' => out.push_str("\\0"),
        c if is_control(c) => out.push_str(&format!("\\u{:04x}", c as u32)),
        c => out.push(c),
    }
}

/// A writer that escapes every control character but `\n` and `\t` (see the module doc).
/// Text that is not UTF-8 passes through byte by byte, with C0 controls and DEL escaped.
pub struct Escaping<W: Write> {
    inner: W,
    /// A lead byte 0xC2 seen at the end of the last write (C1 controls are 0xC2 0x80-0x9F).
    pending_c2: bool,
}

impl<W: Write> Escaping<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Escaping<W> {
        Escaping {
            inner,
            pending_c2: false,
        }
    }
}

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out: Vec<u8> = Vec::with_capacity(buf.len());
        let mut bytes = buf.iter().copied().peekable();
        if self.pending_c2 {
            self.pending_c2 = false;
            match bytes.peek() {
                Some(b @ 0x80..=0x9f) => {
                    out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                    bytes.next();
                }
                _ => out.push(0xc2),
            }
        }
        while let Some(b) = bytes.next() {
            match b {
                b'\n' | b'\t' => out.push(b),
                0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                0xc2 => match bytes.peek() {
                    Some(next @ 0x80..=0x9f) => {
                        out.extend_from_slice(format!("\\u{next:04x}").as_bytes());
                        bytes.next();
                    }
                    Some(_) => out.push(b),
                    None => self.pending_c2 = true,
                },
                b => out.push(b),
            }
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending_c2 {
            self.pending_c2 = false;
            self.inner.write_all(&[0xc2])?;
        }
        self.inner.flush()
    }
}

impl<W: Write> Drop for Escaping<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Set once standard output turned out closed (a broken pipe): nothing more is written.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether standard output was found closed; the output has ended, the work goes on.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// A writer that treats a broken pipe as the end of the output: the failed write and every
/// later one succeed without writing, and `closed` is set. Other errors pass through.
pub struct EndQuietly<'a, W: Write> {
    inner: W,
    closed: &'a AtomicBool,
}

impl<'a, W: Write> EndQuietly<'a, W> {
    /// Wraps `inner`; `closed` records the broken pipe (shared by every writer on the
    /// same stream).
    pub fn new(inner: W, closed: &'a AtomicBool) -> EndQuietly<'a, W> {
        EndQuietly { inner, closed }
    }

    fn quiet<T>(&self, result: io::Result<T>, nothing: T) -> io::Result<T> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed.store(true, Ordering::Relaxed);
                Ok(nothing)
            }
            other => other,
        }
    }
}

impl<W: Write> Write for EndQuietly<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        let result = self.inner.write(buf);
        self.quiet(result, buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let result = self.inner.flush();
        self.quiet(result, ())
    }
}

/// The commands' human-readable standard output, escaped; a closed pipe ends it quietly.
pub fn stdout() -> Escaping<EndQuietly<'static, io::StdoutLock<'static>>> {
    Escaping::new(EndQuietly::new(io::stdout().lock(), &STDOUT_CLOSED))
}

/// Prints one line on standard output like `println!`, through [`stdout`]: escaped, and
/// silent once the reader has gone. Another write error is reported on stderr once.
pub fn line(args: std::fmt::Arguments<'_>) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    let mut out = stdout();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(e) = written
        && !REPORTED.swap(true, Ordering::Relaxed)
    {
        eprintln!("error: writing to standard output: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_escapes_every_control_character() {
        assert_eq!(inline("plain é"), "plain é");
        assert_eq!(
            inline("a\nb\rc\td\0e\u{1b}[31mf\u{7f}\u{9b}"),
            "a\\nb\\rc\\td\\0e\\u001b[31mf\\u007f\\u009b"
        );
    }

    /// A sink whose reader has gone after `room` bytes.
    struct ClosesAfter {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for ClosesAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() + buf.len() > self.room {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_broken_pipe_ends_the_output_quietly() {
        let closed = AtomicBool::new(false);
        let mut sink = ClosesAfter {
            room: 6,
            got: Vec::new(),
        };
        {
            let mut w = EndQuietly::new(&mut sink, &closed);
            writeln!(w, "one").unwrap();
            writeln!(w, "two").unwrap();
            writeln!(w, "three").unwrap();
            w.flush().unwrap();
        }
        assert!(closed.load(Ordering::Relaxed));
        assert_eq!(sink.got, b"one\n");
        // Other errors still surface.
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let open = AtomicBool::new(false);
        assert!(EndQuietly::new(Full, &open).write_all(b"x").is_err());
        assert!(!open.load(Ordering::Relaxed));
    }

    #[test]
    fn the_writer_keeps_line_breaks_and_escapes_the_rest() {
        let mut out = Vec::new();
        {
            let mut w = Escaping::new(&mut out);
            w.write_all("x\u{1b}]0;title\u{7}\r\0\n".as_bytes())
                .unwrap();
            // A C1 control split across two writes.
            w.write_all(&[b'a', 0xc2]).unwrap();
            w.write_all(&[0x9b, b'b', b'\t', 0xc3, 0xa9, b'\n'])
                .unwrap();
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x\\u001b]0;title\\u0007\\u000d\\u0000\na\\u009bb\té\n"
        );
    }
}
