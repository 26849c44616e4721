//! The dealer: registrations (exact, prefix, wildcard; shared ones with an
//! invocation policy), routing a call to one callee, and what follows:
//! results (progressive ones too), errors, cancels, timeouts, and callees
//! or callers that leave mid-call. A caller never waits on a callee that is
//! gone. The router itself calls procedures too (dynamic authentication
//! and authorisation), through the same path, with a oneshot for its answer.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::cluster::wire::Frame;
use super::message::{self as m, Id, Message};
use super::router::{Realm, RealmState, call_error, error_with};
use super::table::{Entry, Table};
use super::value::{Dict, Value};
use crate::authz::MatchPolicy;
use crate::bus::NodeId;

/// How a shared registration picks its callee (`options.invoke`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invoke {
    Single,
    RoundRobin,
    Random,
    First,
    Last,
}

impl Invoke {
    pub fn from_options(options: &Dict) -> Option<Invoke> {
        Some(match options.get("invoke").and_then(Value::as_str) {
            None | Some("single") => Invoke::Single,
            Some("roundrobin") => Invoke::RoundRobin,
            Some("random") => Invoke::Random,
            Some("first") => Invoke::First,
            Some("last") => Invoke::Last,
            Some(_) => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Invoke::Single => "single",
            Invoke::RoundRobin => "roundrobin",
            Invoke::Random => "random",
            Invoke::First => "first",
            Invoke::Last => "last",
        }
    }
}

/// A registration's own: how it picks among its callees.
pub struct Shared {
    pub invoke: Invoke,
    next: usize,
}

pub type Registration = Entry<Shared>;

impl Registration {
    /// `details()` with the invocation policy.
    pub fn described(&self, id: Id) -> Dict {
        let mut d = self.details(id);
        d.insert("invoke".into(), Value::Str(self.kind.invoke.name().into()));
        d
    }

    fn pick(&mut self) -> Option<Id> {
        let n = self.sessions.len();
        if n == 0 {
            return None;
        }
        let at = match self.kind.invoke {
            Invoke::Single | Invoke::First => 0,
            Invoke::Last => n - 1,
            Invoke::Random => fastrand::usize(..n),
            Invoke::RoundRobin => {
                self.kind.next %= n;
                let at = self.kind.next;
                self.kind.next += 1;
                at
            }
        };
        Some(self.sessions[at])
    }
}

/// A call's outcome, for the router's own calls.
#[derive(Debug)]
pub enum Outcome {
    Result(Option<Value>, Option<Value>),
    Error(String, Option<Value>),
}

pub enum Caller {
    Session {
        id: Id,
        request: Id,
    },
    Router(oneshot::Sender<Outcome>),
    /// A session on another node (cluster mode): its answers go to that
    /// node's inbox, under the call id it chose.
    Remote {
        node: NodeId,
        call: u64,
    },
}

struct Pending {
    caller: Caller,
    /// The call's `timeout` timer, stopped when the call ends.
    timer: Option<tokio::task::AbortHandle>,
    started: std::time::Instant,
    callee: Id,
    /// The caller takes progressive results.
    progress: bool,
    /// A `kill` cancel is under way: the callee's ERROR ends it.
    canceling: bool,
    /// The router's own calls (authenticators, authorizers) go to another
    /// callee when theirs leaves mid-call: what to send it.
    retry: Option<(String, Option<Value>)>,
}

#[derive(Default)]
pub struct Dealer {
    pub registrations: Table<Shared>,
    pending: HashMap<Id, Pending>,
    /// (caller session, its request id) -> invocation, for CANCEL.
    by_request: HashMap<(Id, Id), Id>,
    /// (caller's node, its call id) -> invocation, for CANCELs from there.
    by_remote: HashMap<(NodeId, u64), Id>,
    /// Calls of this node's sessions handed to other nodes, by call id.
    forwarded: HashMap<u64, Forwarded>,
    /// (caller session, its request id) -> call id, for CANCEL.
    forwarded_by_request: HashMap<(Id, Id), u64>,
    /// Cancels of forwarded calls whose node is not known yet: sent when
    /// it is (every hand-off ends within seconds, and takes its entry).
    unsent_cancels: HashMap<u64, CancelMode>,
}

/// A call handed to another node (cluster mode), waiting for its answer.
struct Forwarded {
    session: Id,
    request: Id,
    /// The node that took it, once known.
    node: Option<NodeId>,
    /// The caller takes progressive results.
    progress: bool,
}

/// A CALL on its way to a callee.
pub struct CallRequest<'a> {
    pub caller: Caller,
    pub procedure: &'a str,
    pub options: &'a Dict,
    /// The caller's session, authid and authrole go to the callee.
    pub disclose: Option<(Id, &'a str, &'a str)>,
    pub args: Option<Value>,
    pub kwargs: Option<Value>,
}

