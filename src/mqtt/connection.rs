//! One client connection, from its CONNECT to its end: authentication,
//! the session it attaches to, every packet it sends, the deliveries it is
//! owed (within its receive maximum), keep alive, token expiry, a will
//! when it goes without a DISCONNECT, and a takeover by a newer connection
//! with the same client id.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, LastWill, Login, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
    RetainForwardRule, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::broker::{Broker, Settings};
use super::codec::{self, DecodeError, Packet, QoS, Version};
use super::persist::{Journal, Op};
use super::router::SubOptions;
use super::session::{Delivery, Message, Outgoing, Session};
use super::topic;
use crate::authz::Action;
use crate::config::TokenField;
use crate::identity::{AuthMethod, CertIdentity, Identity, Refusal};

/// The facts of a connection the broker needs.
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub cert: Option<Arc<CertIdentity>>,
    pub transport: &'static str,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client (with or without its will, v5 0x04).
    Disconnected {
        will: bool,
    },
    Closed,
    KeepAlive,
    TakenOver,
    /// Ended by an operator (the admin API).
    Evicted,
    TokenExpired,
    Shutdown,
    /// A protocol error or malformed packet, with the v5 reason sent.
    Error(DisconnectReasonCode),
}

impl End {
    fn describe(self) -> &'static str {
        match self {
            End::Disconnected { will: false } => "disconnected",
            End::Disconnected { will: true } => "disconnected with its will",
            End::Closed => "connection closed without DISCONNECT",
            End::KeepAlive => "keep alive expired",
            End::TakenOver => "taken over by a newer connection with the same client id",
            End::Evicted => "ended by an operator",
            End::TokenExpired => "its token expired",
            End::Shutdown => "server shutting down",
            End::Error(_) => "protocol error",
        }
    }

    fn sends_will(self) -> bool {
        !matches!(self, End::Disconnected { will: false } | End::Shutdown)
    }
}

/// Serves one connection until it ends.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut io: S,
    info: ConnInfo,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) {
    let settings = broker.settings.load_full();
    let max_packet = settings.limits.max_packet_size.as_usize();
    let mut buf = BytesMut::with_capacity(512);
    let first = tokio::time::timeout(
        settings.limits.connect_timeout,
        read_packet(&mut io, &mut buf, None, max_packet),
    )
    .await;
    let (packet, version) = match first {
        Ok(Ok(Some(p))) => p,
        Ok(Err(DecodeError::Protocol(level))) => {
            // MQTT 3.1.1 §3.2.2.3: 0x01, unacceptable protocol level.
            let _ = send_all(&mut io, &[0x20, 0x02, 0x00, 0x01]).await;
            tracing::info!(listener = %info.listener, peer = %info.peer, level,
                "MQTT connection refused: protocol level not supported (3.1.1 and 5 are)");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(listener = %info.listener, peer = %info.peer, error = %e,
                "MQTT connection closed before CONNECT");
            return;
        }
        Ok(Ok(None)) => return,
        Err(_) => {
            tracing::info!(listener = %info.listener, peer = %info.peer,
                "MQTT connection closed: no CONNECT within the connect timeout");
            return;
        }
    };
    let Packet::Connect(connect, will, login) = packet else {
        return;
    };
    let mut conn = match Connection::accept(
        &mut io, &info, &broker, settings, version, connect, will, login,
    )
    .await
    {
        Some(c) => c,
        None => return,
    };
    let end = conn.run(&mut io, &mut buf, &shutdown).await;
    conn.finish(&mut io, end).await;
}

