//! Tests of the whole fetch: temp files against a fake repository of known accounts.

use std::collections::HashMap;
use std::path::PathBuf;

use idsync_core::{
    Adapter, AdapterError, AttrMap, ChangeBatch, ChangeEvent, Checkpoint, Fetch, KnownAccounts, Op,
    Reject,
};
use tempfile::TempDir;

use super::*;

/// The repository's last seen accounts of one resource, as the engine would keep them.
#[derive(Default)]
struct Known {
    accounts: HashMap<String, AttrMap>,
    broken: bool,
}

impl KnownAccounts for Known {
    fn each_known_hash(
        &self,
        resource: &str,
        each: &mut dyn FnMut(&str, u64),
    ) -> Result<(), String> {
        assert_eq!(resource, "hr");
        if self.broken {
            return Err("database is locked".into());
        }
        for (k, a) in &self.accounts {
            each(k, a.content_hash());
        }
        Ok(())
    }

    fn known_attrs(&self, resource: &str, key: &str) -> Result<Option<AttrMap>, String> {
        assert_eq!(resource, "hr");
        Ok(self.accounts.get(key).cloned())
    }
}

impl Known {
    /// Applies a batch the way the engine commits it.
    fn commit(&mut self, batch: &ChangeBatch) {
        for e in &batch.events {
            match e.op {
                Op::Delete => {
                    self.accounts.remove(&e.key);
                }
                _ => {
                    self.accounts.insert(e.key.clone(), e.attrs.clone());
                }
            }
        }
    }

    fn with(mut self, key: &str, attrs: &[(&str, &str)]) -> Self {
        self.accounts
            .insert(key.to_owned(), attrs.iter().copied().collect());
        self
    }
}

struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    adapter: FlatFileAdapter,
}

impl Fixture {
    fn new(content: &[u8]) -> Self {
        Self::with_config(content, |_| {})
    }

    fn with_config(content: &[u8], adjust: impl FnOnce(&mut FlatFileConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hr.csv");
        std::fs::write(&path, content).unwrap();
        let mut config = FlatFileConfig::new(&path, &["id"]);
        // The tests write whole files before fetching; settle waiting is tested apart.
        config.completion = Completion::Rename;
        adjust(&mut config);
        Fixture {
            _dir: dir,
            adapter: FlatFileAdapter::new("hr", config),
            path,
        }
    }

    fn write(&self, content: &[u8]) {
        std::fs::write(&self.path, content).unwrap();
    }

    fn fetch(&mut self, after: Option<&Checkpoint>, known: &Known) -> Fetch {
        self.adapter.next_batch(after, known).unwrap()
    }

    fn batch(&mut self, after: Option<&Checkpoint>, known: &Known) -> ChangeBatch {
        match self.fetch(after, known) {
            Fetch::Batch(b) => b,
            Fetch::Idle => panic!("expected a batch, got Idle"),
        }
    }

    fn error(&mut self, after: Option<&Checkpoint>, known: &Known) -> AdapterError {
        self.adapter.next_batch(after, known).unwrap_err()
    }
}

fn attrs(pairs: &[(&str, &str)]) -> AttrMap {
    pairs.iter().copied().collect()
}

/// `(op, key, origin)` of every event.
fn summary(batch: &ChangeBatch) -> Vec<(Op, &str, &str)> {
    batch
        .events
        .iter()
        .map(|e| (e.op, e.key.as_str(), e.origin.as_deref().unwrap_or("")))
        .collect()
}

fn reject(key: Option<&str>, origin: &str, reason: &str) -> Reject {
    Reject {
        key: key.map(str::to_owned),
        origin: origin.to_owned(),
        reason: reason.to_owned(),
    }
}

#[test]
fn first_run_upserts_then_unchanged_file_is_idle() {
    let mut f = Fixture::new(b"id,cn,mail\nE1,Ann Lee,ann@x\nE2,Bo Li,\n");
    let mut known = Known::default();
    let batch = f.batch(None, &known);
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:2"),
            (Op::Upsert, "E2", "hr.csv:3")
        ]
    );
    assert_eq!(
        batch.events[0],
        ChangeEvent {
            resource: "hr".into(),
            key: "E1".into(),
            op: Op::Upsert,
            attrs: attrs(&[("id", "E1"), ("cn", "Ann Lee"), ("mail", "ann@x")]),
            previous: None,
            origin: Some("hr.csv:2".into()),
        }
    );
    // An empty field is an absent attribute.
    assert_eq!(
        batch.events[1].attrs,
        attrs(&[("id", "E2"), ("cn", "Bo Li")])
    );
    assert!(batch.rejects.is_empty() && batch.held_keys.is_empty());

    let checkpoint = batch.checkpoint.clone().unwrap();
    assert!(checkpoint.0.starts_with("xxh3:"));
    assert!(checkpoint.0[5..21].chars().all(|c| c.is_ascii_hexdigit()));

    known.commit(&batch);
    assert_eq!(f.fetch(Some(&checkpoint), &known), Fetch::Idle);
}

#[test]
fn lost_batch_is_produced_again() {
    let mut f = Fixture::new(b"id,cn\nE1,Ann\n");
    let known = Known::default();
    let first = f.batch(None, &known);
    // Not committed: the same fetch gives the same batch.
    assert_eq!(f.batch(None, &known), first);
}