/// What a cancel does (`options.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    /// The caller gets its error now; the callee is not told.
    Skip,
    /// The callee is interrupted and its ERROR goes to the caller.
    Kill,
    /// The callee is interrupted and the caller gets its error now.
    KillNoWait,
}

impl CancelMode {
    /// CANCEL's `mode` option (`killnowait` when absent).
    pub fn from_options(options: &Dict) -> Option<CancelMode> {
        match options.get("mode").and_then(Value::as_str) {
            None => Some(CancelMode::KillNoWait),
            Some(name) => CancelMode::from_name(name),
        }
    }

    pub fn from_name(name: &str) -> Option<CancelMode> {
        Some(match name {
            "skip" => CancelMode::Skip,
            "kill" => CancelMode::Kill,
            "killnowait" => CancelMode::KillNoWait,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            CancelMode::Skip => "skip",
            CancelMode::Kill => "kill",
            CancelMode::KillNoWait => "killnowait",
        }
    }
}

impl Dealer {
    /// Where a call goes: for the router's own calls (authenticators,
    /// authorizers) only an exact registration, so that no prefix or
    /// wildcard registration can capture them; the same for calls from
    /// other nodes (they came for this node's exact registration).
    fn target(&self, uri: &str, exact_only: bool) -> Option<Id> {
        match exact_only {
            true => self.registrations.lookup(uri, MatchPolicy::Exact),
            false => self.best_match(uri),
        }
    }

    /// The registration a call to `uri` goes to: an exact one, else the
    /// longest matching prefix, else the wildcard whose first wildcard
    /// component comes latest (then the one with the most components).
    pub fn best_match(&self, uri: &str) -> Option<Id> {
        let rank = |r: &Registration| match r.policy {
            MatchPolicy::Exact => (2, 0, 0),
            MatchPolicy::Prefix => (1, r.uri.len(), 0),
            MatchPolicy::Wildcard => {
                let parts: Vec<&str> = r.uri.split('.').collect();
                let first_wild = parts
                    .iter()
                    .position(|p| p.is_empty())
                    .unwrap_or(parts.len());
                (
                    0,
                    first_wild,
                    parts.iter().filter(|p| !p.is_empty()).count(),
                )
            }
        };
        self.registrations
            .matching(uri)
            .max_by_key(|(_, r)| rank(r))
            .map(|(id, _)| id)
    }
}

impl RealmState {
    /// Registers the session as a callee of `uri`: a new registration, or a
    /// place in a shared one when both ask for the same invocation policy
    /// (other than `single`). `Err` is the error URI.
    pub fn register(
        &mut self,
        session: Id,
        uri: String,
        policy: MatchPolicy,
        invoke: Invoke,
    ) -> Result<Id, &'static str> {
        let regs = &mut self.dealer.registrations;
        if let Some(id) = regs.lookup(&uri, policy) {
            let Some(reg) = regs.entries.get_mut(&id) else {
                return Err("wamp.error.procedure_already_exists");
            };
            if reg.kind.invoke != invoke {
                return Err("wamp.error.procedure_exists_with_different_invocation_policy");
            }
            if invoke == Invoke::Single || reg.sessions.contains(&session) {
                return Err("wamp.error.procedure_already_exists");
            }
            reg.sessions.push(session);
            self.held(session, true, 1);
            self.meta_event(
                "wamp.registration.on_register",
                vec![Value::UInt(session), Value::UInt(id)],
            );
            return Ok(id);
        }
        let id = self.id();
        if policy == MatchPolicy::Exact {
            self.cluster.offer(&self.name, &uri);
        }
        let reg = Entry::new(uri, policy, session, Shared { invoke, next: 0 });
        let details = reg.described(id);
        self.dealer.registrations.insert(id, reg);
        self.held(session, true, 1);
        self.meta_event(
            "wamp.registration.on_create",
            vec![Value::UInt(session), Value::Dict(details)],
        );
        self.meta_event(
            "wamp.registration.on_register",
            vec![Value::UInt(session), Value::UInt(id)],
        );
        Ok(id)
    }

