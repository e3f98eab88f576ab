//! A stable-Rust fuzz driver for the decoder, for CI (cargo-fuzz in `fuzz/` needs nightly).
//!
//! Feeds the decoder random bytes and mutations of valid packets (bit flips, interesting
//! bytes, insertions, deletions, truncations, splices), for every protocol version and a few
//! maximum packet sizes, from a fixed seed, until an iteration count or a time limit. Checks
//! what the cargo-fuzz target checks: decoding never panics, and every accepted packet survives
//! encode → decode unchanged with `encoded_len` equal to the bytes written. On failure, prints
//! the seed, iteration and input (hex) and exits 1.
//!
//! `cargo run --release -p raftmq-codec --example fuzz_decode -- --seconds 60 [--seed N]
//! [--iterations N]`

use bytes::BytesMut;
use raftmq_codec::{ProtocolVersion, decode, encode, encoded_len};
use std::time::{Duration, Instant};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V3_1,
    ProtocolVersion::V3_1_1,
    ProtocolVersion::V5,
];
const MAX_PACKET_SIZES: [u32; 3] = [u32::MAX, 1024, 16];

/// Valid packets (3.1.1 and 5) the mutations start from.
const SEEDS: &[&[u8]] = &[
    // 3.1.1 CONNECT, client id "abc".
    &[
        0x10, 0x0F, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x03, b'a',
        b'b', b'c',
    ],
    // 5 CONNECT with session expiry, user name and password.
    &[
        0x10, 0x19, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xC2, 0x00, 0x3C, 0x05, 0x11, 0x00,
        0x00, 0x00, 0x0A, 0x00, 0x01, b'c', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
    ],
    // 5 PUBLISH QoS 1 with a payload format indicator.
    &[
        0x32, 0x0C, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, 0x02, 0x01, 0x01, b'h', b'i',
    ],
    // 3.1.1 PUBLISH QoS 0.
    &[0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'],
    // 3.1.1 and 5 SUBSCRIBE a/#.
    &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'#', 0x01],
    &[
        0x82, 0x09, 0x00, 0x01, 0x00, 0x00, 0x03, b'a', b'/', b'#', 0x01,
    ],
    // 3.1.1 UNSUBSCRIBE, PINGREQ, 5 PUBACK with a reason code, 5 DISCONNECT.
    &[0xA2, 0x07, 0x00, 0x02, 0x00, 0x03, b'a', b'/', b'b'],
    &[0xC0, 0x00],
    &[0x40, 0x04, 0x00, 0x01, 0x10, 0x00],
    &[0xE0, 0x01, 0x04],
];

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x26, 0x0B];

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                input.remove(rng.below(len));
            }
            4 if len > 0 => input.truncate(rng.below(len)),
            5 => {
                let other = SEEDS[rng.below(SEEDS.len())];
                input.extend_from_slice(other);
            }
            _ if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

/// Checks one input; returns how many packets were decoded from it.
fn check(data: &[u8]) -> u64 {
    let mut decoded_packets = 0;
    for version in VERSIONS {
        for max_packet_size in MAX_PACKET_SIZES {
            let mut buf = BytesMut::from(data);
            while let Ok(Some(packet)) = decode(&mut buf, version, max_packet_size) {
                let mut encoded = BytesMut::new();
                encode(&packet, version, &mut encoded).expect("a decoded packet is encodable");
                assert_eq!(encoded.len(), encoded_len(&packet, version));
                let decoded = decode(&mut encoded, version, u32::MAX);
                assert_eq!(
                    decoded,
                    Ok(Some(packet)),
                    "encode → decode changed the packet"
                );
                assert!(encoded.is_empty(), "re-encoded packet not consumed exactly");
                decoded_packets += 1;
            }
        }
    }
    decoded_packets
}

fn arg(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    match args.get(i + 1).map(|v| v.parse::<u64>()) {
        Some(Ok(v)) => Some(v),
        _ => {
            eprintln!("{name} needs a number");
            std::process::exit(2);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds").unwrap_or(10);
    let iterations = arg(&args, "--iterations").unwrap_or(u64::MAX);
    let seed = arg(&args, "--seed").unwrap_or(0x0005_EED0_FBAD_C0DE);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rng = Rng(seed | 1);
    let mut n = 0u64;
    let mut accepted = 0u64;
    // Quiet the default hook: the failing input is reported below.
    std::panic::set_hook(Box::new(|_| {}));
    while n < iterations && (!n.is_multiple_of(256) || Instant::now() < deadline) {
        let input = if rng.below(4) == 0 {
            let len = rng.below(64);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut v = SEEDS[rng.below(SEEDS.len())].to_vec();
            mutate(&mut rng, &mut v);
            v
        };
        match std::panic::catch_unwind(|| check(&input)) {
            Ok(packets) => accepted += packets,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                eprintln!("FAILED (seed {seed}, iteration {n}): {message}\ninput: {hex}");
                std::process::exit(1);
            }
        }
        n += 1;
    }
    println!(
        "decoder fuzz: {n} inputs, {accepted} packets decoded and re-encoded, no failure \
         (seed {seed}, {seconds}s limit)"
    );
}