#[test]
fn create_update_delete_with_previous_attributes() {
    let mut f = Fixture::new(b"id,cn,title\nE1,Ann,Clerk\nE2,Bo,Chef\nE3,Cy,Cook\n");
    let mut known = Known::default();
    let first = f.batch(None, &known);
    known.commit(&first);
    let after = first.checkpoint.unwrap();

    // E1 changes title and loses nothing, E2 is gone, E3 unchanged, E4 is new.
    f.write(b"id,cn,title\nE4,Di,Baker\nE3,Cy,Cook\nE1,Ann,Manager\n");
    let batch = f.batch(Some(&after), &known);
    assert_eq!(
        summary(&batch),
        [
            (Op::Create, "E4", "hr.csv:2"),
            (Op::Update, "E1", "hr.csv:4"),
            (Op::Delete, "E2", "hr.csv"),
        ]
    );
    let update = &batch.events[1];
    assert_eq!(
        update.attrs,
        attrs(&[("id", "E1"), ("cn", "Ann"), ("title", "Manager")])
    );
    assert_eq!(
        update.previous,
        Some(attrs(&[("id", "E1"), ("cn", "Ann"), ("title", "Clerk")]))
    );
    assert_eq!(batch.events[0].previous, None);
    let delete = &batch.events[2];
    let e2 = attrs(&[("id", "E2"), ("cn", "Bo"), ("title", "Chef")]);
    assert_eq!(delete.attrs, e2);
    assert_eq!(delete.previous, Some(e2));
    assert_ne!(batch.checkpoint, Some(after));
}

#[test]
fn no_checkpoint_still_updates_known_accounts_and_deletes_missing_ones() {
    let mut f = Fixture::new(b"id,cn\nE1,Ann\nE2,Bo\nE3,Cy\n");
    let known = Known::default()
        .with("E1", &[("id", "E1"), ("cn", "Ann")])
        .with("E2", &[("id", "E2"), ("cn", "Bob")])
        .with("E9", &[("id", "E9")])
        .with("E0", &[("id", "E0")]);
    let batch = f.batch(None, &known);
    assert_eq!(
        summary(&batch),
        [
            (Op::Update, "E2", "hr.csv:3"),
            (Op::Upsert, "E3", "hr.csv:4"),
            (Op::Delete, "E0", "hr.csv"),
            (Op::Delete, "E9", "hr.csv"),
        ]
    );
    assert_eq!(
        batch.events[0].previous,
        Some(attrs(&[("id", "E2"), ("cn", "Bob")]))
    );
}

#[test]
fn composite_key_is_escaped() {
    let mut f = Fixture::with_config(
        b"company,id,cn\nacme,7,Ann\nac+me,7,Bo\nac\\,me+7,Cy\n",
        |c| c.key = vec!["company".into(), "id".into()],
    );
    let batch = f.batch(None, &Known::default());
    let keys: Vec<&str> = batch.events.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["acme+7", "ac\\+me+7", "ac\\\\+me\\+7"]);
}

#[test]
fn key_columns_match_the_header_case_insensitively() {
    let mut f = Fixture::with_config(b"ID,cn\nE1,Ann\n", |c| c.key = vec!["id".into()]);
    let batch = f.batch(None, &Known::default());
    assert_eq!(batch.events[0].key, "E1");
    assert_eq!(batch.events[0].attrs.attr("id").unwrap().name, "ID");
}

#[test]
fn wrong_field_count_is_rejected_and_good_rows_flow() {
    let mut f = Fixture::new(b"id,cn,mail\nE1,Ann,a@x\nE2,Bo\nE3,Cy,c@x,extra\n,,\nE4,Di,d@x\n");
    let known = Known::default().with("E2", &[("id", "E2"), ("cn", "Bo")]);
    let batch = f.batch(None, &known);
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:2"),
            (Op::Upsert, "E4", "hr.csv:6")
        ]
    );
    assert_eq!(
        batch.rejects,
        [
            reject(
                Some("E2"),
                "hr.csv:3",
                "has 2 fields, expected 3 (id, cn, mail)"
            ),
            reject(
                Some("E3"),
                "hr.csv:4",
                "has 4 fields, expected 3 (id, cn, mail)"
            ),
        ]
    );
    // E2 is known and its row is bad: it is held, not deleted.
    assert_eq!(batch.held_keys, ["E2", "E3"]);
}

#[test]
fn unbalanced_quote_spanning_lines_is_hinted() {
    let content = b"id,cn,mail\nE1,\"Ann,a@x\nE2,Bo,b@x\nE3\",Cy,c@x\nE4,Di,d@x\n";
    let mut f = Fixture::new(content);
    let batch = f.batch(None, &Known::default());
    assert_eq!(summary(&batch), [(Op::Upsert, "E4", "hr.csv:5")]);
    assert_eq!(
        batch.rejects,
        [reject(
            Some("E1"),
            "hr.csv:2",
            "a quoted value in column 'cn' opens on line 2 and runs to line 4; values \
             spanning lines are not allowed (`multiline: true` allows them): is a quote \
             unbalanced?"
        )]
    );
    // With multi-line values allowed, the field count still gives it away.
    let mut f = Fixture::with_config(content, |c| c.multiline = true);
    let batch = f.batch(None, &Known::default());
    assert_eq!(summary(&batch), [(Op::Upsert, "E4", "hr.csv:5")]);
    assert_eq!(
        batch.rejects,
        [reject(
            Some("E1"),
            "hr.csv:2",
            "has 4 fields, expected 3 (id, cn, mail); \
             the record spans lines 2-4: is a quote unbalanced?"
        )]
    );
}