/// Writes and flushes (TLS and WebSocket streams hold bytes until flushed).
async fn send_all<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Reads until a whole packet is in `buf` (`None`: the peer closed).
async fn read_packet<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    version: Option<Version>,
    max: usize,
) -> Result<Option<(Packet, Version)>, DecodeError> {
    loop {
        if let Some(p) = codec::read(buf, version, max)? {
            return Ok(Some(p));
        }
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

struct Connection {
    version: Version,
    session: Arc<Session>,
    /// Which attachment of the session this is.
    generation: u64,
    kick: Arc<Notify>,
    identity: Arc<Identity>,
    broker: Arc<Broker>,
    info_listener: Arc<str>,
    /// This listener's message and byte counters.
    counters: super::broker::ListenerCounters,
    peer: SocketAddr,
    keep_alive: Option<Duration>,
    /// Deliveries in flight at once the client takes (its Receive Maximum).
    client_receive_max: usize,
    client_max_packet: Option<u32>,
    client_alias_max: u16,
    aliases_in: HashMap<u16, Arc<str>>,
    aliases_out: HashMap<Arc<str>, u16>,
    will: Option<LastWill>,
    /// Rules the client's token carries (`auth.jwt.acl_claim`).
    claim_policy: Option<Arc<crate::authz::Policy>>,
    denied_logged: HashSet<String>,
    expires_at: Option<Instant>,
    out: BytesMut,
}

/// A refused CONNECT: the code and why (for the log).
struct Refused(ConnectReturnCode, String);

impl Connection {
    #[allow(clippy::too_many_arguments)]
    async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut S,
        info: &ConnInfo,
        broker: &Arc<Broker>,
        settings: Arc<Settings>,
        version: Version,
        connect: rumqttc::v5::mqttbytes::v5::Connect,
        will: Option<LastWill>,
        login: Option<Login>,
    ) -> Option<Connection> {
        let limits = &settings.limits;
        let props = connect.properties.clone().unwrap_or_default();
        let refuse = async |io: &mut S, Refused(code, why): Refused| {
            let mut out = BytesMut::new();
            let ack = Packet::ConnAck(ConnAck {
                session_present: false,
                code,
                properties: None,
            });
            let _ = codec::write(&ack, version, &mut out, None);
            let _ = send_all(io, &out).await;
            broker
                .metrics
                .connects
                .with_label_values(&[&info.listener, "refused"])
                .inc();
            tracing::info!(listener = %info.listener, peer = %info.peer, client_id = %connect.client_id,
                user = login.as_ref().map_or("", |l| l.username.as_str()), code = ?code, reason = %why,
                "MQTT connection refused");
        };
        if props.authentication_method.is_some() {
            refuse(
                io,
                Refused(
                    ConnectReturnCode::BadAuthenticationMethod,
                    "enhanced authentication (AUTH) is not offered".into(),
                ),
            )
            .await;
            return None;
        }
        // The client id: assigned when empty (v5, or a 3.1.1 clean session).
        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if version == Version::V311 && !connect.clean_start {
                refuse(
                    io,
                    Refused(
                        ConnectReturnCode::ClientIdentifierNotValid,
                        "an empty client id needs a clean session".into(),
                    ),
                )
                .await;
                return None;
            }
            let id = format!("auto-{:016x}", fastrand::u64(..));
            assigned = Some(id.clone());
            Arc::from(id)
        } else if connect.client_id.len() > 256 || connect.client_id.contains('\0') {
            refuse(
                io,
                Refused(
                    ConnectReturnCode::ClientIdentifierNotValid,
                    "client id longer than 256 bytes".into(),
                ),
            )
            .await;
            return None;
        } else {
            Arc::from(connect.client_id.as_str())
        };
        if broker.locked_out(info.peer.ip(), &client_id) {
            broker
                .metrics
                .auth_failures
                .with_label_values(&[&info.listener, "rate_limited"])
                .inc();
            refuse(
                io,
                Refused(
                    ConnectReturnCode::ConnectionRateExceeded,
                    "too many failed logins from this address; try later".into(),
                ),
            )
            .await;
            return None;
        }
        let identity =
            match authenticate(&settings, login.as_ref(), info.cert.clone(), &client_id).await {
                Ok(id) => id,
                Err(refused) => {
                    let reason = match refused.0 {
                        ConnectReturnCode::BadUserNamePassword => "bad_credentials",
                        _ => "not_authorized",
                    };
                    broker
                        .metrics
                        .auth_failures
                        .with_label_values(&[&info.listener, reason])
                        .inc();
                    broker.failed_login(info.peer.ip(), &client_id);
                    refuse(io, refused).await;
                    return None;
                }
            };
        // Rules from the token (EMQX's `acl` claim), when configured.
        let claim_policy = match claim_rules(&settings, &identity) {
            Ok(p) => p.map(Arc::new),
            Err(why) => {
                refuse(io, Refused(ConnectReturnCode::NotAuthorized, why)).await;
                return None;
            }
        };
        // The will must be one the client may publish.
        if let Some(w) = &will {
            let topic = std::str::from_utf8(&w.topic).unwrap_or("");
            if topic::valid_name(topic).is_err() {
                refuse(
                    io,
                    Refused(
                        ConnectReturnCode::TopicNameInvalid,
                        "the will topic is not a topic name".into(),
                    ),
                )
                .await;
                return None;
            }
            let action = Action::Publish {
                topic,
                qos: w.qos as u8,
                retain: w.retain,
            };
            if !decide(&settings, claim_policy.as_ref(), &identity, &action).allowed() {
                broker
                    .metrics
                    .denied
                    .with_label_values(&[&info.listener, "will"])
                    .inc();
                refuse(
                    io,
                    Refused(
                        ConnectReturnCode::NotAuthorized,
                        format!("the will topic {topic:?} is not allowed"),
                    ),
                )
                .await;
                return None;
            }
        }
        // Keep alive, within the configured maximum (v5 is told).
        let mut server_keep_alive = None;
        let mut keep_alive = connect.keep_alive;
        let max_ka = limits.max_keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
        if version == Version::V5 && max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
            keep_alive = max_ka;
            server_keep_alive = Some(max_ka);
        }
        // Session expiry: v5 asks; a 3.1.1 persistent session lasts the maximum.
        let max_expiry = limits.max_session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
        let (expiry, told_expiry) = match version {
            Version::V5 => {
                let asked = props.session_expiry_interval.unwrap_or(0);
                let kept = asked.min(max_expiry);
                (kept, (kept != asked).then_some(kept))
            }
            Version::V311 if connect.clean_start => (0, None),
            Version::V311 => (max_expiry, None),
        };

        // Attach: take over a connection with the same id, resume or
        // replace its session. A session is resumed only by whoever owns
        // it (the same user, authenticated the same way): another client
        // using its id starts afresh and ends the old one. Generations
        // move while `sessions` is held, so an expiry timer (which checks
        // under the same lock) never ends a session being resumed.
        let owner = (
            identity.subject.clone(),
            identity.method.as_str().to_owned(),
        );
        // Cluster mode: a session another node holds comes here (or ends
        // there, for a clean start or another owner).
        let handover = broker.handover.get().cloned();
        let mut adopted = false;
        if let Some(h) = &handover
            && !broker.sessions().contains_key(&client_id)
            && let Some(moved) = h.take(&client_id, connect.clean_start, &owner).await
        {
            adopted = broker.adopt(moved).is_some();
        }
        let kick = Arc::new(Notify::new());
        let (session, present, replaced, generation) = {
            let mut sessions = broker.sessions();
            let existing = sessions.get(&client_id).cloned();
            let owned = |s: &Arc<Session>| s.state().owner.as_ref().is_none_or(|o| *o == owner);
            let (session, present, replaced) = match existing {
                Some(s) if !connect.clean_start && owned(&s) => (s, true, None),
                old => {
                    let s = Session::new(client_id.clone());
                    sessions.insert(client_id.clone(), s.clone());
                    broker.held(&client_id);
                    (s, false, old)
                }
            };
            for old in [replaced.as_ref(), present.then_some(&session)]
                .into_iter()
                .flatten()
            {
                old.state().take_over();
            }
            let generation = {
                let mut st = session.state();
                st.generation += 1;
                st.kick = Some(kick.clone());
                st.expiry_secs = expiry;
                st.identity = Some(identity.clone());
                st.owner = Some(owner.clone());
                st.generation
            };
            broker.metrics.sessions.set(sessions.len() as i64);
            (session, present, replaced, generation)
        };
        if let Some(old) = replaced {
            // The map holds the new session now: the old one's journal
            // record (its queue and QoS 2 state) goes here, before the new
            // one's is written.
            broker.forget_replaced(&old);
        }
        if present {
            // Rules may have changed since the session was made (a reload,
            // a restart): what it may no longer hold goes.
            drop_refused_subscriptions(
                broker,
                &settings,
                claim_policy.as_ref(),
                &identity,
                &session,
            );
        }
        session.set_connected(true);
        broker.persist_session(&session, 0);

        let mut conn = Connection {
            version,
            session,
            generation,
            kick,
            identity,
            broker: broker.clone(),
            info_listener: info.listener.clone(),
            counters: broker.metrics.listener(&info.listener),
            peer: info.peer,
            keep_alive: (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive))),
            // What the client takes (v5), within what the broker allows itself.
            client_receive_max: usize::from(
                props
                    .receive_maximum
                    .unwrap_or(u16::MAX)
                    .clamp(1, limits.max_inflight),
            ),
            client_max_packet: props.max_packet_size,
            client_alias_max: props.topic_alias_max.unwrap_or(0),
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            will,
            claim_policy: claim_policy.clone(),
            denied_logged: HashSet::new(),
            expires_at: None,
            out: BytesMut::with_capacity(512),
        };
        if settings.auth.disconnect_on_expiry && conn.identity.method == AuthMethod::Jwt {
            conn.expires_at = conn.identity.expires_at.map(|at| {
                let now = crate::identity::jwt::unix_now();
                Instant::now() + Duration::from_secs(at.saturating_sub(now))
            });
        }
        let properties = (version == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: told_expiry,
            receive_max: Some(limits.max_inflight),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(limits.max_packet_size.as_usize().min(u32::MAX as usize) as u32),
            assigned_client_identifier: assigned,
            topic_alias_max: Some(limits.max_topic_aliases),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        conn.send(&Packet::ConnAck(ConnAck {
            session_present: present,
            code: ConnectReturnCode::Success,
            properties,
        }));
        broker
            .metrics
            .connects
            .with_label_values(&[&info.listener, "accepted"])
            .inc();
        broker
            .metrics
            .connections
            .with_label_values(&[&info.listener])
            .inc();
        broker
            .totals
            .connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cert = conn.identity.cert.as_deref().or(info.cert.as_deref());
        tracing::info!(
            listener = %info.listener, peer = %info.peer, transport = info.transport,
            client_id = %conn.session.client_id, user = %conn.identity.subject,
            via = conn.identity.method.as_str(), mqtt = version.as_str(),
            session_present = present, keep_alive,
            cert_cn = cert.and_then(|c| c.cn.as_deref()).unwrap_or(""),
            cert_o = %cert.map(|c| c.o.join(",")).unwrap_or_default(),
            cert_sha256 = cert.map_or("", |c| c.sha256.as_str()),
            "MQTT client connected"
        );
        // What a resumed session had in flight goes again, as duplicates.
        if present {
            let resend: Vec<(u16, Outgoing)> = conn
                .session
                .state()
                .inflight
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (pkid, o) in resend {
                match o {
                    Outgoing::Published(d) => conn.write_delivery(pkid, &d, true),
                    Outgoing::Released(_) => conn.send(&Packet::PubRel(PubRel::new(pkid, None))),
                }
            }
        }
        if adopted
            && present
            && let Some(h) = &handover
        {
            // What the node it came from queued for it meanwhile follows.
            h.finish(broker.clone(), conn.session.clone());
        }
        if send_all(io, &conn.out).await.is_err() {
            return None;
        }
        conn.count_out();
        Some(conn)
    }

    fn journal(&self) -> Option<&Journal> {
        self.broker.journal.as_ref()
    }

    /// A persisted delivery is done with (acknowledged, expired, dropped).
    fn forget(&self, seq: u64) {
        if let Some(j) = self.journal().filter(|_| seq > 0) {
            j.send(Op::Dequeue(self.session.client_id.to_string(), seq));
        }
    }

    fn settings(&self) -> Arc<Settings> {
        self.broker.settings.load_full()
    }

    fn send(&mut self, packet: &Packet) {
        if let Err(e) = codec::write(packet, self.version, &mut self.out, self.client_max_packet) {
            tracing::debug!(client_id = %self.session.client_id, error = %e, "packet not sent");
        }
    }

    fn count_out(&mut self) {
        let n = self.out.len() as u64;
        self.counters.bytes_out.inc_by(n);
        self.broker
            .totals
            .bytes_sent
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.out.clear();
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        shutdown: &CancellationToken,
    ) -> End {
        let max_packet = self.settings().limits.max_packet_size.as_usize();
        let mut last_seen = Instant::now();
        // Deliveries queued before this connection came.
        if let Some(end) = self.flush() {
            return end;
        }
        loop {
            if !self.out.is_empty() {
                if send_all(io, &self.out).await.is_err() {
                    return End::Closed;
                }
                self.count_out();
            }
            // Whole packets already read go first.
            match codec::read(buf, Some(self.version), max_packet) {
                Ok(Some((packet, _))) => {
                    last_seen = Instant::now();
                    if let Some(end) = self.handle(packet).await {
                        return end;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(DecodeError::TooLarge(_)) => {
                    return End::Error(DisconnectReasonCode::PacketTooLarge);
                }
                Err(e) => {
                    tracing::info!(client_id = %self.session.client_id, error = %e, "malformed MQTT packet");
                    return End::Error(DisconnectReasonCode::MalformedPacket);
                }
            }
            let keep_alive = async {
                match self.keep_alive {
                    // 1.5 times the keep alive (MQTT 5 §3.1.2.10).
                    Some(ka) => tokio::time::sleep_until((last_seen + ka + ka / 2).into()).await,
                    None => std::future::pending().await,
                }
            };
            let expiry = async {
                match self.expires_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let before = buf.len();
            tokio::select! {
                read = io.read_buf(buf) => match read {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(_) => {
                        let n = (buf.len() - before) as u64;
                        self.counters.bytes_in.inc_by(n);
                        self.broker.totals.bytes_received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                },
                _ = self.session.wake.notified() => {
                    if let Some(end) = self.flush() {
                        return end;
                    }
                }
                _ = self.kick.notified() => {
                    return match self.session.state().evicted {
                        true => End::Evicted,
                        false => End::TakenOver,
                    };
                }
                _ = keep_alive => return End::KeepAlive,
                _ = expiry => return End::TokenExpired,
                _ = shutdown.cancelled() => return End::Shutdown,
            }
        }
    }

    /// Moves queued deliveries into flight, as far as the client's receive
    /// maximum allows, and writes them.
    fn flush(&mut self) -> Option<End> {
        let now = Instant::now();
        let mut batch = Vec::new();
        {
            let mut st = self.session.state();
            if st.generation != self.generation {
                let evicted = st.evicted;
                drop(st);
                // A newer connection has this session: let it see the wake.
                self.session.wake.notify_one();
                return Some(if evicted {
                    End::Evicted
                } else {
                    End::TakenOver
                });
            }
            while let Some(d) = st.queue.front() {
                if d.qos != QoS::AtMostOnce && st.inflight.len() >= self.client_receive_max {
                    break;
                }
                let Some(d) = st.queue.pop_front() else { break };
                if d.message.expires_at.is_some_and(|t| t <= now) {
                    self.broker.metrics.dropped.expired.inc();
                    self.forget(d.seq);
                    continue;
                }
                let pkid = match d.qos {
                    QoS::AtMostOnce => 0,
                    _ => match st.next_pkid() {
                        Some(id) => {
                            if let Some(j) = self.journal().filter(|_| d.seq > 0) {
                                j.send(Op::Update(
                                    self.session.client_id.to_string(),
                                    d.seq,
                                    d.stored(id, false),
                                ));
                            }
                            st.inflight.insert(id, Outgoing::Published(d.clone()));
                            id
                        }
                        None => {
                            st.queue.push_front(d);
                            break;
                        }
                    },
                };
                batch.push((pkid, d));
            }
        }
        for (pkid, d) in batch {
            self.write_delivery(pkid, &d, false);
        }
        None
    }

    fn write_delivery(&mut self, pkid: u16, d: &Delivery, dup: bool) {
        let m = &d.message;
        // 3.1.1 carries no properties: nothing to copy for it.
        let mut properties = match self.version {
            Version::V5 => m.properties.clone(),
            Version::V311 => None,
        };
        if self.version == Version::V5 {
            if let Some(at) = m.expires_at {
                let left = at
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .max(1);
                properties
                    .get_or_insert_with(Default::default)
                    .message_expiry_interval = Some(left.min(u64::from(u32::MAX)) as u32);
            }
            if !d.subscription_ids.is_empty() {
                properties
                    .get_or_insert_with(Default::default)
                    .subscription_identifiers = d.subscription_ids.clone();
            }
        }
        // Outbound topic aliases (v5), up to what the client takes; a new
        // alias counts only once its packet is written.
        let mut topic = None;
        let mut new_alias = None;
        if self.version == Version::V5 && self.client_alias_max > 0 {
            match self.aliases_out.get(&m.topic) {
                Some(alias) => {
                    properties.get_or_insert_with(Default::default).topic_alias = Some(*alias);
                    topic = Some(Bytes::new());
                }
                None if self.aliases_out.len() < usize::from(self.client_alias_max) => {
                    let alias = self.aliases_out.len() as u16 + 1;
                    new_alias = Some(alias);
                    properties.get_or_insert_with(Default::default).topic_alias = Some(alias);
                }
                None => {}
            }
        }
        let topic = topic.unwrap_or_else(|| Bytes::copy_from_slice(m.topic.as_bytes()));
        let publish = Packet::Publish(Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            pkid,
            payload: m.payload.clone(),
            properties,
        });
        let before = self.out.len();
        match codec::write(
            &publish,
            self.version,
            &mut self.out,
            self.client_max_packet,
        ) {
            Ok(()) => {
                if let Some(alias) = new_alias {
                    self.aliases_out.insert(m.topic.clone(), alias);
                }
                self.counters.messages_out[d.qos as usize].inc();
                self.broker
                    .totals
                    .sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => {
                // Larger than the client takes (v5 Maximum Packet Size): dropped.
                self.out.truncate(before);
                self.broker.metrics.dropped.too_large.inc();
                if pkid != 0 {
                    self.session.state().inflight.remove(&pkid);
                }
                self.forget(d.seq);
            }
        }
    }

    /// Handles one packet; `Some` when the connection must end.
    async fn handle(&mut self, packet: Packet) -> Option<End> {
        // Packet id 0 is not one (MQTT 5 §2.2.1): a malformed packet.
        let zero_id = match &packet {
            Packet::Publish(p) => p.qos != QoS::AtMostOnce && p.pkid == 0,
            Packet::Subscribe(s) => s.pkid == 0,
            Packet::Unsubscribe(u) => u.pkid == 0,
            _ => false,
        };
        if zero_id {
            return Some(End::Error(DisconnectReasonCode::MalformedPacket));
        }
        match packet {
            Packet::Publish(p) => return self.publish(p).await,
            Packet::PubAck(a) => {
                let mut st = self.session.state();
                let seq = match st.inflight.get(&a.pkid) {
                    Some(Outgoing::Published(d)) => Some(d.seq),
                    _ => None,
                };
                if let Some(seq) = seq {
                    st.inflight.remove(&a.pkid);
                    drop(st);
                    self.forget(seq);
                } else {
                    drop(st);
                }
                return self.flush();
            }
            Packet::PubRec(r) => {
                let mut st = self.session.state();
                let sent = match st.inflight.get(&r.pkid) {
                    Some(Outgoing::Published(d)) => Some(d.clone()),
                    _ => None,
                };
                let known = sent.is_some();
                if let Some(d) = sent.filter(|_| (r.reason as u8) < 0x80) {
                    st.inflight.insert(r.pkid, Outgoing::Released(d.seq));
                    if let Some(j) = self.journal().filter(|_| d.seq > 0) {
                        j.send(Op::Update(
                            self.session.client_id.to_string(),
                            d.seq,
                            d.stored(r.pkid, true),
                        ));
                    }
                    drop(st);
                    self.send(&Packet::PubRel(PubRel::new(r.pkid, None)));
                } else {
                    let removed = st.inflight.remove(&r.pkid);
                    drop(st);
                    if let Some(Outgoing::Published(d)) = removed {
                        self.forget(d.seq);
                    }
                    if !known {
                        let mut rel = PubRel::new(r.pkid, None);
                        rel.reason = PubRelReason::PacketIdentifierNotFound;
                        self.send(&Packet::PubRel(rel));
                    }
                    return self.flush();
                }
            }
            Packet::PubComp(c) => {
                let removed = self.session.state().inflight.remove(&c.pkid);
                if let Some(Outgoing::Released(seq)) = removed {
                    self.forget(seq);
                }
                return self.flush();
            }
            Packet::PubRel(r) => {
                let known = {
                    let mut st = self.session.state();
                    let known = st.incoming_qos2.remove(&r.pkid);
                    if known
                        && st.expiry_secs > 0
                        && let Some(j) = self.journal()
                    {
                        j.send(Op::Incoming(
                            self.session.client_id.to_string(),
                            r.pkid,
                            false,
                        ));
                    }
                    known
                };
                let mut comp = PubComp::new(r.pkid, None);
                if !known {
                    comp.reason = PubCompReason::PacketIdentifierNotFound;
                }
                self.send(&Packet::PubComp(comp));
            }
            Packet::Subscribe(s) => return self.subscribe(s).await,
            Packet::Unsubscribe(u) => {
                let mut reasons = Vec::with_capacity(u.filters.len());
                let mut any = false;
                for raw in &u.filters {
                    let removed = self.session.state().subscriptions.remove(raw).is_some();
                    any |= removed;
                    if removed && let Ok(sub) = topic::parse_subscription(raw) {
                        let mut router = self.broker.router_write();
                        router.unsubscribe(sub.share, sub.filter, self.session.id);
                        self.broker.metrics.subscriptions.set(router.len() as i64);
                    }
                    reasons.push(match removed {
                        true => UnsubAckReason::Success,
                        false => UnsubAckReason::NoSubscriptionExisted,
                    });
                }
                if any {
                    self.broker.persist_session(&self.session, 0);
                }
                self.send(&Packet::UnsubAck(UnsubAck {
                    pkid: u.pkid,
                    reasons,
                    properties: None,
                }));
            }
            Packet::PingReq(_) => self.send(&Packet::PingResp(PingResp)),
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.and_then(|p| p.session_expiry_interval) {
                    let mut st = self.session.state();
                    // 0 at CONNECT cannot become more at DISCONNECT (§3.14.2.2.2).
                    if st.expiry_secs == 0 && expiry > 0 {
                        return Some(End::Error(DisconnectReasonCode::ProtocolError));
                    }
                    let max = self
                        .settings()
                        .limits
                        .max_session_expiry
                        .as_secs()
                        .min(u64::from(u32::MAX)) as u32;
                    st.expiry_secs = expiry.min(max);
                }
                return Some(End::Disconnected {
                    will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                });
            }
            Packet::Connect(..) => {
                tracing::info!(client_id = %self.session.client_id, "a second CONNECT; closing");
                return Some(End::Error(DisconnectReasonCode::ProtocolError));
            }
            _ => return Some(End::Error(DisconnectReasonCode::ProtocolError)),
        }
        None
    }

    async fn publish(&mut self, p: Publish) -> Option<End> {
        let settings = self.settings();
        self.counters.messages_in[p.qos as usize].inc();
        self.broker
            .totals
            .received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut properties = p.properties;
        // The topic, or the one its alias stands for (v5).
        let alias = properties.as_mut().and_then(|pr| pr.topic_alias.take());
        let topic: Arc<str> = match (std::str::from_utf8(&p.topic), alias) {
            (Ok(""), Some(a)) => match self.aliases_in.get(&a) {
                Some(t) => t.clone(),
                None => return Some(End::Error(DisconnectReasonCode::ProtocolError)),
            },
            (Ok(t), alias) => {
                if topic::valid_name(t).is_err() {
                    return Some(End::Error(DisconnectReasonCode::TopicNameInvalid));
                }
                let t: Arc<str> = Arc::from(t);
                if let Some(a) = alias {
                    if a == 0 || a > settings.limits.max_topic_aliases {
                        return Some(End::Error(DisconnectReasonCode::TopicAliasInvalid));
                    }
                    self.aliases_in.insert(a, t.clone());
                }
                t
            }
            (Err(_), _) => return Some(End::Error(DisconnectReasonCode::TopicNameInvalid)),
        };
        if p.qos == QoS::ExactlyOnce {
            let st = self.session.state();
            if st.incoming_qos2.contains(&p.pkid) {
                // A duplicate of one already received: acknowledged again, not routed.
                drop(st);
                self.send(&Packet::PubRec(PubRec::new(p.pkid, None)));
                return None;
            }
            if st.incoming_qos2.len() >= usize::from(settings.limits.max_inflight) {
                return Some(End::Error(DisconnectReasonCode::ReceiveMaximumExceeded));
            }
        }
        let action = Action::Publish {
            topic: &topic,
            qos: p.qos as u8,
            retain: p.retain,
        };
        let decision = decide(
            &settings,
            self.claim_policy.as_ref(),
            &self.identity,
            &action,
        );
        let utf8_ok = properties
            .as_ref()
            .and_then(|pr| pr.payload_format_indicator)
            .is_none_or(|f| f != 1 || std::str::from_utf8(&p.payload).is_ok());
        let (puback, pubrec) = if !decision.allowed() {
            self.broker
                .metrics
                .denied
                .with_label_values(&[&self.info_listener, "publish"])
                .inc();
            if self.denied_logged.len() < 1000 && self.denied_logged.insert(bounded(&topic)) {
                tracing::info!(client_id = %self.session.client_id, user = %self.identity.subject,
                    topic = %topic, decision = %decision, "MQTT publish denied");
            }
            (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized)
        } else if !utf8_ok {
            (
                PubAckReason::PayloadFormatInvalid,
                PubRecReason::PayloadFormatInvalid,
            )
        } else {
            let expires_at = properties
                .as_ref()
                .and_then(|pr| pr.message_expiry_interval)
                .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
            if let Some(pr) = properties.as_mut() {
                pr.subscription_identifiers.clear();
                pr.message_expiry_interval = None;
            }
            let properties = properties.filter(|pr| *pr != PublishProperties::default());
            let routed = self.broker.publish(Message {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                expires_at,
                origin: self.session.id,
            });
            // Acknowledged only once written down where it had to be.
            if let Some(durable) = routed.durable
                && durable.await.is_err()
            {
                return Some(End::Error(DisconnectReasonCode::UnspecifiedError));
            }
            match routed.sessions {
                0 if !routed.bridged => (
                    PubAckReason::NoMatchingSubscribers,
                    PubRecReason::NoMatchingSubscribers,
                ),
                _ => (PubAckReason::Success, PubRecReason::Success),
            }
        };
        // 3.1.1 has no negative acknowledgement: a refused message is
        // acknowledged and dropped (as mosquitto does).
        let v311 = self.version == Version::V311;
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let mut ack = PubAck::new(p.pkid, None);
                ack.reason = if v311 { PubAckReason::Success } else { puback };
                self.send(&Packet::PubAck(ack));
            }
            QoS::ExactlyOnce => {
                let mut rec = PubRec::new(p.pkid, None);
                rec.reason = if v311 { PubRecReason::Success } else { pubrec };
                if (rec.reason as u8) < 0x80 {
                    let mut st = self.session.state();
                    st.incoming_qos2.insert(p.pkid);
                    if st.expiry_secs > 0
                        && let Some(j) = self.journal()
                    {
                        j.send(Op::Incoming(
                            self.session.client_id.to_string(),
                            p.pkid,
                            true,
                        ));
                    }
                }
                self.send(&Packet::PubRec(rec));
            }
        }
        None
    }

    async fn subscribe(&mut self, s: rumqttc::v5::mqttbytes::v5::Subscribe) -> Option<End> {
        let settings = self.settings();
        let id = s.properties.as_ref().and_then(|p| p.id);
        if id == Some(0) {
            return Some(End::Error(DisconnectReasonCode::ProtocolError));
        }
        let v5 = self.version == Version::V5;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for Filter {
            path,
            qos,
            nolocal,
            preserve_retain,
            retain_forward_rule,
        } in s.filters
        {
            let sub = match topic::parse_subscription(&path) {
                Ok(sub) => sub,
                Err(_) => {
                    codes.push(SubscribeReasonCode::TopicFilterInvalid);
                    continue;
                }
            };
            if sub.share.is_some() && nolocal {
                return Some(End::Error(DisconnectReasonCode::ProtocolError));
            }
            let decision = decide(
                &settings,
                self.claim_policy.as_ref(),
                &self.identity,
                &Action::Subscribe {
                    filter: sub.filter,
                    qos: qos as u8,
                },
            );
            if !decision.allowed() {
                self.broker
                    .metrics
                    .denied
                    .with_label_values(&[&self.info_listener, "subscribe"])
                    .inc();
                if self.denied_logged.len() < 1000 && self.denied_logged.insert(bounded(&path)) {
                    tracing::info!(client_id = %self.session.client_id, user = %self.identity.subject,
                        filter = %path, decision = %decision, "MQTT subscription denied");
                }
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            let options = SubOptions {
                qos,
                no_local: nolocal,
                retain_as_published: preserve_retain,
                id,
            };
            let new = {
                let mut router = self.broker.router_write();
                let new = router.subscribe(sub.share, sub.filter, self.session.clone(), options);
                self.broker.metrics.subscriptions.set(router.len() as i64);
                new
            };
            self.session
                .state()
                .subscriptions
                .insert(path.clone(), options);
            codes.push(SubscribeReasonCode::Success(qos));
            // Retained messages: not for shared subscriptions (§4.8.2);
            // otherwise per retain handling.
            let send_retained = sub.share.is_none()
                && match retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => new,
                    RetainForwardRule::Never => false,
                };
            if send_retained {
                for m in self.broker.retained_for(sub.filter) {
                    retained.push(Delivery {
                        seq: 0,
                        qos: codec::lower(qos, m.qos),
                        retain: true,
                        subscription_ids: id.into_iter().collect(),
                        message: m,
                    });
                }
            }
        }
        if !v5 {
            for c in &mut codes {
                if !matches!(c, SubscribeReasonCode::Success(_)) {
                    *c = SubscribeReasonCode::Failure;
                }
            }
        }
        // The session's record, once per SUBSCRIBE.
        self.broker.persist_session(&self.session, 0);
        // Cluster mode: what any node publishes after the SUBACK reaches
        // the client, so it waits for this node's bus subscriptions (a
        // round trip to NATS for a filter new here; not while it is down).
        if let Some(bridge) = self.broker.bridge.get()
            && codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Success(_)))
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), bridge.settled()).await;
        }
        self.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            return_codes: codes,
            properties: None,
        }));
        let max_queued = settings.limits.max_queued_messages;
        for d in retained {
            self.session
                .push(d, max_queued, self.broker.journal.as_ref());
        }
        self.flush()
    }

    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(mut self, io: &mut S, end: End) {
        let code = match end {
            End::Error(code) => Some(code),
            End::TakenOver => Some(DisconnectReasonCode::SessionTakenOver),
            End::Evicted => Some(DisconnectReasonCode::AdministrativeAction),
            End::KeepAlive => Some(DisconnectReasonCode::KeepAliveTimeout),
            End::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            End::TokenExpired => Some(DisconnectReasonCode::NotAuthorized),
            End::Disconnected { .. } | End::Closed => None,
        };
        if let (Some(code), Version::V5) = (code, self.version) {
            let reason = end.describe().to_owned();
            self.send(&Packet::Disconnect(Disconnect {
                reason_code: code,
                properties: Some(DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some(reason),
                    user_properties: Vec::new(),
                    server_reference: None,
                }),
            }));
        }
        if !self.out.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), send_all(io, &self.out)).await;
            self.count_out();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        self.broker
            .metrics
            .connections
            .with_label_values(&[&self.info_listener])
            .dec();
        self.broker
            .totals
            .connected
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let (still_ours, expiry) = {
            let st = self.session.state();
            (st.generation == self.generation, st.expiry_secs)
        };
        tracing::info!(listener = %self.info_listener, peer = %self.peer,
            client_id = %self.session.client_id, user = %self.identity.subject,
            reason = end.describe(), "MQTT client disconnected");
        if still_ours {
            self.session.set_connected(false);
            self.broker
                .persist_session(&self.session, super::persist::now_ms() / 1000);
        }
        if end.sends_will()
            && let Some(will) = self.will.take()
        {
            self.schedule_will(will, still_ours, expiry);
        }
        if still_ours {
            self.end_session(expiry);
        }
    }

    /// Publishes the will now, or after its delay (v5) unless the client
    /// is back by then (or its session ended first, which sends it).
    fn schedule_will(&self, will: LastWill, still_ours: bool, expiry: u32) {
        let delay = will
            .properties
            .as_ref()
            .and_then(|p| p.delay_interval)
            .unwrap_or(0)
            .min(expiry);
        let topic: Arc<str> = Arc::from(std::str::from_utf8(&will.topic).unwrap_or(""));
        let properties = will.properties.as_ref().map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: Vec::new(),
            content_type: p.content_type.clone(),
        });
        let expires_at = will
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| Instant::now() + Duration::from_secs(u64::from(delay) + u64::from(s)));
        let message = Message {
            topic,
            payload: will.message,
            qos: will.qos,
            retain: will.retain,
            properties,
            expires_at,
            origin: self.session.id,
        };
        if delay == 0 {
            let _ = self.broker.publish(message);
            return;
        }
        if !still_ours {
            // Taken over: a newer connection to the same session came
            // within the delay, so no will (§3.1.3.2.2); one that started
            // a new session ended this one, which sends it.
            let continues = self.session.state().handed_over
                || self
                    .broker
                    .sessions()
                    .get(&self.session.client_id)
                    .is_some_and(|s| s.id == self.session.id);
            if !continues {
                let _ = self.broker.publish(message);
            }
            return;
        }
        let (broker, session, generation) =
            (self.broker.clone(), self.session.clone(), self.generation);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
            if session.state().generation == generation {
                let _ = broker.publish(message);
            }
        });
    }

    /// A session with no expiry ends with its connection; one with an
    /// expiry is kept that long unless the client comes back.
    fn end_session(&self, expiry: u32) {
        if expiry == 0 {
            self.broker.end_session(&self.session, self.generation);
            return;
        }
        let (broker, session, generation) =
            (self.broker.clone(), self.session.clone(), self.generation);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
            if broker.end_session(&session, generation) {
                tracing::debug!(client_id = %session.client_id, "MQTT session expired");
            }
        });
    }
}

