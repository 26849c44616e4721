//! `tollgate mqtt import-acl FILE`: a mosquitto `acl_file` as `mqtt.policy`
//! rules. `topic` lines before any `user` line are for anonymous clients,
//! those after `user NAME` for that user; `pattern` lines are for everyone,
//! with `%u` and `%c`. Access is `read` (subscribe), `write` (publish),
//! `readwrite` (the default) or `deny`; as in mosquitto, a deny wins, so
//! the deny rules come first. Stricter than mosquitto, which filters
//! denied topics out at delivery: a subscription filter that can reach a
//! denied topic is refused.

use serde_json::{Value, json};

/// The rules as gateway.yaml lines (`mqtt:` / `policy:`), or the first
/// problem with its line number.
pub fn import(text: &str, source: &str) -> Result<String, String> {
    let mut denies = Vec::new();
    let mut allows = Vec::new();
    let mut user: Option<String> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |why: &str| format!("{source}:{}: {why}: `{line}`", n + 1);
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match word {
            "user" if !rest.is_empty() => user = Some(rest.to_owned()),
            "user" => return Err(at("`user` needs a name")),
            "topic" | "pattern" => {
                let (access, topic) = match rest.split_once(char::is_whitespace) {
                    Some((a @ ("read" | "write" | "readwrite" | "deny"), t)) => (a, t.trim()),
                    _ => ("readwrite", rest),
                };
                if topic.is_empty() {
                    return Err(at("no topic"));
                }
                if super::topic::valid_filter(topic).is_err() {
                    return Err(at("not a topic filter"));
                }
                let actions: &[&str] = match access {
                    "read" => &["subscribe"],
                    "write" => &["publish"],
                    _ => &["publish", "subscribe"],
                };
                let mut cond = json!({ "actions": actions, "topics": [topic] });
                match (word, &user) {
                    ("pattern", _) => {}
                    ("topic", Some(u)) => cond["users"] = json!([u]),
                    _ => cond["via"] = json!(["anonymous"]),
                }
                let rule = match access {
                    "deny" => json!({ "deny": cond }),
                    _ => json!({ "allow": cond }),
                };
                match access {
                    "deny" => denies.push(rule),
                    _ => allows.push(rule),
                }
            }
            _ => return Err(at("expected `user`, `topic` or `pattern`")),
        }
    }
    let mut out = format!(
        "# mqtt.policy from {source} (tollgate mqtt import-acl); denies first, as mosquitto applies them\nmqtt:\n  policy:\n"
    );
    for rule in denies.iter().chain(&allows) {
        // JSON is YAML: each rule on one line, flow style.
        out.push_str(&format!("    - {}\n", flow(rule)));
    }
    if denies.is_empty() && allows.is_empty() {
        out.push_str("    []\n");
    }
    Ok(out)
}

fn flow(v: &Value) -> String {
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Action, Policy, Resource};
    use crate::identity::{AuthMethod, Identity};

    #[test]
    fn a_mosquitto_acl_file_becomes_rules_that_decide_alike() {
        let text = "# public\ntopic read public/#\n\nuser alice\ntopic readwrite alice/#\ntopic deny alice/secret\ntopic write bus/in\n\npattern read devices/%u/cmd\npattern write devices/%u/state\n";
        let yaml = import(text, "acl").unwrap();
        let path = std::env::temp_dir().join(format!("acl-{}.yaml", std::process::id()));
        std::fs::write(&path, &yaml).unwrap();
        let cfg = crate::config::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let policy = Policy::compile(cfg.mqtt.policy.as_ref().unwrap(), Resource::Topic).unwrap();
        let who = |name: &str, method| Identity {
            subject: name.into(),
            method,
            ..Identity::anonymous()
        };
        let alice = who("alice", AuthMethod::Password);
        let bob = who("bob", AuthMethod::Password);
        let anon = who("", AuthMethod::Anonymous);
        let publish = |w: &Identity, topic| {
            policy
                .evaluate(
                    w,
                    &Action::Publish {
                        topic,
                        qos: 0,
                        retain: false,
                    },
                )
                .allowed()
        };
        let subscribe = |w: &Identity, filter| {
            policy
                .evaluate(w, &Action::Subscribe { filter, qos: 0 })
                .allowed()
        };
        assert!(subscribe(&anon, "public/news"));
        assert!(!subscribe(&alice, "public/news"), "anonymous clients' line");
        assert!(publish(&alice, "alice/x") && subscribe(&alice, "alice/x"));
        // Stricter than mosquitto (which filters at delivery): a filter
        // that can reach a denied topic is refused.
        assert!(!subscribe(&alice, "alice/#"));
        assert!(!publish(&alice, "alice/secret"), "deny wins");
        assert!(publish(&alice, "bus/in") && !subscribe(&alice, "bus/in"));
        assert!(!publish(&bob, "alice/x"));
        assert!(subscribe(&bob, "devices/bob/cmd") && publish(&bob, "devices/bob/state"));
        assert!(!subscribe(&bob, "devices/alice/cmd"));
        for bad in ["user\n", "topic\n", "topic read a/#/b\n", "acl x\n"] {
            assert!(import(bad, "f").unwrap_err().starts_with("f:1: "), "{bad}");
        }
    }
}