/// Six known accounts E1..E6, one row each (`cn`, `title`).
fn six_known() -> Known {
    (1..=6).fold(Known::default(), |k, i| {
        let key = format!("E{i}");
        let cn = format!("P{i}");
        k.with(&key, &[("id", &key), ("cn", &cn), ("title", "Clerk")])
    })
}

#[test]
fn stray_quote_swallowing_rows_deletes_nothing_and_good_rows_flow() {
    // The quote opened on line 3 closes on line 5 with the field count right: without the
    // rule, E2 would get a three-line `cn` and E3, E4 would be deleted.
    let mut f = Fixture::new(
        b"id,cn,title\nE1,P1,Clerk\nE2,\"P2,Clerk\nE3,P3,Clerk\nE4,P4\",Clerk\n\
          E5,P5,Clerk\nE6,P6,Boss\n",
    );
    let known = six_known();
    let batch = f.batch(Some(&Checkpoint("xxh3:0000000000000000".into())), &known);
    assert_eq!(summary(&batch), [(Op::Update, "E6", "hr.csv:7")]);
    assert_eq!(
        batch.rejects,
        [reject(
            Some("E2"),
            "hr.csv:3",
            "a quoted value in column 'cn' opens on line 3 and runs to line 5; values \
             spanning lines are not allowed (`multiline: true` allows them): is a quote \
             unbalanced?"
        )]
    );
    assert_eq!(batch.held_keys, ["E2"]);
}

#[test]
fn rejected_row_without_a_readable_key_withholds_every_delete() {
    // E4's key is empty on line 5: E4 (and E3, really gone) are kept this pass.
    let mut f = Fixture::new(
        b"id,cn,title\nE1,P1,Clerk\nE2,P2,Boss\nE5,P5,Clerk\n,P4,Clerk\nE6,P6,Clerk\nE7,P7,Clerk\n",
    );
    let known = six_known();
    let after = Checkpoint("xxh3:0000000000000000".into());
    let batch = f.batch(Some(&after), &known);
    assert_eq!(
        summary(&batch),
        [
            (Op::Update, "E2", "hr.csv:3"),
            (Op::Create, "E7", "hr.csv:7")
        ]
    );
    assert_eq!(
        batch.rejects,
        [reject(None, "hr.csv:5", "empty key column 'id'")]
    );
    // Fixed: the deletes of what is really gone come back.
    f.write(b"id,cn,title\nE1,P1,Clerk\nE2,P2,Boss\nE5,P5,Clerk\nE4,P4,Clerk\nE6,P6,Clerk\nE7,P7,Clerk\n");
    let batch = f.batch(Some(&after), &known);
    assert!(
        summary(&batch).contains(&(Op::Delete, "E3", "hr.csv")),
        "{:?}",
        summary(&batch)
    );
    assert_eq!(
        batch.events.iter().filter(|e| e.op == Op::Delete).count(),
        1
    );
}

#[test]
fn oversized_field_and_record_are_rejected_without_their_content() {
    let long = "x".repeat(40);
    let content = format!("id,cn\nE1,{long}\nE2,Bo\n{long},Cy\n");
    let mut f = Fixture::with_config(content.as_bytes(), |c| c.max_field_bytes = 32);
    let known = Known::default().with("E9", &[("id", "E9")]);
    let batch = f.batch(None, &known);
    assert_eq!(summary(&batch), [(Op::Upsert, "E2", "hr.csv:3")]);
    assert_eq!(
        batch.rejects,
        [
            reject(
                Some("E1"),
                "hr.csv:2",
                "the value in column 'cn' (40 bytes) is more than max_field_bytes 32"
            ),
            reject(
                None,
                "hr.csv:4",
                "the value in column 'id' (40 bytes) is more than max_field_bytes 32"
            ),
        ]
    );
    assert_eq!(batch.held_keys, ["E1"]);

    let mut f = Fixture::with_config(content.as_bytes(), |c| c.max_record_bytes = 40);
    let batch = f.batch(None, &known);
    assert_eq!(summary(&batch), [(Op::Upsert, "E2", "hr.csv:3")]);
    assert_eq!(
        batch.rejects,
        [
            reject(
                None,
                "hr.csv:2",
                "the record on line 2 is 44 bytes, more than max_record_bytes 40"
            ),
            reject(
                None,
                "hr.csv:4",
                "the record on line 4 is 44 bytes, more than max_record_bytes 40"
            ),
        ]
    );
}

#[test]
fn feed_path_that_is_not_a_regular_file_is_refused_without_its_content() {
    let mut f = Fixture::new(b"id\nE1\n");
    let secret = f.path.with_file_name("secret");
    std::fs::write(&secret, "s3cr3t-password-line\n").unwrap();
    std::fs::remove_file(&f.path).unwrap();
    std::os::unix::fs::symlink(&secret, &f.path).unwrap();
    let err = f.error(None, &Known::default());
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("is a symbolic link: refused"),
        "{err}"
    );
    assert!(!err.to_string().contains("s3cr3t"), "{err}");

    std::fs::remove_file(&f.path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&f.path)
        .status()
        .unwrap();
    assert!(made.success());
    let err = f.error(None, &Known::default());
    assert!(
        err.to_string()
            .contains("is a FIFO (named pipe), not a regular file"),
        "{err}"
    );
}