    /// Whether the session was a callee of that registration. Calls it is
    /// serving for it go on.
    pub fn unregister(&mut self, session: Id, id: Id) -> bool {
        let exact = (self.dealer.registrations.entries.get(&id))
            .filter(|r| r.policy == MatchPolicy::Exact && self.cluster.link().is_some())
            .map(|r| r.uri.clone());
        let Some(emptied) = self.dealer.registrations.remove_session(id, session) else {
            return false;
        };
        if let (true, Some(uri)) = (emptied, exact) {
            self.cluster.offer(&self.name, &uri);
        }
        self.held(session, true, -1);
        let args = || vec![Value::UInt(session), Value::UInt(id)];
        self.meta_event("wamp.registration.on_unregister", args());
        if emptied {
            self.meta_event("wamp.registration.on_delete", args());
        }
        true
    }

    /// Hands a call to a callee; returns the invocation id, or gives the
    /// caller back when nobody registered the procedure.
    pub fn call(&mut self, req: CallRequest<'_>) -> Result<Id, Caller> {
        let exact_only = !matches!(req.caller, Caller::Session { .. });
        let Some(reg_id) = self.dealer.target(req.procedure, exact_only) else {
            return Err(req.caller);
        };
        let Some(reg) = self.dealer.registrations.entries.get_mut(&reg_id) else {
            return Err(req.caller);
        };
        let Some(callee) = reg.pick() else {
            return Err(req.caller);
        };
        let exact = reg.policy == MatchPolicy::Exact;
        let invocation = self.id();
        self.metrics.calls.inc();
        let progress = matches!(req.options.get("receive_progress"), Some(Value::Bool(true)))
            && !matches!(req.caller, Caller::Router(_));
        let mut details = Dict::new();
        if !exact {
            details.insert("procedure".into(), Value::Str(req.procedure.to_owned()));
        }
        if progress {
            details.insert("receive_progress".into(), Value::Bool(true));
        }
        if let Some((session, authid, authrole)) = req.disclose {
            details.insert("caller".into(), Value::UInt(session));
            details.insert("caller_authid".into(), Value::Str(authid.to_owned()));
            details.insert("caller_authrole".into(), Value::Str(authrole.to_owned()));
        }
        match req.caller {
            Caller::Session { id, request } => {
                self.dealer.by_request.insert((id, request), invocation);
                if let Some(member) = self.sessions.get_mut(&id) {
                    member.pending_calls += 1;
                }
            }
            Caller::Remote { node, call } => {
                self.dealer.by_remote.insert((node, call), invocation);
            }
            Caller::Router(_) => {}
        }
        let retry = matches!(req.caller, Caller::Router(_))
            .then(|| (req.procedure.to_owned(), req.args.clone()));
        self.dealer.pending.insert(
            invocation,
            Pending {
                caller: req.caller,
                timer: None,
                started: std::time::Instant::now(),
                callee,
                progress,
                canceling: false,
                retry,
            },
        );
        self.send(
            callee,
            Message::Invocation {
                request: invocation,
                registration: reg_id,
                details,
                args: req.args,
                kwargs: req.kwargs,
            },
        );
        Ok(invocation)
    }

    /// Ends a pending call: it leaves the tables and its caller's count.
    fn finish(&mut self, invocation: Id) -> Option<Pending> {
        let pending = self.dealer.pending.remove(&invocation)?;
        if let Some(timer) = &pending.timer {
            timer.abort();
        }
        self.metrics
            .call_seconds
            .observe(pending.started.elapsed().as_secs_f64());
        match pending.caller {
            Caller::Session { id, request } => {
                self.dealer.by_request.remove(&(id, request));
                if let Some(member) = self.sessions.get_mut(&id) {
                    member.pending_calls = member.pending_calls.saturating_sub(1);
                }
            }
            Caller::Remote { node, call } => {
                self.dealer.by_remote.remove(&(node, call));
            }
            Caller::Router(_) => {}
        }
        Some(pending)
    }

