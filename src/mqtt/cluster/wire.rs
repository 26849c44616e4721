//! An MQTT message on the bus: a small binary header, then the payload.
//! The topic travels in the subject. Integers are big-endian.
//!
//! ```text
//! version   u8    1
//! flags     u8    bits 0-1 QoS (0-2), bit 2 retain, the rest 0
//! origin    u64   the publishing node's id
//! sequence  u64   counts that node's messages
//! props     u32   length of the properties that follow
//! properties      each an MQTT 5 property id and its value:
//!                   0x01 payload format indicator  u8 (0 or 1)
//!                   0x02 message expiry, remaining u32 seconds
//!                   0x03 content type              u16 length + UTF-8
//!                   0x08 response topic            u16 length + UTF-8
//!                   0x09 correlation data          u16 length + bytes
//!                   0x26 user property             two of u16 length + UTF-8
//!                 each at most once but user properties; no other id
//! payload         the rest
//! ```
//!
//! Anyone on the NATS server can publish anything: [`decode`] checks every
//! length and value and refuses what a tollgate would not have written.

use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use super::super::codec::QoS;
use super::super::session::Message;

pub const VERSION: u8 = 1;
const HEADER: usize = 1 + 1 + 8 + 8 + 4;

/// A decoded message, its topic aside.
#[derive(Debug, PartialEq)]
pub struct Frame {
    pub origin: u64,
    pub seq: u64,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// Seconds the message has left to live.
    pub expiry: Option<u32>,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Not what a tollgate writes.
    Malformed(&'static str),
    /// A payload over this node's `mqtt.limits.max_packet_size`.
    TooLarge,
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    // Lengths fit: MQTT's own strings are u16-prefixed.
    let n = s.len().min(usize::from(u16::MAX));
    out.put_u16(n as u16);
    out.put_slice(&s[..n]);
}

/// The frame of `message` from `origin`, `seq`.
pub fn encode(origin: u64, seq: u64, message: &Message) -> Bytes {
    let mut props = BytesMut::new();
    if let Some(p) = &message.properties {
        if let Some(f) = p.payload_format_indicator {
            props.put_u8(0x01);
            props.put_u8(f);
        }
        if let Some(ct) = &p.content_type {
            props.put_u8(0x03);
            put_str(&mut props, ct.as_bytes());
        }
        if let Some(rt) = &p.response_topic {
            props.put_u8(0x08);
            put_str(&mut props, rt.as_bytes());
        }
        if let Some(cd) = &p.correlation_data {
            props.put_u8(0x09);
            put_str(&mut props, cd);
        }
        for (k, v) in &p.user_properties {
            props.put_u8(0x26);
            put_str(&mut props, k.as_bytes());
            put_str(&mut props, v.as_bytes());
        }
    }
    if let Some(at) = message.expires_at {
        // Rounded up: a message never lives shorter than asked.
        let left = at.saturating_duration_since(Instant::now());
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        props.put_u8(0x02);
        props.put_u32(secs.min(u64::from(u32::MAX)) as u32);
    }
    let mut out = BytesMut::with_capacity(HEADER + props.len() + message.payload.len());
    out.put_u8(VERSION);
    let qos = match message.qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    };
    out.put_u8(qos | u8::from(message.retain) << 2);
    out.put_u64(origin);
    out.put_u64(seq);
    out.put_u32(props.len() as u32);
    out.put_slice(&props);
    out.put_slice(&message.payload);
    out.freeze()
}

fn take_str(buf: &mut Bytes) -> Result<Bytes, WireError> {
    if buf.remaining() < 2 {
        return Err(WireError::Malformed("a property cut short"));
    }
    let n = usize::from(buf.get_u16());
    if buf.remaining() < n {
        return Err(WireError::Malformed("a property cut short"));
    }
    Ok(buf.split_to(n))
}

fn take_utf8(buf: &mut Bytes) -> Result<String, WireError> {
    let b = take_str(buf)?;
    let s =
        std::str::from_utf8(&b).map_err(|_| WireError::Malformed("a string that is not UTF-8"))?;
    if s.contains('\0') {
        return Err(WireError::Malformed("a string holding U+0000"));
    }
    Ok(s.to_owned())
}