#[test]
fn cut_last_line_is_transient_and_stores_nothing() {
    let mut f = Fixture::new(b"id,title\nE1,Engineer\nE2,Engin");
    let known = Known::default()
        .with("E1", &[("id", "E1"), ("title", "Engineer")])
        .with("E2", &[("id", "E2"), ("title", "Engineer")])
        .with("E3", &[("id", "E3"), ("title", "Engineer")]);
    let err = f.error(None, &known);
    assert!(err.is_transient());
    assert!(
        err.to_string()
            .contains("is incomplete: its last line (line 3)"),
        "{err}"
    );
    assert!(!err.to_string().contains("Engin"), "{err}");
}

#[test]
fn file_ending_inside_quotes_is_transient() {
    // Rows after the open quote are unknown: diffing would delete E2 and E3.
    let mut f = Fixture::new(b"id,cn\nE1,\"Ann\nE2,Bo\nE3,Cy\n");
    let known = Known::default().with("E2", &[("id", "E2")]);
    let err = f.error(None, &known);
    assert!(err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "resource hr: {}: the file ends inside a quoted field of the record on line 2 \
             (an unbalanced quote, or the file is still being written)",
            f.path.display()
        )
    );

    // A closed quote at the very end is fine; without a final line end only when the
    // resource does not require one.
    f.write(b"id,cn\nE1,\"Ann\"\n");
    assert_eq!(f.batch(None, &Known::default()).events.len(), 1);
    let mut f = Fixture::with_config(b"id,cn\nE1,\"Ann \"\"A\"\"\"", |c| {
        c.require_final_newline = false;
    });
    assert_eq!(f.batch(None, &Known::default()).events.len(), 1);
}

#[test]
fn invalid_utf8_row_is_rejected_with_its_key() {
    let mut f =
        Fixture::new(b"id,cn,sn\nE1,Ann,Lee\nE2,Bj\xf6rn,M\xfcller\nE3,Cy,Wu\n\xff,Di,Do\n");
    let batch = f.batch(None, &Known::default());
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:2"),
            (Op::Upsert, "E3", "hr.csv:4")
        ]
    );
    assert_eq!(
        batch.rejects,
        [
            reject(
                Some("E2"),
                "hr.csv:3",
                "not valid UTF-8 in columns 'cn', 'sn'"
            ),
            reject(None, "hr.csv:5", "not valid UTF-8 in column 'id'"),
        ]
    );
    assert_eq!(batch.held_keys, ["E2"]);
}

#[test]
fn empty_key_is_rejected() {
    let mut f = Fixture::with_config(b"a,b,cn\nx,,Ann\n,,Bo\nx,y,Cy\n", |c| {
        c.key = vec!["a".into(), "b".into()];
    });
    let batch = f.batch(None, &Known::default());
    assert_eq!(summary(&batch), [(Op::Upsert, "x+y", "hr.csv:4")]);
    assert_eq!(
        batch.rejects,
        [
            reject(None, "hr.csv:2", "empty key column 'b'"),
            reject(None, "hr.csv:3", "empty key columns 'a', 'b'"),
        ]
    );
    assert!(batch.held_keys.is_empty());
}

#[test]
fn duplicate_key_rejects_every_row_and_holds_the_account() {
    let mut f = Fixture::new(b"id,cn\nE100,Ann\nE2,Bo\nE3,Cy\nE100,Anne\nE100,Annie\n");
    let known = Known::default()
        .with("E100", &[("id", "E100"), ("cn", "Ann")])
        .with("E3", &[("id", "E3"), ("cn", "Cy")]);
    let batch = f.batch(Some(&Checkpoint("xxh3:0000000000000000".into())), &known);
    // No event at all for E100: no update, and above all no delete.
    assert_eq!(summary(&batch), [(Op::Create, "E2", "hr.csv:3")]);
    assert_eq!(
        batch.rejects,
        [
            reject(
                Some("E100"),
                "hr.csv:2",
                "duplicate key 'E100' also on lines 5, 6"
            ),
            reject(
                Some("E100"),
                "hr.csv:5",
                "duplicate key 'E100' also on lines 2, 6"
            ),
            reject(
                Some("E100"),
                "hr.csv:6",
                "duplicate key 'E100' also on lines 2, 5"
            ),
        ]
    );
    assert_eq!(batch.held_keys, ["E100"]);
}

#[test]
fn good_row_sharing_a_key_with_a_bad_row_is_held() {
    let mut f = Fixture::new(b"id,cn\nE1,Ann\nE1,Ann,extra\n");
    let batch = f.batch(None, &Known::default());
    assert!(batch.events.is_empty());
    assert_eq!(
        batch.rejects,
        [
            reject(Some("E1"), "hr.csv:2", "duplicate key 'E1' also on line 3"),
            reject(Some("E1"), "hr.csv:3", "has 3 fields, expected 2 (id, cn)"),
        ]
    );
    assert_eq!(batch.held_keys, ["E1"]);
}

#[test]
fn missing_key_column_is_permanent() {
    let mut f = Fixture::with_config(b"a,b,c\n1,2,3\n", |c| c.key = vec!["emp_id".into()]);
    let err = f.error(None, &Known::default());
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "resource hr: key column 'emp_id' is not in the header of {} (3 columns)",
            f.path.display()
        )
    );
}