    /// Sends a call's outcome to its caller, whichever kind it is.
    fn deliver(&mut self, caller: Caller, outcome: Outcome, details: Dict) {
        if matches!(outcome, Outcome::Error(..)) {
            self.metrics.call_errors.inc();
        }
        match caller {
            Caller::Router(tx) => {
                let _ = tx.send(outcome);
            }
            Caller::Session { id, request } => {
                let message = match outcome {
                    Outcome::Result(args, kwargs) => Message::Result {
                        request,
                        details,
                        args,
                        kwargs,
                    },
                    Outcome::Error(error, args) => Message::Error {
                        request_type: m::CALL,
                        request,
                        details,
                        error,
                        args,
                        kwargs: None,
                    },
                };
                self.send(id, message);
            }
            Caller::Remote { node, call } => {
                let realm = self.name.to_string();
                let frame = match outcome {
                    Outcome::Result(args, kwargs) => Frame::Result {
                        realm,
                        call,
                        progress: false,
                        args,
                        kwargs,
                    },
                    Outcome::Error(error, args) => Frame::Error {
                        realm,
                        call,
                        error,
                        args,
                        kwargs: None,
                    },
                };
                self.to_node(node, &frame);
            }
        }
    }

    /// Sends to another node's inbox (cluster mode).
    fn to_node(&self, node: NodeId, frame: &Frame) {
        if let Some(link) = self.cluster.link() {
            link.send_to(node, frame);
        }
    }

    /// A callee's YIELD: a progressive result goes on (when the caller takes
    /// them) and the call stays; a final one ends the call.
    pub fn yielded(
        &mut self,
        callee: Id,
        invocation: Id,
        options: &Dict,
        args: Option<Value>,
        kwargs: Option<Value>,
    ) {
        let Some(p) = self.dealer.pending.get(&invocation) else {
            return;
        };
        if p.callee != callee {
            return;
        }
        if matches!(options.get("progress"), Some(Value::Bool(true))) {
            match (p.progress, &p.caller) {
                (true, Caller::Session { id, request }) => {
                    let (id, request) = (*id, *request);
                    self.send(
                        id,
                        Message::Result {
                            request,
                            details: Dict::from([("progress".into(), Value::Bool(true))]),
                            args,
                            kwargs,
                        },
                    );
                }
                (true, Caller::Remote { node, call }) => {
                    let frame = Frame::Result {
                        realm: self.name.to_string(),
                        call: *call,
                        progress: true,
                        args,
                        kwargs,
                    };
                    self.to_node(*node, &frame);
                }
                _ => {}
            }
            return;
        }
        if let Some(p) = self.finish(invocation) {
            self.deliver(p.caller, Outcome::Result(args, kwargs), Dict::new());
        }
    }

    /// A callee's ERROR for an invocation: it goes to the caller.
    pub fn failed(
        &mut self,
        callee: Id,
        invocation: Id,
        error: String,
        args: Option<Value>,
        kwargs: Option<Value>,
    ) {
        match self.dealer.pending.get(&invocation) {
            Some(p) if p.callee == callee => {}
            _ => return,
        }
        if let Some(p) = self.finish(invocation) {
            self.metrics.call_errors.inc();
            match p.caller {
                Caller::Session { id, request } => {
                    self.send(id, call_error(request, error, args, kwargs))
                }
                Caller::Router(tx) => {
                    let _ = tx.send(Outcome::Error(error, args));
                }
                Caller::Remote { node, call } => {
                    let frame = Frame::Error {
                        realm: self.name.to_string(),
                        call,
                        error,
                        args,
                        kwargs,
                    };
                    self.to_node(node, &frame);
                }
            }
        }
    }

    /// A caller's CANCEL; `false` when no such call is pending.
    pub fn cancel(&mut self, caller: Id, request: Id, mode: CancelMode) -> bool {
        if let Some(call) = self.dealer.forwarded_by_request.get(&(caller, request)) {
            let call = *call;
            return self.cancel_forwarded(call, mode);
        }
        match self.dealer.by_request.get(&(caller, request)) {
            Some(invocation) => self.cancel_invocation(*invocation, mode),
            None => false,
        }
    }

    /// A CANCEL from the caller's node (cluster mode).
    pub fn cancel_remote(&mut self, node: NodeId, call: u64, mode: CancelMode) {
        if let Some(invocation) = self.dealer.by_remote.get(&(node, call)) {
            self.cancel_invocation(*invocation, mode);
        }
    }

