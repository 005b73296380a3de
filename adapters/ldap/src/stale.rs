//! A directory whose state is older than the stored sync cookie: restored from a backup, or
//! a server that lost its latest changes. Its content differs from what the repository
//! holds in ways no change will ever report (a hire made after the backup is simply not
//! there), so the only safe course is a refresh from scratch with deletes found by absence,
//! behind the accidental-delete guard.
//!
//! OpenLDAP refuses such a cookie (`unwillingToPerform`, "consumer state is newer than
//! provider"); the refusal alone does not say why, so the adapter compares, sid by sid, the
//! change sequence numbers (CSNs) of the cookie with the `contextCSN` of the naming context
//! the search base lies in. A server whose every context CSN is older than the cookie's (or
//! that lacks the cookie's sid) is older than the cookie.

use crate::conn::Client;
use crate::error::LdapError;

/// The CSNs of a cookie (`rid=000,csn=A;B`): `A`, `B`.
pub(crate) fn cookie_csns(cookie: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(cookie);
    text.split(',')
        .filter_map(|part| part.strip_prefix("csn="))
        .flat_map(|csns| csns.split(';'))
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The server id of a CSN (`20261126034000.123456Z#000000#001#000000` → `001`).
fn sid(csn: &str) -> Option<&str> {
    csn.split('#').nth(2)
}

/// Whether the server's context CSNs are older than the cookie's: for some sid of the
/// cookie the server has no CSN, or an older one. CSNs of one sid order as text.
pub(crate) fn is_older(server: &[String], cookie: &[String]) -> bool {
    !cookie.is_empty()
        && cookie.iter().any(|c| {
            let theirs = server.iter().find(|s| sid(s) == sid(c));
            theirs.is_none_or(|s| s.as_str() < c.as_str())
        })
}

/// The naming context of `base` among the server's (the longest that `base` lies in).
fn naming_context(contexts: &[String], base: &str) -> Option<String> {
    let base = base.to_ascii_lowercase();
    contexts
        .iter()
        .filter(|c| {
            let c = c.to_ascii_lowercase();
            base == c || base.ends_with(&format!(",{c}"))
        })
        .max_by_key(|c| c.len())
        .cloned()
}

/// Whether the directory's state is older than `cookie` (module doc).
pub(crate) fn server_is_older(client: &mut Client, cookie: &[u8]) -> Result<bool, LdapError> {
    let root = client.read_entry("", &["namingContexts"])?;
    let contexts = root
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("namingContexts"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let base = client.config.base.clone();
    let Some(context) = naming_context(&contexts, &base) else {
        return Ok(false);
    };
    let entry = client.read_entry(&context, &["contextCSN"])?;
    let csns = entry
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("contextCSN"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    Ok(is_older(&csns, &cookie_csns(cookie)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "20261126034000.000001Z#000000#000#000000";
    const NEW: &str = "20261126035000.000001Z#000000#000#000000";

    #[test]
    fn csns_are_read_from_a_cookie() {
        let cookie = format!("rid=000,csn={OLD};{}", NEW.replace("#000#", "#001#"));
        assert_eq!(cookie_csns(cookie.as_bytes()).len(), 2);
        assert!(cookie_csns(b"rid=000").is_empty());
    }

    #[test]
    fn a_server_behind_the_cookie_is_older() {
        let c = |v: &str| vec![v.to_owned()];
        assert!(is_older(&c(OLD), &c(NEW)), "restored");
        assert!(!is_older(&c(NEW), &c(OLD)), "ahead");
        assert!(!is_older(&c(NEW), &c(NEW)), "equal");
        assert!(is_older(&[], &c(NEW)), "no context CSN at all");
        let other_sid = NEW.replace("#000#", "#002#");
        assert!(
            is_older(&c(&other_sid), &c(NEW)),
            "the cookie's sid unknown"
        );
        assert!(!is_older(&c(OLD), &[]), "no CSN in the cookie");
    }

    #[test]
    fn the_naming_context_of_a_base() {
        let ctx = vec!["dc=example,dc=com".to_owned(), "cn=accesslog".to_owned()];
        assert_eq!(
            naming_context(&ctx, "ou=People,DC=example,dc=com").as_deref(),
            Some("dc=example,dc=com")
        );
        assert_eq!(naming_context(&ctx, "dc=other"), None);
    }
}
