//! MQTT topics as NATS subjects: `<base>.` and one token per topic level.
//!
//! A NATS token is non-empty and holds no `.`, `*`, `>` or whitespace; an
//! MQTT level may be empty and hold anything but `/`, `+`, `#` and U+0000.
//! So each level is one token as [`crate::bus::subject`] writes any text
//! (escaped byte by byte, `%` alone for an empty level). The mapping is
//! one to one (only one spelling decodes), and it keeps levels apart, so
//! filters map level by level: `+` is `*` and a final `#` is `>` (plus
//! its parent level: `a/#` matches `a`).

use crate::bus::subject::{decode_token, push_token};

/// The subject of a message to `topic`.
pub fn for_topic(base: &str, topic: &str) -> String {
    let mut s = String::with_capacity(base.len() + topic.len() + 8);
    s.push_str(base);
    for level in topic.split('/') {
        s.push('.');
        push_token(&mut s, level);
    }
    s
}

/// The subjects a node subscribes to for `filter` (valid, without
/// `$share/`): one, or two for a filter ending in `/#`.
pub fn for_filter(base: &str, filter: &str) -> Vec<String> {
    let mut s = String::with_capacity(base.len() + filter.len() + 8);
    s.push_str(base);
    let mut levels = filter.split('/').peekable();
    let mut parent = None;
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {
                if s.len() > base.len() {
                    parent = Some(s.clone());
                }
                s.push_str(".>");
            }
            "+" => s.push_str(".*"),
            _ => {
                s.push('.');
                push_token(&mut s, level);
            }
        }
    }
    let mut out = vec![s];
    out.extend(parent);
    out
}

/// The topic a subject under `base` names: a valid topic name, not a `$`
/// one (those never travel).
pub fn topic_of(base: &str, subject: &str) -> Result<String, &'static str> {
    let rest = subject
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or("a subject outside the MQTT subjects")?;
    let mut bytes = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            bytes.push(b'/');
        }
        decode_token(token, &mut bytes)?;
    }
    let topic = String::from_utf8(bytes).map_err(|_| "a topic that is not UTF-8")?;
    super::super::topic::valid_name(&topic).map_err(|e| e.as_str())?;
    if topic.starts_with('$') {
        return Err("a `$` topic");
    }
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_become_tokens_and_back() {
        for topic in [
            "a/b",
            "a//b",
            "/",
            "/a/",
            "a.b/c*d/e>f",
            "sp ace/tab\t/%/%25",
            "ünï/çødé/日本",
            "x/ /~!",
        ] {
            let s = for_topic("tg", topic);
            assert!(s.starts_with("tg."), "{s}");
            for token in s.split('.') {
                assert!(!token.is_empty(), "{topic}: {s}");
                assert!(
                    token.bytes().all(|b| (0x21..=0x7e).contains(&b))
                        && !token.contains(['*', '>']),
                    "{topic}: {s}"
                );
            }
            assert_eq!(topic_of("tg", &s).as_deref(), Ok(topic));
        }
        assert_eq!(for_topic("tg", "a//b"), "tg.a.%.b");
        assert_eq!(for_topic("tg", "a.b"), "tg.a%2Eb");
    }

    #[test]
    fn filters_map_wildcards() {
        assert_eq!(for_filter("p.mqtt", "a/+/c"), ["p.mqtt.a.*.c"]);
        assert_eq!(for_filter("p.mqtt", "a/#"), ["p.mqtt.a.>", "p.mqtt.a"]);
        assert_eq!(for_filter("p.mqtt", "#"), ["p.mqtt.>"]);
        assert_eq!(for_filter("p.mqtt", "+/#"), ["p.mqtt.*.>", "p.mqtt.*"]);
        assert_eq!(for_filter("p.mqtt", "a//b"), ["p.mqtt.a.%.b"]);
    }

    #[test]
    fn only_the_one_spelling_decodes() {
        for bad in [
            "tg.a%2e",
            "tg.%61",
            "tg.a%",
            "tg.a%G0",
            "tg.a..b",
            "tg.+",
            "tg.%24SYS",
            "tg.$SYS.x",
            "other.a",
            "tg",
            "tg.%00",
            "tg.%FF",
        ] {
            assert!(topic_of("tg", bad).is_err(), "{bad}");
        }
    }
}