/// Who the client is: a JWT (in the password or user name), a user name
/// and password, the verified client certificate, or nobody (when
/// anonymous clients are let in). The identity's subject is the MQTT user
/// name (`%u`) and its client id the MQTT client id (`%c`).
async fn authenticate(
    settings: &Settings,
    login: Option<&Login>,
    cert: Option<Arc<CertIdentity>>,
    client_id: &Arc<str>,
) -> Result<Arc<Identity>, Refused> {
    let user = login.map_or("", |l| l.username.as_str());
    let password = login.map_or("", |l| l.password.as_str());
    let bad = |why: String| Refused(ConnectReturnCode::BadUserNamePassword, why);
    let token = match settings.token_in {
        Some(TokenField::Password) if looks_like_jwt(password) => Some(password),
        Some(TokenField::Username) if looks_like_jwt(user) => Some(user),
        _ => None,
    };
    let mut identity = if let Some(token) = token {
        let id = settings
            .authn
            .authenticate(Some(std::borrow::Cow::Borrowed(token)), cert)
            .await
            .map_err(|r| bad(r.to_string()))?;
        let name = id
            .claim(&settings.username_claim)
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Refused(
                    ConnectReturnCode::NotAuthorized,
                    format!(
                        "the token has no `{}` claim to name the user",
                        settings.username_claim
                    ),
                )
            })?
            .to_owned();
        if settings.token_in == Some(TokenField::Password) && !user.is_empty() && user != name {
            return Err(Refused(
                ConnectReturnCode::NotAuthorized,
                format!("user name {user:?} is not the token's {name:?}"),
            ));
        }
        let mut id = Identity::clone(&id);
        id.subject = name;
        id
    } else if login.is_some() && !user.is_empty() {
        let id = settings
            .authn
            .password(user, password.as_bytes(), AuthMethod::Password, cert)
            .await
            .map_err(|r| match r {
                Refusal::NotAccepted(_) => Refused(
                    ConnectReturnCode::BadUserNamePassword,
                    "passwords are not accepted".into(),
                ),
                other => bad(other.to_string()),
            })?;
        Identity::clone(&id)
    } else if let Some(cert) = cert.filter(|_| settings.auth.certificate) {
        Identity::from_cert(cert)
    } else if settings.auth.anonymous {
        Identity {
            subject: String::new(),
            ..Identity::anonymous()
        }
    } else {
        return Err(Refused(
            ConnectReturnCode::NotAuthorized,
            "no credentials, and anonymous clients are not let in".into(),
        ));
    };
    identity.client_id = Some(client_id.to_string());
    Ok(Arc::new(identity))
}

