//! The wire: rumqttc's `mqttbytes` reads and writes the packets of MQTT
//! 3.1.1 and 5; this adapter picks the version from the CONNECT and lets
//! the broker speak MQTT 5's packet types only (3.1.1 packets are read into
//! them and written from them).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
pub use rumqttc::v5::mqttbytes::v5::Packet;
pub use rumqttc::v5::mqttbytes::{Error as V5Error, QoS};

/// The lower of two QoS levels.
pub fn lower(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

/// The higher of two QoS levels.
pub fn higher(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) { a } else { b }
}

/// The protocol a client connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    V5,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// Why bytes are not a packet.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the packet is larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    #[error("protocol name or level not spoken here (level {0})")]
    Protocol(u8),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Reads a packet from the front of `buf` if a whole one is there.
/// `version` is `None` until the CONNECT has been read.
pub fn read(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_size: usize,
) -> Result<Option<(Packet, Version)>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let version = match version {
        Some(v) => v,
        None => match connect_level(buf)? {
            None => return Ok(None),
            Some(4) => Version::V311,
            Some(5) => Version::V5,
            Some(level) => return Err(DecodeError::Protocol(level)),
        },
    };
    // A DISCONNECT without a reason code (MQTT 5 allows it; the codec
    // wants one).
    if buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Some((
            Packet::Disconnect(v5::Disconnect {
                reason_code: v5::DisconnectReasonCode::NormalDisconnection,
                properties: None,
            }),
            version,
        )));
    }
    let packet = match version {
        Version::V5 => match v5::Packet::read(buf, Some(max_size as u32)) {
            Ok(p) => p,
            Err(e) => return v5_error(e, max_size),
        },
        Version::V311 => match v4::Packet::read(buf, max_size) {
            Ok(p) => from_v4(p)?,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => {
                return Err(DecodeError::TooLarge(max_size));
            }
            Err(e) => return Err(DecodeError::Malformed(e.to_string())),
        },
    };
    Ok(Some((packet, version)))
}

fn v5_error<T>(e: V5Error, max_size: usize) -> Result<Option<T>, DecodeError> {
    match e {
        V5Error::InsufficientBytes(_) => Ok(None),
        V5Error::PayloadSizeLimitExceeded { .. } => Err(DecodeError::TooLarge(max_size)),
        e => Err(DecodeError::Malformed(e.to_string())),
    }
}

/// The protocol level of a CONNECT at the front of `buf` (`None`: more
/// bytes are needed).
fn connect_level(buf: &[u8]) -> Result<Option<u8>, DecodeError> {
    if buf[0] >> 4 != 1 {
        return Err(DecodeError::NotConnect);
    }
    // The remaining length: up to four bytes of seven bits.
    let mut at = 1;
    loop {
        let Some(b) = buf.get(at) else {
            return Ok(None);
        };
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(DecodeError::Malformed("remaining length".into()));
        }
    }
    // Protocol name (`MQTT`, length-prefixed) and level.
    let Some(head) = buf.get(at..at + 7) else {
        return Ok(None);
    };
    if head[..6] != *b"\x00\x04MQTT" {
        return Err(DecodeError::Protocol(head.get(6).copied().unwrap_or(0)));
    }
    Ok(Some(head[6]))
}

fn from_v4(p: v4::Packet) -> Result<Packet, DecodeError> {
    Ok(match p {
        v4::Packet::Connect(c) => Packet::Connect(
            v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                clean_start: c.clean_session,
                properties: None,
            },
            c.last_will.map(|w| v5::LastWill {
                topic: Bytes::from(w.topic),
                message: w.message,
                qos: qos_v5(w.qos),
                retain: w.retain,
                properties: None,
            }),
            c.login.map(|l| v5::Login {
                username: l.username,
                password: l.password,
            }),
        ),
        v4::Packet::Publish(p) => Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos_v5(p.qos),
            retain: p.retain,
            topic: Bytes::from(p.topic),
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(v5::PubAck {
            pkid: a.pkid,
            reason: v5::PubAckReason::Success,
            properties: None,
        }),
        v4::Packet::PubRec(a) => Packet::PubRec(v5::PubRec {
            pkid: a.pkid,
            reason: v5::PubRecReason::Success,
            properties: None,
        }),
        v4::Packet::PubRel(a) => Packet::PubRel(v5::PubRel {
            pkid: a.pkid,
            reason: v5::PubRelReason::Success,
            properties: None,
        }),
        v4::Packet::PubComp(a) => Packet::PubComp(v5::PubComp {
            pkid: a.pkid,
            reason: v5::PubCompReason::Success,
            properties: None,
        }),
        v4::Packet::Subscribe(s) => Packet::Subscribe(v5::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| v5::Filter {
                    path: f.path,
                    qos: qos_v5(f.qos),
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: v5::RetainForwardRule::OnEverySubscribe,
                })
                .collect(),
            properties: None,
        }),
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe(v5::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
            properties: None,
        }),
        v4::Packet::PingReq => Packet::PingReq(v5::PingReq),
        v4::Packet::Disconnect => Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            properties: None,
        }),
        other => {
            return Err(DecodeError::Malformed(format!(
                "a client does not send {:?}",
                packet_name(&other)
            )));
        }
    })
}

