//! GSP RPC benchmark: host → emulated GSP → host through the command and message queues,
//! against a plain two-thread channel round trip measured in the same run.
//!
//! Run: `cargo bench -p gpu-backend --bench gsp_rpc`

use gpu_backend::gsp::bench::{measure_rpc, TransportFigures};

fn us(d: std::time::Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

fn row(what: &str, gsp: &TransportFigures, channel: &TransportFigures) {
    println!(
        "| {what} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.0} | {:.2}x | {:.2}x | {:.3} |",
        us(gsp.round_trip_p50),
        us(gsp.round_trip_p99),
        gsp.messages_per_second,
        us(channel.round_trip_p50),
        us(channel.round_trip_p99),
        channel.messages_per_second,
        gsp.round_trip_p50.as_nanos() as f64 / channel.round_trip_p50.as_nanos().max(1) as f64,
        gsp.round_trip_p99.as_nanos() as f64 / channel.round_trip_p99.as_nanos().max(1) as f64,
        gsp.messages_per_second / channel.messages_per_second.max(1.0),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "GSP RPC on the emulated gh100-80g vs std::sync::mpsc between two threads (µs, msgs/s)"
    );
    println!();
    println!("| payload | GSP p50 | GSP p99 | GSP msgs/s | channel p50 | channel p99 | channel msgs/s | p50 ratio | p99 ratio | throughput ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for payload in [0usize, 4000] {
        let m = measure_rpc("gh100-80g", 20_000, 50_000, payload).expect("GSP benchmark");
        row(&format!("{payload} B"), &m.gsp, &m.channel);
    }
}
