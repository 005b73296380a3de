//! Turning an outbox row into an RFC 5322 message.
//!
//! Key design choice: the Message-ID and the Date are derived from the row (its id and
//! creation time), so a resend after a crash between sending and marking is the same
//! message and receivers can deduplicate it.

use std::time::{Duration, UNIX_EPOCH};

use idsync_repo::OutboxMessage;
use lettre::Message;
use lettre::address::Envelope;
use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};

/// A message ready to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Outbox row id.
    pub id: i64,
    /// SMTP envelope.
    pub envelope: Envelope,
    /// The formatted message.
    pub bytes: Vec<u8>,
    /// Its Message-ID (with angle brackets).
    pub message_id: String,
}

/// The Message-ID of an outbox row: `<idsync.ID.CREATED@DOMAIN>`, DOMAIN from the sender.
pub fn message_id(m: &OutboxMessage) -> String {
    let domain = m
        .mail
        .from
        .parse::<Mailbox>()
        .map(|mb| mb.email.domain().to_owned())
        .unwrap_or_else(|_| "idsync.invalid".to_owned());
    format!("<idsync.{}.{}@{}>", m.id, m.created_at, domain)
}

/// Builds the message of an outbox row. An error is permanent: the row cannot be sent as
/// it is.
pub fn build(m: &OutboxMessage) -> Result<Outgoing, String> {
    let from: Mailbox = m
        .mail
        .from
        .parse()
        .map_err(|e| format!("invalid sender {:?}: {e}", m.mail.from))?;
    let id = message_id(m);
    let created = UNIX_EPOCH + Duration::from_millis(u64::try_from(m.created_at).unwrap_or(0));
    let mut b = Message::builder()
        .from(from)
        .message_id(Some(id.clone()))
        .date(created)
        .subject(crate::policy::one_line(&m.mail.subject));
    for r in &m.mail.to {
        if r.chars().any(char::is_control) {
            return Err(format!("invalid recipient {r:?}: control characters"));
        }
        let mb: Mailbox = r
            .parse()
            .map_err(|e| format!("invalid recipient {r:?}: {e}"))?;
        b = b.to(mb);
    }
    let text = SinglePart::builder()
        .header(ContentType::TEXT_PLAIN)
        .body(m.mail.text.clone());
    let msg = match &m.mail.html {
        Some(html) => b.multipart(
            MultiPart::alternative().singlepart(text).singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(html.clone()),
            ),
        ),
        None => b.singlepart(text),
    }
    .map_err(|e| format!("cannot build the message: {e}"))?;
    Ok(Outgoing {
        id: m.id,
        envelope: msg.envelope().clone(),
        bytes: msg.formatted(),
        message_id: id,
    })
}
