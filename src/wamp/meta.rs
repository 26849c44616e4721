//! The meta API's procedures, answered by the router from the realm's
//! state (`wamp.session.*`, `wamp.registration.*`, `wamp.subscription.*`).
//! The meta events are published where the changes happen (router.rs,
//! broker.rs, dealer.rs). Callers need the same `call` permission as for
//! any procedure.

use super::message::Id;
use super::router::{RealmState, match_policy};
use super::table::{Entry, Table};
use super::value::{Dict, Value};

pub const PROCEDURES: &[&str] = &[
    "wamp.session.count",
    "wamp.session.list",
    "wamp.session.get",
    "wamp.session.kill",
    "wamp.session.kill_by_authid",
    "wamp.session.kill_by_authrole",
    "wamp.registration.list",
    "wamp.registration.lookup",
    "wamp.registration.match",
    "wamp.registration.get",
    "wamp.registration.list_callees",
    "wamp.registration.count_callees",
    "wamp.subscription.list",
    "wamp.subscription.lookup",
    "wamp.subscription.match",
    "wamp.subscription.get",
    "wamp.subscription.list_subscribers",
    "wamp.subscription.count_subscribers",
];

pub fn is_meta(procedure: &str) -> bool {
    PROCEDURES.contains(&procedure)
}

/// A meta procedure's failure: the error URI and a message.
pub type Failure = (&'static str, String);

fn arg<'a>(args: &'a [Value], i: usize, what: &str) -> Result<&'a Value, Failure> {
    args.get(i).ok_or_else(|| {
        (
            "wamp.error.invalid_argument",
            format!("argument {i} ({what}) is missing"),
        )
    })
}

fn id_arg(args: &[Value], i: usize, what: &str) -> Result<Id, Failure> {
    arg(args, i, what)?.as_id().ok_or_else(|| {
        (
            "wamp.error.invalid_argument",
            format!("argument {i} ({what}) must be an id"),
        )
    })
}

fn str_arg<'a>(args: &'a [Value], i: usize, what: &str) -> Result<&'a str, Failure> {
    arg(args, i, what)?.as_str().ok_or_else(|| {
        (
            "wamp.error.invalid_argument",
            format!("argument {i} ({what}) must be a string"),
        )
    })
}

fn ids(mut ids: Vec<Id>) -> Value {
    ids.sort_unstable();
    Value::List(ids.into_iter().map(Value::UInt).collect())
}

