//! How soon a SUBSCRIBE takes effect for a PUBLISH sent on another connection.
//!
//! A client sends SUBSCRIBE on one connection and, without waiting for the SUBACK, a PUBLISH
//! to the same topic on a second connection `d` microseconds later. The broker sees the two
//! packets on two sockets, handled by two tasks (or, for Mosquitto, one loop); if the
//! PUBLISH is routed before the subscription exists, the message is not delivered. For each
//! delay the tool runs `--trials` attempts and prints the share delivered: the *activation
//! window* is the smallest delay from which every attempt was delivered.
//!
//! MQTT 3.1.1, QoS 0, plain TCP, std sockets with TCP_NODELAY (no async runtime between the
//! tool and the wire). Usage:
//!
//! ```text
//! subscribe_activation --port 1883 [--host 127.0.0.1] [--trials 300] [--delays 0,5,10,20,50,100,200]
//!                      [--wait-ms 200]   # how long a delivery may take to count
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Args {
    host: String,
    port: u16,
    trials: usize,
    delays_us: Vec<u64>,
    wait_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        host: "127.0.0.1".to_owned(),
        port: 1883,
        trials: 300,
        delays_us: vec![0, 5, 10, 20, 50, 100, 200, 500],
        wait_ms: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--host" => args.host = value,
            "--port" => args.port = value.parse().map_err(|e| format!("--port: {e}"))?,
            "--trials" => args.trials = value.parse().map_err(|e| format!("--trials: {e}"))?,
            "--wait-ms" => args.wait_ms = value.parse().map_err(|e| format!("--wait-ms: {e}"))?,
            "--delays" => {
                args.delays_us = value
                    .split(',')
                    .map(|d| d.trim().parse().map_err(|e| format!("--delays `{d}`: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// A remaining-length-prefixed packet with a short body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn connect(host: &str, port: u16, client_id: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect((host, port))?;
    stream.set_nodelay(true)?;
    let mut body = string("MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    body.extend_from_slice(&string(client_id));
    stream.write_all(&packet(0x10, &body))?;
    let mut connack = [0u8; 4];
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!("CONNACK {connack:02x?}")));
    }
    Ok(stream)
}

/// Reads until `needle` (a PUBLISH of `payload`) shows up or `wait` passes; returns whether it
/// did.
fn received(stream: &mut TcpStream, payload: &[u8], wait: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(std::io::Error::other("the broker closed the connection")),
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(payload.len()).any(|w| w == payload) {
                    return Ok(true);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("subscribe_activation: {e}");
            std::process::exit(2);
        }
    };
    let run = || -> std::io::Result<()> {
        let tag = std::process::id();
        let mut sub = connect(&args.host, args.port, &format!("act-sub-{tag}"))?;
        let mut publ = connect(&args.host, args.port, &format!("act-pub-{tag}"))?;
        println!("delay_us  delivered  trials  share");
        let mut window = None;
        for (round, &delay) in args.delays_us.iter().enumerate() {
            let mut delivered = 0;
            for trial in 0..args.trials {
                let topic = format!("act/{tag}/{round}/{trial}");
                let payload = format!("m-{round}-{trial}");
                let mut body = vec![0, 1];
                body.extend_from_slice(&string(&topic));
                body.push(0);
                let subscribe = packet(0x82, &body);
                let mut body = string(&topic);
                body.extend_from_slice(payload.as_bytes());
                let publish = packet(0x30, &body);
                sub.write_all(&subscribe)?;
                let sent = Instant::now();
                let wait = Duration::from_micros(delay);
                while sent.elapsed() < wait {
                    std::hint::spin_loop();
                }
                publ.write_all(&publish)?;
                if received(
                    &mut sub,
                    payload.as_bytes(),
                    Duration::from_millis(args.wait_ms),
                )? {
                    delivered += 1;
                }
            }
            let share = delivered as f64 / args.trials as f64;
            println!(
                "{delay:>8}  {delivered:>9}  {:>6}  {:>5.1} %",
                args.trials,
                share * 100.0
            );
            if delivered == args.trials && window.is_none() {
                window = Some(delay);
            } else if delivered < args.trials {
                window = None;
            }
        }
        match window {
            Some(d) => println!("activation window: every attempt delivered from {d} µs on"),
            None => println!("activation window: not closed within the delays tried"),
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("subscribe_activation: {e}");
        std::process::exit(1);
    }
}
