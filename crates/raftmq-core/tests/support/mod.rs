//! Packet builders shared by the core's test binaries (each includes this as `mod support;`
//! and uses what it needs).
#![allow(dead_code)]

use raftmq_codec::{Connect, ConnectProperties, ProtocolVersion};

/// A CONNECT of `id` for `protocol`: keep alive 0, no will, no credentials, no properties.
pub fn connect(protocol: ProtocolVersion, id: &str, clean_start: bool) -> Connect {
    Connect {
        protocol,
        clean_start,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// A v5 CONNECT of `id` with the given clean start and Session Expiry Interval.
pub fn connect_v5(id: &str, clean_start: bool, expiry: u32) -> Connect {
    Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..ConnectProperties::default()
        },
        ..connect(ProtocolVersion::V5, id, clean_start)
    }
}