/// `filter_authroles`: the first argument, when a list.
fn role_filter(args: &[Value]) -> Option<Vec<&str>> {
    match args.first() {
        Some(Value::List(l)) => Some(l.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

/// The reason and message of a kill: `kwargs.reason`, `kwargs.message`.
fn kill_reason(kwargs: Option<&Dict>) -> (String, Option<String>) {
    let text = |k: &str| {
        kwargs
            .and_then(|d| d.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    (
        text("reason").unwrap_or_else(|| "wamp.close.killed".into()),
        text("message"),
    )
}

/// Answers a meta procedure for `caller`: the RESULT's positional
/// arguments.
pub fn call(
    state: &mut RealmState,
    caller: Id,
    procedure: &str,
    args: &[Value],
    kwargs: Option<&Dict>,
) -> Result<Vec<Value>, Failure> {
    let no_session = |id: Id| {
        (
            "wamp.error.no_such_session",
            format!("no session {id} in this realm"),
        )
    };
    Ok(vec![match procedure {
        "wamp.session.count" => {
            let roles = role_filter(args);
            let n = state
                .sessions
                .values()
                .filter(|m| roles.as_ref().is_none_or(|r| r.contains(&&*m.authrole)))
                .count();
            Value::UInt(n as u64)
        }
        "wamp.session.list" => {
            let roles = role_filter(args);
            ids(state
                .sessions
                .iter()
                .filter(|(_, m)| roles.as_ref().is_none_or(|r| r.contains(&&*m.authrole)))
                .map(|(id, _)| *id)
                .collect())
        }
        "wamp.session.get" => {
            let id = id_arg(args, 0, "session")?;
            let member = state.sessions.get(&id).ok_or_else(|| no_session(id))?;
            Value::Dict((*member.details).clone())
        }
        "wamp.session.kill" => {
            let id = id_arg(args, 0, "session")?;
            if id == caller {
                return Err((
                    "wamp.error.no_such_session",
                    "a session cannot kill itself (leave with GOODBYE)".into(),
                ));
            }
            let (reason, message) = kill_reason(kwargs);
            if !state.kill(id, &reason, message.as_deref()) {
                return Err(no_session(id));
            }
            Value::Null
        }
        "wamp.session.kill_by_authid" | "wamp.session.kill_by_authrole" => {
            let by_role = procedure.ends_with("authrole");
            let name = str_arg(args, 0, if by_role { "authrole" } else { "authid" })?;
            let (reason, message) = kill_reason(kwargs);
            let victims = state.sessions_where(caller, |m| {
                if by_role {
                    &*m.authrole == name
                } else {
                    &*m.authid == name
                }
            });
            for id in &victims {
                state.kill(*id, &reason, message.as_deref());
            }
            ids(victims)
        }
        _ => {
            if let Some(what) = procedure.strip_prefix("wamp.registration.") {
                let regs = &state.dealer.registrations;
                let best = |uri: &str| state.dealer.best_match(uri).into_iter().collect();
                return table_call(regs, "registration", what, args, best, |r, id| {
                    r.described(id)
                });
            }
            if let Some(what) = procedure.strip_prefix("wamp.subscription.") {
                let subs = &state.broker;
                let all = |uri: &str| subs.matching(uri).map(|(id, _)| id).collect();
                return table_call(subs, "subscription", what, args, all, |s, id| s.details(id));
            }
            return Err((
                "wamp.error.no_such_procedure",
                format!("no meta procedure `{procedure}`"),
            ));
        }
    }])
}

/// `wamp.registration.*` and `wamp.subscription.*` on their table: `what`
/// is the procedure's last part; `matches` is what a call or publication
/// to a URI would reach.
fn table_call<T>(
    table: &Table<T>,
    kind: &str,
    what: &str,
    args: &[Value],
    matches: impl Fn(&str) -> Vec<Id>,
    describe: impl Fn(&Entry<T>, Id) -> Dict,
) -> Result<Vec<Value>, Failure> {
    let entry = |args: &[Value]| {
        let id = id_arg(args, 0, kind)?;
        let e = table.entries.get(&id).ok_or_else(|| {
            (
                if kind == "registration" {
                    "wamp.error.no_such_registration"
                } else {
                    "wamp.error.no_such_subscription"
                },
                format!("no {kind} {id}"),
            )
        })?;
        Ok::<_, Failure>((id, e))
    };
    Ok(vec![match what {
        "list" => Value::Dict(table.list()),
        "lookup" => {
            let uri = str_arg(args, 0, "uri")?;
            let options = args
                .get(1)
                .and_then(Value::as_dict)
                .cloned()
                .unwrap_or_default();
            let policy = match_policy(&options).ok_or((
                "wamp.error.invalid_argument",
                "`match` must be exact, prefix or wildcard".to_owned(),
            ))?;
            table.lookup(uri, policy).map_or(Value::Null, Value::UInt)
        }
        // A call goes to one registration; a publication to every match.
        "match" => {
            let found = matches(str_arg(args, 0, "uri")?);
            match (kind, found.as_slice()) {
                (_, []) => Value::Null,
                ("registration", [one, ..]) => Value::UInt(*one),
                _ => ids(found),
            }
        }
        "get" => {
            let (id, e) = entry(args)?;
            Value::Dict(describe(e, id))
        }
        "list_callees" | "list_subscribers" => ids(entry(args)?.1.sessions.clone()),
        "count_callees" | "count_subscribers" => Value::UInt(entry(args)?.1.sessions.len() as u64),
        _ => {
            return Err((
                "wamp.error.no_such_procedure",
                format!("no meta procedure `wamp.{kind}.{what}`"),
            ));
        }
    }])
}