    fn cancel_invocation(&mut self, invocation: Id, mode: CancelMode) -> bool {
        let Some(p) = self.dealer.pending.get_mut(&invocation) else {
            return false;
        };
        if p.canceling {
            return true;
        }
        let callee = p.callee;
        // A callee that cannot be interrupted is skipped (WAMP's rule).
        let mode = match self.sessions.get(&callee) {
            Some(m) if m.cancels => mode,
            _ => CancelMode::Skip,
        };
        match mode {
            CancelMode::Skip => {}
            CancelMode::Kill => self.interrupt(callee, invocation, "kill"),
            CancelMode::KillNoWait => {
                self.interrupt(callee, invocation, CancelMode::KillNoWait.name())
            }
        }
        if mode == CancelMode::Kill {
            if let Some(p) = self.dealer.pending.get_mut(&invocation) {
                p.canceling = true;
            }
            return true;
        }
        if let Some(p) = self.finish(invocation) {
            self.deliver(
                p.caller,
                Outcome::Error("wamp.error.canceled".into(), None),
                Dict::new(),
            );
        }
        true
    }

    /// A call's `timeout` ran out: the callee is interrupted and the caller
    /// gets `wamp.error.timeout`.
    pub fn timed_out(&mut self, invocation: Id) {
        let Some(p) = self.finish(invocation) else {
            return;
        };
        self.interrupt(p.callee, invocation, CancelMode::KillNoWait.name());
        self.deliver(
            p.caller,
            Outcome::Error(
                "wamp.error.timeout".into(),
                Some(Value::List(vec![Value::Str(
                    "the call's timeout ran out".into(),
                )])),
            ),
            Dict::new(),
        );
    }

    /// Keeps a call's `timeout` timer, to be stopped when the call ends;
    /// a call that ended already stops it now.
    fn set_timer(&mut self, invocation: Id, timer: tokio::task::AbortHandle) {
        match self.dealer.pending.get_mut(&invocation) {
            Some(p) => p.timer = Some(timer),
            None => timer.abort(),
        }
    }

    /// The router gave up waiting on its own call.
    pub fn forget(&mut self, invocation: Id) {
        self.finish(invocation);
    }

    /// A session left: calls it was serving fail at once with
    /// `wamp.error.canceled`; callees of calls it made are interrupted.
    pub fn fail_calls_of(&mut self, session: Id) {
        let gone: Vec<Id> = self
            .dealer
            .pending
            .iter()
            .filter(|(_, p)| {
                p.callee == session
                    || matches!(p.caller, Caller::Session { id, .. } if id == session)
            })
            .map(|(inv, _)| *inv)
            .collect();
        let forwarded: Vec<u64> = self
            .dealer
            .forwarded
            .iter()
            .filter(|(_, f)| f.session == session)
            .map(|(call, _)| *call)
            .collect();
        for call in forwarded {
            // Forgotten here (late answers are dropped); the node serving
            // it interrupts its callee.
            if let Some(f) = self.finish_forwarded(call) {
                self.tell_node(f.node, call, CancelMode::KillNoWait);
            }
        }
        for invocation in gone {
            if self.redispatch(invocation, session) {
                continue;
            }
            let Some(p) = self.finish(invocation) else {
                continue;
            };
            if p.callee == session {
                self.deliver(
                    p.caller,
                    Outcome::Error(
                        "wamp.error.canceled".into(),
                        Some(Value::List(vec![Value::Str(
                            "the callee left while the call was in progress".into(),
                        )])),
                    ),
                    Dict::new(),
                );
            } else {
                self.interrupt(p.callee, invocation, CancelMode::KillNoWait.name());
            }
        }
    }
}

impl RealmState {
    /// An INTERRUPT, to a callee that announced `call_canceling`.
    fn interrupt(&mut self, callee: Id, invocation: Id, mode: &str) {
        if self.sessions.get(&callee).is_some_and(|m| m.cancels) {
            self.send(
                callee,
                Message::Interrupt {
                    request: invocation,
                    options: Dict::from([("mode".into(), Value::Str(mode.into()))]),
                },
            );
        }
    }