/// The token's rules, checked first; the broker's when none of them
/// matches.
fn decide(
    settings: &Settings,
    claim: Option<&Arc<crate::authz::Policy>>,
    who: &Identity,
    action: &Action<'_>,
) -> crate::authz::Decision {
    if let Some(p) = claim {
        let d = p.evaluate(who, action);
        if d.reason != crate::authz::Reason::NoRule {
            return d;
        }
    }
    settings.policy.evaluate(who, action)
}

/// The client's own rules, compiled: a password user's topic rules, or
/// the rules in a JWT's ACL claim (EMQX's list form). `None` without.
pub(super) fn claim_rules(
    settings: &Settings,
    who: &Identity,
) -> Result<Option<crate::authz::Policy>, String> {
    if who.method == AuthMethod::Password {
        let Some(user) = settings
            .authn
            .users
            .as_ref()
            .and_then(|u| u.get(&who.subject))
        else {
            return Ok(None);
        };
        if user.topics.is_empty() {
            return Ok(None);
        }
        use crate::identity::passwords::TopicAccess;
        let entries: Vec<serde_json::Value> = user
            .topics
            .iter()
            .map(|t| {
                let (permission, action) = match t.access {
                    TopicAccess::Read => ("allow", "subscribe"),
                    TopicAccess::Write => ("allow", "publish"),
                    TopicAccess::ReadWrite => ("allow", "all"),
                    TopicAccess::Deny => ("deny", "all"),
                };
                serde_json::json!({ "permission": permission, "action": action, "topic": t.topic })
            })
            .collect();
        // Denies first, as in an acl_file.
        let (mut ordered, allow): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|e| e["permission"] == "deny");
        ordered.extend(allow);
        return entry_rules("topics", &ordered);
    }
    let Some(name) = settings.acl_claim.as_deref() else {
        return Ok(None);
    };
    if who.method != AuthMethod::Jwt {
        return Ok(None);
    }
    let Some(claim) = who.claim(name) else {
        return Ok(None);
    };
    let entries = claim
        .as_array()
        .ok_or_else(|| format!("the `{name}` claim is not a list of rules"))?;
    entry_rules(name, entries)
}