#[test]
fn duplicate_or_empty_column_name_is_permanent() {
    let mut f = Fixture::new(b"id,Mail,mail\n1,2,3\n");
    let err = f.error(None, &Known::default());
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "resource hr: columns 2 and 3 of the header of {} have the same name \
             (names are case-insensitive)",
            f.path.display()
        )
    );

    f.write(b"id,cn,\n1,2,\n");
    let err = f.error(None, &Known::default());
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("column 3 in the header of"),
        "{err}"
    );
}

#[test]
fn missing_or_empty_file_is_transient() {
    let mut f = Fixture::new(b"");
    let err = f.error(None, &Known::default());
    assert!(err.is_transient());
    assert_eq!(
        err.to_string(),
        format!(
            "resource hr: {} is empty: expected a header line",
            f.path.display()
        )
    );

    std::fs::remove_file(&f.path).unwrap();
    let err = f.error(None, &Known::default());
    assert!(err.is_transient());
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("resource hr: cannot read {}: ", f.path.display())),
        "{text}"
    );
}

#[test]
fn known_accounts_failure_is_transient() {
    let mut f = Fixture::new(b"id\nE1\n");
    let known = Known {
        broken: true,
        ..Known::default()
    };
    let err = f.error(None, &known);
    assert!(err.is_transient());
    assert!(err.to_string().contains("database is locked"), "{err}");
}

#[test]
fn invalid_config_is_permanent() {
    let mut f = Fixture::with_config(b"id\nE1\n", |c| c.key.clear());
    let err = f.error(None, &Known::default());
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        "resource hr: invalid config: key: at least one key column is required"
    );
}

#[test]
fn no_header_with_columns() {
    let mut f = Fixture::with_config(b"E1;Ann;a@x\nE2;Bo\nE3;Cy;c@x\n", |c| {
        c.header = false;
        c.columns = Some(vec!["id".into(), "cn".into(), "mail".into()]);
        c.delimiter = ';';
    });
    let batch = f.batch(None, &Known::default());
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:1"),
            (Op::Upsert, "E3", "hr.csv:3")
        ]
    );
    assert_eq!(
        batch.events[1].attrs,
        attrs(&[("id", "E3"), ("cn", "Cy"), ("mail", "c@x")])
    );
    assert_eq!(
        batch.rejects,
        [reject(
            Some("E2"),
            "hr.csv:2",
            "has 2 fields, expected 3 (id, cn, mail)"
        )]
    );
}

#[test]
fn no_header_missing_key_column_is_permanent() {
    let mut f = Fixture::with_config(b"E1,Ann\n", |c| {
        c.header = false;
        c.columns = Some(vec!["id".into(), "cn".into()]);
        c.key = vec!["emp".into()];
    });
    let err = f.error(None, &Known::default());
    assert!(!err.is_transient());
    assert!(
        err.to_string()
            .contains("key: column 'emp' is not one of `columns`"),
        "{err}"
    );
}

#[test]
fn quoted_fields_keep_delimiters_and_newlines_and_later_lines_stay_right() {
    let content = b"id,cn,address\n\
          E1,\"Lee, Ann\",\"1 Main St\nSpringfield\"\n\
          E2,\"Bo \"\"B\"\" Li\",\"a\r\nb\nc\"\n\
          E3,Cy\n\
          E4,Di,x\n";
    // Not allowed by default: both multi-line records are rejected, lines still right.
    let mut f = Fixture::new(content);
    let batch = f.batch(None, &Known::default());
    assert_eq!(summary(&batch), [(Op::Upsert, "E4", "hr.csv:8")]);
    let origins: Vec<&str> = batch.rejects.iter().map(|r| r.origin.as_str()).collect();
    assert_eq!(origins, ["hr.csv:2", "hr.csv:4", "hr.csv:7"]);

    let mut f = Fixture::with_config(content, |c| c.multiline = true);
    let batch = f.batch(None, &Known::default());
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:2"),
            (Op::Upsert, "E2", "hr.csv:4"),
            (Op::Upsert, "E4", "hr.csv:8"),
        ]
    );
    assert_eq!(batch.events[0].attrs.first_text("cn"), Some("Lee, Ann"));
    assert_eq!(
        batch.events[0].attrs.first_text("address"),
        Some("1 Main St\nSpringfield")
    );
    assert_eq!(batch.events[1].attrs.first_text("cn"), Some("Bo \"B\" Li"));
    assert_eq!(batch.rejects[0].origin, "hr.csv:7");
}

#[test]
fn blank_lines_crlf_and_bom_keep_line_numbers() {
    let mut f = Fixture::new(b"\xEF\xBB\xBFid,cn\r\n\r\nE1,Ann\r\n\r\n\r\nE2,Bo,x\r\nE3,Cy\r\n");
    let batch = f.batch(None, &Known::default());
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:3"),
            (Op::Upsert, "E3", "hr.csv:7")
        ]
    );
    assert_eq!(batch.rejects[0].origin, "hr.csv:6");
    assert!(batch.events[0].attrs.contains("id"));
}