    /// Hands the router's own call, whose callee `gone` left, to another
    /// callee of the procedure under the same invocation id; `false` when
    /// it is not such a call or nobody else can take it.
    fn redispatch(&mut self, invocation: Id, gone: Id) -> bool {
        let Some(p) = self.dealer.pending.get(&invocation) else {
            return false;
        };
        let Some((procedure, args)) = p.retry.clone().filter(|_| p.callee == gone) else {
            return false;
        };
        let Some(reg_id) = self.dealer.target(&procedure, true) else {
            return false;
        };
        let Some(reg) = self.dealer.registrations.entries.get_mut(&reg_id) else {
            return false;
        };
        let exact = reg.policy == MatchPolicy::Exact;
        let Some(callee) = reg.pick().filter(|c| *c != gone) else {
            return false;
        };
        if let Some(p) = self.dealer.pending.get_mut(&invocation) {
            p.callee = callee;
        }
        let mut details = Dict::new();
        if !exact {
            details.insert("procedure".into(), Value::Str(procedure));
        }
        self.send(
            callee,
            Message::Invocation {
                request: invocation,
                registration: reg_id,
                details,
                args,
                kwargs: None,
            },
        );
        true
    }
}

/// An ERROR for a CALL nobody can take.
pub fn no_such_procedure(request: Id, procedure: &str) -> Message {
    error_with(
        m::CALL,
        request,
        "wamp.error.no_such_procedure",
        format!("no callee registered procedure `{procedure}`"),
    )
}

/// Starts a call's `timeout` (milliseconds; 0: none): when it runs out
/// the callee is interrupted and the caller gets `wamp.error.timeout`.
pub fn arm_timeout(realm: &Arc<Realm>, invocation: Id, timeout: u64) {
    if timeout == 0 {
        return;
    }
    let weak = Arc::downgrade(realm);
    let timer = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(timeout)).await;
        if let Some(realm) = weak.upgrade() {
            realm.state().timed_out(invocation);
        }
    });
    realm.state().set_timer(invocation, timer.abort_handle());
}

/// Hands a session's call to a callee of this node and starts its
/// timeout; the ERROR for the caller when nobody here registered it.
pub fn call_here(realm: &Arc<Realm>, req: CallRequest<'_>, timeout: u64) -> Option<Message> {
    let request = match req.caller {
        Caller::Session { request, .. } => request,
        _ => 0,
    };
    let procedure = req.procedure;
    let placed = realm.state().call(req);
    match placed {
        Ok(invocation) => {
            arm_timeout(realm, invocation, timeout);
            None
        }
        Err(_) => {
            realm.state().metrics.call_errors.inc();
            Some(no_such_procedure(request, procedure))
        }
    }
}

/// Calls handed to other nodes (cluster mode): the caller's side.
impl RealmState {
    /// Notes a call of `session` on its way to another node; its call id.
    /// It counts among the session's pending calls until answered.
    pub fn forward(&mut self, session: Id, request: Id, progress: bool) -> u64 {
        // Random: an answer for a call is not easily forged on the bus.
        let call = loop {
            let c = fastrand::u64(1..);
            if !self.dealer.forwarded.contains_key(&c) {
                break c;
            }
        };
        self.dealer.forwarded.insert(
            call,
            Forwarded {
                session,
                request,
                node: None,
                progress,
            },
        );
        self.dealer
            .forwarded_by_request
            .insert((session, request), call);
        if let Some(member) = self.sessions.get_mut(&session) {
            member.pending_calls += 1;
        }
        call
    }

    fn finish_forwarded(&mut self, call: u64) -> Option<Forwarded> {
        let f = self.dealer.forwarded.remove(&call)?;
        self.dealer
            .forwarded_by_request
            .remove(&(f.session, f.request));
        if let Some(member) = self.sessions.get_mut(&f.session) {
            member.pending_calls = member.pending_calls.saturating_sub(1);
        }
        Some(f)
    }

    /// Takes a forwarded call back to serve it another way: it ends here.
    /// `None` when its caller left or canceled it.
    pub fn take_forwarded(&mut self, call: u64) -> Option<(Id, Id)> {
        let canceled = self.dealer.unsent_cancels.remove(&call).is_some();
        let f = self.finish_forwarded(call)?;
        if canceled {
            self.metrics.call_errors.inc();
            self.send(
                f.session,
                error_with(
                    m::CALL,
                    f.request,
                    "wamp.error.canceled",
                    "canceled by the caller".into(),
                ),
            );
            return None;
        }
        Some((f.session, f.request))
    }

