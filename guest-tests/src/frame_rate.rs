//! The frame-rate figure of `gpu-display-bench`: a display guest writes whole frames to
//! `/dev/fb0` in a loop ([`crate::display::FrameLoop`]) on the backend's vhost-user GPU and,
//! side by side, on QEMU's own `virtio-gpu-pci` (the reference); what reached QEMU from the
//! backend is read from the backend's log line for the connection
//! (`display PATH: QEMU disconnected (N commands (M refused), U updates (B bytes))`).

use std::fmt::Write as _;

use crate::display::FrameLoop;

/// The backend's statistics of one display connection, from its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Control and cursor queue commands handled.
    pub commands: u64,
    /// Of them, answered with an error.
    pub refused: u64,
    /// UPDATE messages sent to QEMU.
    pub updates: u64,
    /// Pixel bytes in them.
    pub update_bytes: u64,
}

/// The statistics of every ended connection of the display on `path`, in log order.
pub fn connection_stats(log: &str, path: &str) -> Vec<ConnectionStats> {
    let prefix = format!("display {path}: QEMU disconnected (");
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            // "N commands (M refused), U updates (B bytes))"
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            match nums[..] {
                [commands, refused, updates, update_bytes, ..] => Some(ConnectionStats {
                    commands,
                    refused,
                    updates,
                    update_bytes,
                }),
                _ => None,
            }
        })
        .collect()
}

/// One side-by-side run.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameRateRun {
    /// The guest on the backend's vhost-user GPU.
    pub vhost_user: FrameLoop,
    /// The guest on QEMU's virtio-gpu-pci, at the same time.
    pub reference: FrameLoop,
    /// The backend's statistics of the vhost-user guest's connection.
    pub stats: ConnectionStats,
}

/// Everything `gpu-display-bench` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameRateReport {
    /// The runs.
    pub runs: Vec<FrameRateRun>,
    /// UPDATE messages of a guest that draws its picture once and writes no loop (the boot's
    /// share of every run's count).
    pub baseline_updates: u64,
    /// Bytes of one frame (stride x height).
    pub frame_bytes: u64,
    /// Seconds of each loop asked for.
    pub loop_secs: u64,
    /// The command that reproduces the figures.
    pub command: String,
}

impl FrameRateRun {
    /// Updates that reached QEMU during the loop: the run's count less the boot's.
    pub fn loop_updates(&self, baseline: u64) -> u64 {
        self.stats.updates.saturating_sub(baseline)
    }

    /// Updates per second during the loop.
    pub fn updates_per_s(&self, baseline: u64) -> f64 {
        self.loop_updates(baseline) as f64 * 1000.0 / self.vhost_user.ms as f64
    }
}

impl FrameRateReport {
    /// The markdown table and notes.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let mib = |fps: f64| fps * self.frame_bytes as f64 / f64::from(1 << 20);
        let _ = writeln!(
            s,
            "| run | written fps, vhost-user (backend) | written fps, virtio-gpu-pci (QEMU) | \
             **ratio** | MiB/s written (vhost-user) | updates reaching QEMU | updates/s | \
             MiB/s of updates |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for (i, r) in self.runs.iter().enumerate() {
            let (v, q) = (r.vhost_user.fps(), r.reference.fps());
            let ups = r.updates_per_s(self.baseline_updates);
            let upd_mib = if r.loop_updates(self.baseline_updates) == 0 {
                0.0
            } else {
                r.stats.update_bytes as f64 * ups / r.stats.updates as f64 / f64::from(1 << 20)
            };
            let _ = writeln!(
                s,
                "| {} | {v:.1} | {q:.1} | **{:.2}** | {:.0} | {} in {:.1} s | {ups:.1} | {upd_mib:.0} |",
                i + 1,
                v / q.max(f64::MIN_POSITIVE),
                mib(v),
                r.loop_updates(self.baseline_updates),
                r.vhost_user.ms as f64 / 1000.0,
            );
        }
        let _ = writeln!(
            s,
            "\n{} s loops of whole {}-byte frames; a guest that only draws its picture once \
             makes {} updates (subtracted). Command: `{}`",
            self.loop_secs, self.frame_bytes, self.baseline_updates, self.command
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_connection_statistics_and_makes_the_table() {
        let log = "\
[2026-12-05T01:00:00Z INFO  gpu_backend::vhost_user::server] display /t/d.sock: QEMU connected
[2026-12-05T01:00:09Z INFO  gpu_backend::vhost_user::server] display /t/d.sock: QEMU disconnected (530 commands (2 refused), 260 updates (1064960000 bytes))
[2026-12-05T01:00:10Z INFO  gpu_backend::vhost_user::server] display /t/x.sock: QEMU disconnected (1 commands (0 refused), 1 updates (4 bytes))
[2026-12-05T01:00:19Z INFO  gpu_backend::vhost_user::server] display /t/d.sock: QEMU disconnected (12 commands (0 refused), 3 updates (12288000 bytes))
";
        let s = connection_stats(log, "/t/d.sock");
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            ConnectionStats {
                commands: 530,
                refused: 2,
                updates: 260,
                update_bytes: 1_064_960_000
            }
        );
        assert_eq!(s[1].updates, 3);
        let run = FrameRateRun {
            vhost_user: FrameLoop {
                frames: 200,
                ms: 10_000,
            },
            reference: FrameLoop {
                frames: 250,
                ms: 10_000,
            },
            stats: s[0],
        };
        assert_eq!(run.loop_updates(60), 200);
        assert!((run.updates_per_s(60) - 20.0).abs() < 1e-9);
        let report = FrameRateReport {
            runs: vec![run],
            baseline_updates: 60,
            frame_bytes: 4_096_000,
            loop_secs: 10,
            command: "gpu-display-bench".into(),
        };
        let md = report.markdown();
        assert!(md.contains("| 1 | 20.0 | 25.0 | **0.80** |"), "{md}");
        assert!(md.contains("200 in 10.0 s | 20.0 |"), "{md}");
    }
}