#[test]
fn trim_is_configurable() {
    let content = b" id , cn \n E1 ,  Ann Lee  \nE2,   \n";
    let mut f = Fixture::new(content);
    let batch = f.batch(None, &Known::default());
    assert_eq!(
        batch.events[0].attrs,
        attrs(&[("id", "E1"), ("cn", "Ann Lee")])
    );
    assert_eq!(batch.events[1].attrs, attrs(&[("id", "E2")]));

    let mut f = Fixture::with_config(content, |c| {
        c.trim = false;
        c.key = vec![" id ".into()];
    });
    let batch = f.batch(None, &Known::default());
    assert_eq!(batch.events[0].key, " E1 ");
    assert_eq!(
        batch.events[0].attrs,
        attrs(&[(" id ", " E1 "), (" cn ", "  Ann Lee  ")])
    );
}

#[test]
fn whitespace_only_rows_are_skipped() {
    let mut f = Fixture::new(b"id,cn\nE1,Ann\n,\n   \n , \nE2,Bo\n");
    let batch = f.batch(None, &Known::default());
    assert_eq!(
        summary(&batch),
        [
            (Op::Upsert, "E1", "hr.csv:2"),
            (Op::Upsert, "E2", "hr.csv:6")
        ]
    );
    assert!(batch.rejects.is_empty());
}

#[test]
fn large_pass_comes_in_parts_and_resumes_after_a_restart() {
    let mut f = Fixture::with_config(b"id,cn\nE1,A\nE2,B\nE3,C\nE4,D\nE5,E\n", |c| {
        c.batch_size = 2;
    });
    let mut known = Known::default();
    let first = f.batch(None, &known);
    assert_eq!(
        summary(&first),
        [
            (Op::Upsert, "E1", "hr.csv:2"),
            (Op::Upsert, "E2", "hr.csv:3")
        ]
    );
    assert!(f.adapter.has_more());
    let c1 = first.checkpoint.clone().unwrap();
    known.commit(&first);

    // A restarted agent (a new adapter) continues from the committed part: still upserts.
    let mut restarted = FlatFileAdapter::new("hr", f.adapter.config().clone());
    let Fetch::Batch(second) = restarted.next_batch(Some(&c1), &known).unwrap() else {
        panic!("expected the next part");
    };
    assert_eq!(
        summary(&second),
        [
            (Op::Upsert, "E3", "hr.csv:4"),
            (Op::Upsert, "E4", "hr.csv:5")
        ]
    );
    let c2 = second.checkpoint.clone().unwrap();
    known.commit(&second);
    let Fetch::Batch(third) = restarted.next_batch(Some(&c2), &known).unwrap() else {
        panic!("expected the last part");
    };
    assert_eq!(summary(&third), [(Op::Upsert, "E5", "hr.csv:6")]);
    assert!(!restarted.has_more());
    let c3 = third.checkpoint.clone().unwrap();
    known.commit(&third);
    assert_eq!(
        restarted.next_batch(Some(&c3), &known).unwrap(),
        Fetch::Idle
    );

    // A part that was not committed is handed out again.
    f.write(b"id,cn\nE1,A2\nE2,B2\nE3,C2\n");
    let a = f.batch(Some(&c3), &known);
    let again = f.batch(Some(&c3), &known);
    assert_eq!(summary(&a), summary(&again));
    assert_eq!(
        summary(&a),
        [
            (Op::Update, "E1", "hr.csv:2"),
            (Op::Update, "E2", "hr.csv:3")
        ]
    );
}

#[test]
fn multi_valued_hash_matches_the_map() {
    let mut f = Fixture::with_config(b"id,groups,cn\nE1, a | b ||,Ann\nE2,,Bo\n", |c| {
        c.multi_valued.insert("groups".into(), "|".into());
    });
    let mut known = Known::default();
    let batch = f.batch(None, &known);
    assert_eq!(batch.events[0].attrs.get("groups").map(<[_]>::len), Some(2));
    known.commit(&batch);
    // Unchanged rows hash to the stored maps' hashes: nothing to do.
    let c = batch.checkpoint.clone().unwrap();
    f.write(b"id,groups,cn\nE1,a|b,Ann\nE2,,Bo\n");
    let batch = f.batch(Some(&c), &known);
    assert!(batch.events.is_empty(), "{:?}", batch.events);
}

// --- Reconcile ---------------------------------------------------------------------------

/// Five accounts loaded and committed by ordinary passes in parts of two; the last
/// checkpoint.
fn five_loaded(f: &mut Fixture, known: &mut Known) -> Checkpoint {
    let mut after = None;
    loop {
        let b = f.batch(after.as_ref(), known);
        known.commit(&b);
        after = b.checkpoint.clone();
        if !f.adapter.has_more() {
            return after.unwrap();
        }
    }
}

fn five() -> Fixture {
    Fixture::with_config(b"id,cn\nE1,A\nE2,B\nE3,C\nE4,D\nE5,E\n", |c| {
        c.batch_size = 2;
    })
}

