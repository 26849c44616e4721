//! Topic names and filters (MQTT 5 §4.7): what is valid, and whether a
//! filter matches a name. `+` and `#` at the first level never match a
//! topic that starts with `$` (§4.7.2).

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    /// Over 65535 bytes (the length prefix cannot say more).
    TooLong,
    /// `+` or `#` in a topic name (they are for filters).
    Wildcard,
    /// `#` not alone at the last level, or `+` sharing a level.
    MisplacedWildcard,
    /// U+0000 is not allowed anywhere.
    Null,
    /// `$share/` without a group or filter, or a group holding `+`, `#` or `/`.
    BadShare,
}

impl TopicError {
    pub fn as_str(self) -> &'static str {
        match self {
            TopicError::Empty => "empty",
            TopicError::TooLong => "longer than 65535 bytes",
            TopicError::Wildcard => "a topic name holds a wildcard",
            TopicError::MisplacedWildcard => {
                "`#` must be the last level and wildcards a whole level"
            }
            TopicError::Null => "holds U+0000",
            TopicError::BadShare => {
                "`$share/<group>/<filter>` needs a group without `+`, `#` or `/`, and a filter"
            }
        }
    }
}

fn common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Null);
    }
    Ok(())
}

/// A topic a message is published to.
pub fn valid_name(name: &str) -> Result<(), TopicError> {
    common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// A subscription filter (without a `$share/` prefix).
pub fn valid_filter(filter: &str) -> Result<(), TopicError> {
    common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            l if l.contains(['+', '#']) => return Err(TopicError::MisplacedWildcard),
            "#" => return Err(TopicError::MisplacedWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// A filter as subscribed: `$share/<group>/<filter>` names a group that
/// shares the messages (each to one member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription<'a> {
    pub share: Option<&'a str>,
    pub filter: &'a str,
}

pub fn parse_subscription(raw: &str) -> Result<Subscription<'_>, TopicError> {
    let Some(rest) = raw.strip_prefix("$share/") else {
        valid_filter(raw)?;
        return Ok(Subscription {
            share: None,
            filter: raw,
        });
    };
    let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
    // The filter of a share is not itself a share: the policy reads what
    // follows `$share/<group>/` once, and so must the router.
    if group.is_empty()
        || group.contains(['+', '#'])
        || filter.is_empty()
        || filter.starts_with("$share/")
    {
        return Err(TopicError::BadShare);
    }
    valid_filter(filter)?;
    Ok(Subscription {
        share: Some(group),
        filter,
    })
}

/// Whether `filter` (valid) matches the topic `name` (valid).
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters() {
        assert!(valid_name("a/b").is_ok());
        assert!(valid_name("/").is_ok(), "empty levels are levels");
        assert_eq!(valid_name("a/+"), Err(TopicError::Wildcard));
        assert_eq!(valid_name(""), Err(TopicError::Empty));
        assert_eq!(valid_name("a\0b"), Err(TopicError::Null));
        for ok in ["#", "+", "a/#", "+/+/x", "a//+", "$SYS/#"] {
            assert!(valid_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["a/#/b", "a#", "a/b+", "#/a", "++"] {
            assert_eq!(
                valid_filter(bad),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
        assert_eq!(
            parse_subscription("$share/g/a/+").unwrap(),
            Subscription {
                share: Some("g"),
                filter: "a/+"
            }
        );
        for bad in [
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
            "$share/g/$share/h/x",
        ] {
            assert!(parse_subscription(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let yes = [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("+/+", "/x"),
            ("#", "a/b"),
            ("$SYS/#", "$SYS/broker/uptime"),
            ("+/b", "a/b"),
            ("a/+/c", "a//c"),
        ];
        for (f, n) in yes {
            assert!(matches(f, n), "{f} {n}");
        }
        let no = [
            ("a/+", "a/b/c"),
            ("a/b", "a"),
            ("+", "/a"),
            ("#", "$SYS/x"),
            ("+/broker", "$SYS/broker"),
            ("a/+/c", "a/c"),
        ];
        for (f, n) in no {
            assert!(!matches(f, n), "{f} {n}");
        }
    }
}