/// Rules in EMQX's shape (`{permission, action, topic, qos, retain}`),
/// compiled.
fn entry_rules(
    name: &str,
    entries: &[serde_json::Value],
) -> Result<Option<crate::authz::Policy>, String> {
    let mut rules = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let bad = |what: &str| format!("`{name}`[{i}]: {what}");
        let effect = match e["permission"].as_str() {
            Some("allow") => "allow",
            Some("deny") => "deny",
            _ => return Err(bad("permission must be allow or deny")),
        };
        let actions = match e["action"].as_str().unwrap_or("all") {
            "publish" => vec!["publish"],
            "subscribe" => vec!["subscribe"],
            "all" | "pubsub" => vec!["publish", "subscribe"],
            _ => return Err(bad("action must be publish, subscribe or all")),
        };
        let topics: Vec<String> = match (&e["topic"], &e["topics"]) {
            (serde_json::Value::String(t), _) => vec![t.clone()],
            (_, serde_json::Value::Array(ts)) => ts
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
            _ => return Err(bad("needs a topic")),
        };
        // EMQX's placeholders are the policy language's.
        let topics: Vec<String> = topics
            .into_iter()
            .map(|t| t.replace("${username}", "%u").replace("${clientid}", "%c"))
            .collect();
        let mut cond = serde_json::json!({ "actions": actions, "topics": topics });
        if let Some(q) = e["qos"]
            .as_array()
            .and_then(|qs| qs.iter().filter_map(|q| q.as_u64()).max())
        {
            cond["max_qos"] = q.into();
        }
        if let Some(r) = e["retain"].as_bool() {
            cond["retain"] = r.into();
        }
        rules.push(serde_json::json!({ effect: cond }));
    }
    let rules: Vec<crate::authz::syntax::RuleConfig> =
        serde_json::from_value(serde_json::Value::Array(rules))
            .map_err(|e| format!("`{name}`: {e}"))?;
    crate::authz::Policy::compile(&rules, crate::authz::Resource::Topic)
        .map(Some)
        .map_err(|problems| {
            problems
                .into_iter()
                .map(|(at, m)| format!("`{name}`{at}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
}

/// A topic as the denial log remembers it: at most 256 bytes of it.
fn bounded(topic: &str) -> String {
    let mut end = topic.len().min(256);
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    topic[..end].to_owned()
}

/// Drops a resumed session's subscriptions the rules no longer allow.
pub(super) fn drop_refused_subscriptions(
    broker: &Broker,
    settings: &Settings,
    claim: Option<&Arc<crate::authz::Policy>>,
    who: &Identity,
    session: &Arc<Session>,
) {
    let held: Vec<(String, SubOptions)> = session
        .state()
        .subscriptions
        .iter()
        .map(|(f, o)| (f.clone(), *o))
        .collect();
    let mut dropped = false;
    for (raw, opts) in held {
        let Ok(sub) = topic::parse_subscription(&raw) else {
            continue;
        };
        let action = Action::Subscribe {
            filter: sub.filter,
            qos: opts.qos as u8,
        };
        if decide(settings, claim, who, &action).allowed() {
            continue;
        }
        session.state().subscriptions.remove(&raw);
        broker
            .router_write()
            .unsubscribe(sub.share, sub.filter, session.id);
        tracing::info!(client_id = %session.client_id, filter = %raw,
            "MQTT subscription dropped: the rules no longer allow it");
        dropped = true;
    }
    if dropped {
        broker.persist_session(session, 0);
    }
}

fn looks_like_jwt(s: &str) -> bool {
    s.len() > 20 && s.bytes().filter(|b| *b == b'.').count() == 2 && s.starts_with("ey")
}