#[test]
fn a_reconcile_hands_out_every_account_in_parts_then_passes_go_on() {
    let mut f = five();
    let mut known = Known::default();
    let loaded = five_loaded(&mut f, &mut known);
    assert_eq!(f.fetch(Some(&loaded), &known), Fetch::Idle);

    // Unchanged file: a pass is idle, a reconcile hands out every account.
    f.adapter.begin_reconcile(None).unwrap();
    let mut after = loaded.clone();
    let mut parts = Vec::new();
    loop {
        let b = f.batch(Some(&after), &known);
        assert!(b.reconcile, "every part of a reconcile says so");
        known.commit(&b);
        after = b.checkpoint.clone().unwrap();
        parts.push(
            summary(&b)
                .into_iter()
                .map(|(op, k, _)| (op, k.to_owned()))
                .collect::<Vec<_>>(),
        );
        if !f.adapter.has_more() {
            break;
        }
    }
    let up = |k: &str| (Op::Update, k.to_owned());
    assert_eq!(
        parts,
        [
            vec![up("E1"), up("E2")],
            vec![up("E3"), up("E4")],
            vec![up("E5")]
        ]
    );
    assert_eq!(f.adapter.planned(), Some(5));
    // Back to passes: the file is what the reconcile committed.
    assert_eq!(f.fetch(Some(&after), &known), Fetch::Idle);

    // A changed file: a changed row is an update with its previous attributes, a new one a
    // create, a missing one a delete (last), the unchanged ones updates too.
    f.write(b"id,cn\nE1,A\nE2,B2\nE3,C\nE4,D\nE6,F\n");
    f.adapter.begin_reconcile(None).unwrap();
    let mut events = Vec::new();
    loop {
        let b = f.batch(Some(&after), &known);
        known.commit(&b);
        after = b.checkpoint.clone().unwrap();
        events.extend(b.events);
        if !f.adapter.has_more() {
            break;
        }
    }
    let ops: Vec<(Op, &str)> = events.iter().map(|e| (e.op, e.key.as_str())).collect();
    assert_eq!(
        ops,
        [
            (Op::Update, "E1"),
            (Op::Update, "E2"),
            (Op::Update, "E3"),
            (Op::Update, "E4"),
            (Op::Create, "E6"),
            (Op::Delete, "E5"),
        ]
    );
    assert_eq!(
        events[1].previous,
        Some(attrs(&[("id", "E2"), ("cn", "B")]))
    );
    assert_eq!(
        events[0].previous,
        Some(attrs(&[("id", "E1"), ("cn", "A")]))
    );
    assert_eq!(f.fetch(Some(&after), &known), Fetch::Idle);
}

#[test]
fn an_interrupted_reconcile_resumes_after_its_committed_parts() {
    let mut f = five();
    let mut known = Known::default();
    let loaded = five_loaded(&mut f, &mut known);
    f.adapter.begin_reconcile(None).unwrap();
    let first = f.batch(Some(&loaded), &known);
    known.commit(&first);
    let c1 = first.checkpoint.clone().unwrap();

    // Killed after its first part: a reconcile begun again (a new process) resumes.
    let config = f.adapter.config().clone();
    let mut again = FlatFileAdapter::new("hr", config.clone());
    again.begin_reconcile(None).unwrap();
    let Fetch::Batch(second) = again.next_batch(Some(&c1), &known).unwrap() else {
        panic!("expected the rest of the reconcile");
    };
    assert!(second.reconcile);
    assert_eq!(
        summary(&second),
        [
            (Op::Update, "E3", "hr.csv:4"),
            (Op::Update, "E4", "hr.csv:5")
        ]
    );
    assert!(second.rejects.is_empty() && !second.rejects_complete);

    // An ordinary pass from the interrupted reconcile's checkpoint is no shortcut: it
    // diffs the file (unchanged here: nothing to do), never skips a change.
    let mut pass = FlatFileAdapter::new("hr", config.clone());
    let Fetch::Batch(diffed) = pass.next_batch(Some(&c1), &known).unwrap() else {
        panic!("the pass must diff the file, not call it idle");
    };
    assert!(diffed.events.is_empty() && !diffed.reconcile);

    // The file changed meanwhile: the reconcile starts over on it, the change included.
    f.write(b"id,cn\nE1,A\nE2,B\nE3,C\nE4,D2\nE5,E\n");
    let mut fresh = FlatFileAdapter::new("hr", config);
    fresh.begin_reconcile(None).unwrap();
    let Fetch::Batch(restart) = fresh.next_batch(Some(&c1), &known).unwrap() else {
        panic!("expected the reconcile again");
    };
    assert_eq!(
        summary(&restart),
        [
            (Op::Update, "E1", "hr.csv:2"),
            (Op::Update, "E2", "hr.csv:3")
        ]
    );
}

#[test]
fn a_reconcile_of_some_keys_keeps_the_checkpoint() {
    let mut f = five();
    let mut known = Known::default();
    let loaded = five_loaded(&mut f, &mut known);
    f.adapter
        .begin_reconcile(Some(vec!["E4".into(), "E2".into(), "E9".into()]))
        .unwrap();
    let b = f.batch(Some(&loaded), &known);
    assert!(b.reconcile && !f.adapter.has_more());
    assert_eq!(
        summary(&b),
        [
            (Op::Update, "E2", "hr.csv:3"),
            (Op::Update, "E4", "hr.csv:5")
        ]
    );
    assert_eq!(
        b.checkpoint.as_ref(),
        Some(&loaded),
        "nothing said about the others"
    );
    assert!(b.rejects.is_empty() && !b.rejects_complete);
    known.commit(&b);
    assert_eq!(f.fetch(Some(&loaded), &known), Fetch::Idle);

    // A key missing from the file is a delete; the count in the checkpoint follows it, and
    // the other changes of the file wait for the next pass.
    f.write(b"id,cn\nE1,A2\nE2,B\nE3,C\nE4,D\n");
    f.adapter.begin_reconcile(Some(vec!["E5".into()])).unwrap();
    let b = f.batch(Some(&loaded), &known);
    assert_eq!(summary(&b), [(Op::Delete, "E5", "hr.csv")]);
    let kept = Token::decode(&b.checkpoint.as_ref().unwrap().0).unwrap();
    assert_eq!(kept.n, Some(4));
    assert_eq!(kept.content, Token::decode(&loaded.0).unwrap().content);
    known.commit(&b);
    let next = f.batch(b.checkpoint.as_ref(), &known);
    assert_eq!(summary(&next), [(Op::Update, "E1", "hr.csv:2")]);
    assert!(!next.reconcile);
}