/// Reads a frame; the payload is a slice of `frame` (not copied).
pub fn decode(mut frame: Bytes, max_payload: usize) -> Result<Frame, WireError> {
    if frame.len() < HEADER {
        return Err(WireError::Malformed("shorter than the header"));
    }
    if frame.get_u8() != VERSION {
        return Err(WireError::Malformed("an unknown version"));
    }
    let flags = frame.get_u8();
    let qos = match flags & 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(WireError::Malformed("QoS 3")),
    };
    if flags & !7 != 0 {
        return Err(WireError::Malformed("unknown flags"));
    }
    let origin = frame.get_u64();
    let seq = frame.get_u64();
    let n = frame.get_u32() as usize;
    if frame.remaining() < n {
        return Err(WireError::Malformed("properties longer than the message"));
    }
    let mut props = frame.split_to(n);
    if frame.len() > max_payload {
        return Err(WireError::TooLarge);
    }
    let mut p = PublishProperties::default();
    let mut expiry = None;
    while props.has_remaining() {
        let id = props.get_u8();
        let once = |set: bool| {
            if set {
                Err(WireError::Malformed("a property given twice"))
            } else {
                Ok(())
            }
        };
        match id {
            0x01 => {
                once(p.payload_format_indicator.is_some())?;
                if !props.has_remaining() {
                    return Err(WireError::Malformed("a property cut short"));
                }
                let f = props.get_u8();
                if f > 1 {
                    return Err(WireError::Malformed("a payload format indicator over 1"));
                }
                p.payload_format_indicator = Some(f);
            }
            0x02 => {
                once(expiry.is_some())?;
                if props.remaining() < 4 {
                    return Err(WireError::Malformed("a property cut short"));
                }
                expiry = Some(props.get_u32());
            }
            0x03 => {
                once(p.content_type.is_some())?;
                p.content_type = Some(take_utf8(&mut props)?);
            }
            0x08 => {
                once(p.response_topic.is_some())?;
                let t = take_utf8(&mut props)?;
                super::super::topic::valid_name(&t).map_err(|_| {
                    WireError::Malformed("a response topic that is not a topic name")
                })?;
                p.response_topic = Some(t);
            }
            0x09 => {
                once(p.correlation_data.is_some())?;
                p.correlation_data = Some(take_str(&mut props)?);
            }
            0x26 => {
                let k = take_utf8(&mut props)?;
                let v = take_utf8(&mut props)?;
                p.user_properties.push((k, v));
            }
            _ => return Err(WireError::Malformed("an unknown property")),
        }
    }
    if p.payload_format_indicator == Some(1) && std::str::from_utf8(&frame).is_err() {
        return Err(WireError::Malformed(
            "a payload said to be UTF-8 that is not",
        ));
    }
    Ok(Frame {
        origin,
        seq,
        qos,
        retain: flags & 4 != 0,
        properties: (p != PublishProperties::default()).then_some(p),
        expiry,
        payload: frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn message(properties: Option<PublishProperties>) -> Message {
        Message {
            topic: Arc::from("a/b"),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties,
            expires_at: Some(Instant::now() + Duration::from_secs(30)),
            origin: 7,
        }
    }

    #[test]
    fn round_trips_properties() {
        let props = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("text/plain".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(&[0, 1, 2])),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            ..PublishProperties::default()
        };
        let m = message(Some(props.clone()));
        let f = decode(encode(42, 9, &m), 1024).unwrap();
        assert_eq!(
            (f.origin, f.seq, f.qos, f.retain),
            (42, 9, QoS::ExactlyOnce, true)
        );
        assert_eq!(f.properties, Some(props));
        assert_eq!(f.expiry, Some(30));
        assert_eq!(&f.payload[..], b"hello");
        let plain = decode(
            encode(
                1,
                2,
                &Message {
                    expires_at: None,
                    ..message(None)
                },
            ),
            1024,
        )
        .unwrap();
        assert_eq!((plain.properties, plain.expiry), (None, None));
    }

    #[test]
    fn refuses_what_tollgate_does_not_write() {
        let good = encode(1, 1, &message(None));
        assert_eq!(decode(good.clone(), 4), Err(WireError::TooLarge));
        let mut bad = good.to_vec();
        bad[0] = 2;
        assert!(decode(Bytes::from(bad), 1024).is_err());
        let mut bad = good.to_vec();
        bad[1] = 3;
        assert!(decode(Bytes::from(bad), 1024).is_err());
        let mut bad = good.to_vec();
        bad[18..22].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(Bytes::from(bad), 1024).is_err());
        // Every truncation and a sample of garbage: an error, never a panic.
        for n in 0..good.len() {
            let _ = decode(good.slice(..n), 1024);
        }
        let mut x: u32 = 1;
        for len in 0..400 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = decode(Bytes::from(junk), 1024);
        }
    }
}