    fn cancel_frame(&self, call: u64, mode: CancelMode) -> Frame {
        Frame::Cancel {
            realm: self.name.to_string(),
            call,
            mode,
        }
    }

    /// Tells the node serving a call to cancel it, now or once known.
    fn tell_node(&mut self, node: Option<NodeId>, call: u64, mode: CancelMode) {
        match node {
            Some(node) => self.to_node(node, &self.cancel_frame(call, mode)),
            None => {
                self.dealer.unsent_cancels.insert(call, mode);
            }
        }
    }

    /// `node` took the call; a cancel asked for meanwhile (the call may
    /// have ended here already) goes to it now.
    pub fn forward_accepted(&mut self, call: u64, node: NodeId) {
        if let Some(f) = self.dealer.forwarded.get_mut(&call) {
            f.node.get_or_insert(node);
        }
        if let Some(mode) = self.dealer.unsent_cancels.remove(&call) {
            self.to_node(node, &self.cancel_frame(call, mode));
        }
    }

    /// A result, progressive result or error from the node serving the
    /// call.
    pub fn forward_answered(&mut self, call: u64, from: NodeId, answer: Frame) {
        let Some(f) = self.dealer.forwarded.get_mut(&call) else {
            return;
        };
        // Only the node that took it answers.
        if *f.node.get_or_insert(from) != from {
            return;
        }
        let (session, request, progress) = (f.session, f.request, f.progress);
        let message = match answer {
            Frame::Result {
                progress: true,
                args,
                kwargs,
                ..
            } => {
                if progress {
                    self.send(
                        session,
                        Message::Result {
                            request,
                            details: Dict::from([("progress".into(), Value::Bool(true))]),
                            args,
                            kwargs,
                        },
                    );
                }
                return;
            }
            Frame::Result { args, kwargs, .. } => Message::Result {
                request,
                details: Dict::new(),
                args,
                kwargs,
            },
            Frame::Error {
                error,
                args,
                kwargs,
                ..
            } => call_error(request, error, args, kwargs),
            _ => return,
        };
        self.finish_forwarded(call);
        self.send(session, message);
    }

    /// Ends a forwarded call with an error of this node's (or the node
    /// that refused it).
    pub fn forward_failed(&mut self, call: u64, error: &str, message: String) {
        self.dealer.unsent_cancels.remove(&call);
        if let Some(f) = self.finish_forwarded(call) {
            self.metrics.call_errors.inc();
            self.send(f.session, error_with(m::CALL, f.request, error, message));
        }
    }

    /// The caller's CANCEL of a forwarded call: `skip` and `killnowait`
    /// answer it now; `kill` waits for the callee's ERROR. The node serving
    /// it is told (but for `skip`).
    fn cancel_forwarded(&mut self, call: u64, mode: CancelMode) -> bool {
        let Some(f) = self.dealer.forwarded.get_mut(&call) else {
            return false;
        };
        let node = f.node;
        if mode != CancelMode::Kill {
            self.forward_failed(call, "wamp.error.canceled", "canceled by the caller".into());
        }
        if mode != CancelMode::Skip {
            self.tell_node(node, call, mode);
        }
        true
    }

    /// Fails the forwarded calls whose node `lost` says is gone (`None`:
    /// not yet taken) with `tollgate.error.node_lost`.
    pub fn fail_forwarded(&mut self, lost: impl Fn(Option<NodeId>) -> bool, why: &str) -> usize {
        let gone: Vec<u64> = self
            .dealer
            .forwarded
            .iter()
            .filter(|(_, f)| lost(f.node))
            .map(|(call, _)| *call)
            .collect();
        for call in &gone {
            self.forward_failed(*call, NODE_LOST, why.to_owned());
        }
        gone.len()
    }

    /// Ends the calls this node serves for callers on nodes `lost` says
    /// are gone: their callees are interrupted.
    pub fn drop_calls_from(&mut self, lost: impl Fn(NodeId) -> bool) {
        let gone: Vec<Id> = self
            .dealer
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.caller, Caller::Remote { node, .. } if lost(node)))
            .map(|(inv, _)| *inv)
            .collect();
        for invocation in gone {
            if let Some(p) = self.finish(invocation) {
                self.interrupt(p.callee, invocation, CancelMode::KillNoWait.name());
            }
        }
    }
}

/// The error of a call whose node was lost (or the bus to it).
pub const NODE_LOST: &str = "tollgate.error.node_lost";
