//! Fuzzes the MQTT decoder with arbitrary bytes, for every protocol version and a few maximum
//! packet sizes. Decoding must never panic, and every packet it accepts must survive
//! encode → decode unchanged, with `encoded_len` equal to the bytes written.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use raftmq_codec::{ProtocolVersion, decode, encode, encoded_len};

const VERSIONS: [ProtocolVersion; 3] =
    [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5];

/// No limit, a typical broker limit, and a tiny one that rejects most packets from their header.
const MAX_PACKET_SIZES: [u32; 3] = [u32::MAX, 1024, 16];

fuzz_target!(|data: &[u8]| {
    for version in VERSIONS {
        for max_packet_size in MAX_PACKET_SIZES {
            let mut buf = BytesMut::from(data);
            while let Ok(Some(packet)) = decode(&mut buf, version, max_packet_size) {
                let mut encoded = BytesMut::new();
                encode(&packet, version, &mut encoded).expect("a decoded packet is encodable");
                assert_eq!(encoded.len(), encoded_len(&packet, version));
                let decoded = decode(&mut encoded, version, u32::MAX);
                assert_eq!(decoded, Ok(Some(packet)), "encode → decode changed the packet");
                assert!(encoded.is_empty(), "re-encoded packet not consumed exactly");
            }
        }
    }
});