fn packet_name(p: &v4::Packet) -> &'static str {
    match p {
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingResp => "PINGRESP",
        _ => "that packet",
    }
}

fn qos_v5(q: rumqttc::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_v4(q: QoS) -> rumqttc::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Appends `packet` to `out` as `version` writes it. MQTT 3.1.1 has no
/// server DISCONNECT and no AUTH: those write nothing (the connection is
/// then closed). `max_size` is the client's Maximum Packet Size (v5).
pub fn write(
    packet: &Packet,
    version: Version,
    out: &mut BytesMut,
    max_size: Option<u32>,
) -> Result<(), String> {
    let written = match version {
        Version::V5 => packet.write(out, max_size).map_err(|e| e.to_string()),
        Version::V311 => match to_v4(packet) {
            Some(p) => p.write(out, usize::MAX).map_err(|e| e.to_string()),
            None => Ok(0),
        },
    };
    written.map(|_| ())
}

fn to_v4(p: &Packet) -> Option<v4::Packet> {
    Some(match p {
        Packet::ConnAck(c) => v4::Packet::ConnAck(v4::ConnAck {
            session_present: c.session_present,
            code: match c.code {
                v5::ConnectReturnCode::Success => v4::ConnectReturnCode::Success,
                v5::ConnectReturnCode::UnsupportedProtocolVersion
                | v5::ConnectReturnCode::RefusedProtocolVersion => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
                v5::ConnectReturnCode::ClientIdentifierNotValid
                | v5::ConnectReturnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                v5::ConnectReturnCode::BadUserNamePassword => {
                    v4::ConnectReturnCode::BadUserNamePassword
                }
                v5::ConnectReturnCode::NotAuthorized
                | v5::ConnectReturnCode::Banned
                | v5::ConnectReturnCode::BadAuthenticationMethod => {
                    v4::ConnectReturnCode::NotAuthorized
                }
                _ => v4::ConnectReturnCode::ServiceUnavailable,
            },
        }),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos_v4(p.qos),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck(a) => v4::Packet::PubAck(v4::PubAck::new(a.pkid)),
        Packet::PubRec(a) => v4::Packet::PubRec(v4::PubRec::new(a.pkid)),
        Packet::PubRel(a) => v4::Packet::PubRel(v4::PubRel::new(a.pkid)),
        Packet::PubComp(a) => v4::Packet::PubComp(v4::PubComp::new(a.pkid)),
        Packet::SubAck(s) => v4::Packet::SubAck(v4::SubAck::new(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => {
                        v4::SubscribeReasonCode::Success(qos_v4(*q))
                    }
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::UnsubAck(u) => v4::Packet::UnsubAck(v4::UnsubAck::new(u.pkid)),
        Packet::PingResp(_) => v4::Packet::PingResp,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_versions_read_into_one_shape() {
        for (version, level) in [(Version::V311, 4u8), (Version::V5, 5)] {
            let mut connect = BytesMut::new();
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0b0000_0010, 0, 30];
            if level == 5 {
                body.push(0); // no properties
            }
            body.extend_from_slice(&[0, 2, b'c', b'1']);
            connect.extend_from_slice(&[0x10, body.len() as u8]);
            connect.extend_from_slice(&body);
            // Two packets in one read: a CONNECT and a bare DISCONNECT.
            connect.extend_from_slice(&[0xE0, 0]);
            let (p, v) = read(&mut connect, None, 1024).unwrap().unwrap();
            assert_eq!(v, version);
            match p {
                Packet::Connect(c, None, None) => {
                    assert_eq!(
                        (c.client_id.as_str(), c.keep_alive, c.clean_start),
                        ("c1", 30, true)
                    )
                }
                other => panic!("{other:?}"),
            }
            let (p, _) = read(&mut connect, Some(v), 1024).unwrap().unwrap();
            assert!(matches!(p, Packet::Disconnect(_)));
            assert!(connect.is_empty());
        }
    }

    #[test]
    fn refusals() {
        let mut http = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(
            read(&mut http, None, 1024),
            Err(DecodeError::NotConnect)
        ));
        let mut v3 = BytesMut::from(&b"\x10\x10\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x00"[..]);
        assert!(matches!(
            read(&mut v3, None, 1024),
            Err(DecodeError::Protocol(_))
        ));
        // A PUBLISH announcing 2 MiB is refused before it is read.
        let mut big = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            read(&mut big, Some(Version::V5), 1024),
            Err(DecodeError::TooLarge(1024))
        ));
        let mut partial = BytesMut::from(&[0x10u8, 0x20, 0, 4, b'M'][..]);
        assert!(read(&mut partial, None, 1024).unwrap().is_none());
    }
}