#[test]
fn a_reconcile_is_behind_the_delete_guard() {
    let mut f = Fixture::with_config(b"id\nE1\nE2\nE3\nE4\nE5\nE6\nE7\nE8\nE9\nE10\n", |_| {});
    let mut known = Known::default();
    let first = f.batch(None, &known);
    known.commit(&first);
    let c = first.checkpoint.unwrap();
    f.write(b"id\nE1\nE2\nE3\nE4\nE5\nE6\nE7\n");
    f.adapter.begin_reconcile(None).unwrap();
    let refused = f.error(Some(&c), &known);
    let AdapterError::DeleteGuard {
        refusal, advice, ..
    } = &refused
    else {
        panic!("expected the guard, got {refused}");
    };
    assert_eq!(refusal.deletes, 3);
    assert!(
        advice.contains("`idsync reconcile hr --accept-deletes`"),
        "{advice}"
    );
    // The refusal ended the reconcile: the next fetch is a pass (refused too, with its own
    // advice).
    let AdapterError::DeleteGuard { advice, .. } = f.error(Some(&c), &known) else {
        panic!("expected the guard");
    };
    assert!(
        advice.contains("idsync run --once --accept-deletes hr"),
        "{advice}"
    );
    f.adapter.accept_deletes();
    f.adapter.begin_reconcile(None).unwrap();
    let b = f.batch(Some(&c), &known);
    assert_eq!(b.events.len(), 10);
    assert_eq!(b.events.iter().filter(|e| e.op == Op::Delete).count(), 3);
}

#[test]
fn a_folder_reconcile_rereads_the_last_file_applied() {
    let dir = tempfile::tempdir().unwrap();
    let feeds = dir.path().join("feeds");
    std::fs::create_dir_all(&feeds).unwrap();
    std::fs::write(feeds.join("hr-1.csv"), b"id,cn\nE1,A\nE2,B\n").unwrap();
    std::fs::write(feeds.join("hr-2.csv"), b"id,cn\nE1,A\nE2,B2\n").unwrap();
    let mut config = FlatFileConfig::new(&feeds, &["id"]);
    config.pattern = Some("hr-*.csv".into());
    config.after = AfterProcessing::Archive;
    config.completion = Completion::Rename;
    let mut a = FlatFileAdapter::new("hr", config);
    let mut known = Known::default();

    // Before any file was applied there is nothing to reconcile against.
    a.begin_reconcile(None).unwrap();
    let err = a.next_batch(None, &known).unwrap_err();
    assert!(err.to_string().contains("no file of the folder"), "{err}");

    // Both files applied (the first archived once the second was fetched).
    let mut after = None;
    for _ in 0..2 {
        let Fetch::Batch(b) = a.next_batch(after.as_ref(), &known).unwrap() else {
            panic!("expected a file");
        };
        known.commit(&b);
        after = b.checkpoint;
    }
    assert_eq!(a.next_batch(after.as_ref(), &known).unwrap(), Fetch::Idle);
    assert!(
        feeds.join("archive/hr-2.csv").exists(),
        "archived once committed"
    );

    // The reconcile reads the last file applied, from the archive.
    a.begin_reconcile(None).unwrap();
    let Fetch::Batch(b) = a.next_batch(after.as_ref(), &known).unwrap() else {
        panic!("expected the reconcile");
    };
    assert!(b.reconcile && !a.has_more());
    assert_eq!(
        summary(&b),
        [
            (Op::Update, "E1", "hr-2.csv:2"),
            (Op::Update, "E2", "hr-2.csv:3")
        ]
    );
    known.commit(&b);
    let after = b.checkpoint;
    assert_eq!(a.next_batch(after.as_ref(), &known).unwrap(), Fetch::Idle);

    // A newer file waits: a pass applies it first.
    std::fs::write(feeds.join("hr-3.csv"), b"id,cn\nE1,A\n").unwrap();
    a.begin_reconcile(None).unwrap();
    let err = a.next_batch(after.as_ref(), &known).unwrap_err();
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("1 file(s)") && err.to_string().contains("hr-3.csv"),
        "{err}"
    );
}

#[test]
fn an_adapter_without_reconcile_refuses_it() {
    struct Plain;
    impl Adapter for Plain {
        fn resource(&self) -> &str {
            "dir"
        }
        fn next_batch(
            &mut self,
            _: Option<&Checkpoint>,
            _: &dyn KnownAccounts,
        ) -> Result<Fetch, AdapterError> {
            Ok(Fetch::Idle)
        }
    }
    let err = Plain.begin_reconcile(None).unwrap_err();
    assert!(!err.is_transient());
    assert_eq!(
        err.to_string(),
        "resource dir: reconcile is not supported by this adapter"
    );
}
