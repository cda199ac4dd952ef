//! Credentials out of what katz prints: the password of an AMQP or Redis URL becomes `***`
//! before the URL (or an error that quotes it) reaches an error message or a log line.
//!
//! ```text
//! amqp://guest:secret@host:5672/%2f ─url()─▶ amqp://guest:***@host:5672/%2f
//! "… secret …" (an error from lapin / redis) ─Secrets::of([urls]).scrub()─▶ "… *** …"
//! ```
//!
//! Every place that formats a broker URL into an error or a log line goes through [`url`]; an
//! error of a client library (which may quote what it was given) goes through
//! [`Secrets::scrub`] with the URLs the process was configured with.

use std::borrow::Cow;

/// What a password is replaced with.
pub const MASK: &str = "***";

/// `s` with the password of its user info replaced by [`MASK`] (a URL without one, or that does
/// not parse, is returned as it is once its user info, if any, is masked by hand).
pub fn url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            if u.set_password(Some(MASK)).is_ok() {
                return u.to_string();
            }
            by_hand(s)
        }
        Ok(_) => s.to_string(),
        Err(_) => by_hand(s),
    }
}

/// `scheme://user:password@rest` → `scheme://user:***@rest`, for text `url::Url` refuses.
fn by_hand(s: &str) -> String {
    let Some(start) = s.find("://").map(|i| i + 3) else {
        return s.to_string();
    };
    let rest = &s[start..];
    // the user info ends at the last '@' before the path
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return s.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!("{}{}:{MASK}{}", &s[..start], &rest[..colon], &rest[at..]),
        None => s.to_string(),
    }
}

/// The password of a URL, as written and percent-decoded (`None`: it has none).
fn password(s: &str) -> Option<Vec<String>> {
    let u = url::Url::parse(s).ok()?;
    let raw = u.password()?.to_string();
    let mut forms = vec![raw.clone()];
    if let Ok(decoded) = percent_decode(&raw) {
        if decoded != raw {
            forms.push(decoded);
        }
    }
    Some(forms)
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

/// The passwords of the URLs a process was given, to scrub from text it did not format itself
/// (a client library's error).
#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<String>);

impl Secrets {
    pub fn of<'a>(urls: impl IntoIterator<Item = &'a str>) -> Secrets {
        let mut v: Vec<String> = urls.into_iter().filter_map(password).flatten().collect();
        // longest first, so a password that contains another is masked whole
        v.sort_by_key(|p| std::cmp::Reverse(p.len()));
        v.retain(|p| !p.is_empty());
        v.dedup();
        Secrets(v)
    }

    /// `text` with every one of these passwords masked.
    pub fn scrub<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut out = Cow::Borrowed(text);
        for p in &self.0 {
            if out.contains(p.as_str()) {
                out = Cow::Owned(out.replace(p.as_str(), MASK));
            }
        }
        out
    }
}

/// `e`'s message (and its sources') with the passwords of `urls` masked: for errors of client
/// libraries, which may quote the URL they were given.
pub fn error(e: &(dyn std::error::Error + 'static), urls: &[&str]) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    Secrets::of(urls.iter().copied()).scrub(&s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_password_is_masked_and_the_rest_kept() {
        assert_eq!(
            url("amqp://guest:WRONGPASS@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(url("amqp://user@host/%2f"), "amqp://user@host/%2f");
        // what Url refuses is masked by hand
        assert_eq!(url("amqp://u:p w@ho st:99999/x"), "amqp://u:***@ho st:99999/x");
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn passwords_are_scrubbed_from_other_text_raw_and_decoded() {
        let s = Secrets::of(["amqp://guest:p%40ss@h/%2f", "redis://:other@h:1/", "redis://h/"]);
        assert_eq!(
            s.scrub("login p@ss failed; p%40ss; other"),
            "login *** failed; ***; ***"
        );
        assert_eq!(s.scrub("nothing here"), "nothing here");
        let io = std::io::Error::other("refused for guest:p@ss");
        assert_eq!(
            error(&io, &["amqp://guest:p%40ss@h/%2f"]),
            "refused for guest:***"
        );
    }
}
