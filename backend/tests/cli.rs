//! The `gpu-backend` binary as a user runs it.

use std::process::Command;

fn gpu_backend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gpu-backend")
}

#[test]
fn inspect_json_shows_the_gh200_vram_bar_as_128_gib_with_95_gib_mappable() {
    let out = gpu_backend(&["inspect", "--profile", "gh200-96g", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bars = json["bars"].as_array().unwrap();
    let usemem = bars.iter().find(|b| b["index"] == 4).unwrap();
    assert_eq!(usemem["role"], "vram");
    assert_eq!(usemem["real_size"], 95u64 << 30);
    assert_eq!(usemem["presented_size"], 128u64 << 30);
    assert_eq!(usemem["padding"], 33u64 << 30);
    assert_eq!(usemem["mappable"][0]["offset"], 0);
    assert_eq!(usemem["mappable"][0]["size"], 95u64 << 30);
    assert_eq!(usemem["trapped"][0]["offset"], 95u64 << 30);
    assert_eq!(json["pci"]["vendor_id"], 0x10de);
    assert_eq!(json["chip"]["name"], "gh200-96g");
    for bar in bars {
        assert!(bar["presented_size"].as_u64().unwrap().is_power_of_two());
    }
}

#[test]
fn inspect_table_names_every_bar() {
    let out = gpu_backend(&["inspect", "--profile", "tu102-24g"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["BAR0", "BAR1", "BAR3", "tu102-24g", "padding", "32 GiB"] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[test]
fn unknown_profile_exits_2_naming_the_valid_ones() {
    let out = gpu_backend(&["inspect", "--profile", "rtx-9999"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for name in [
        "tu102-24g",
        "ga100-80g",
        "gh100-80g",
        "gh200-96g",
        "gb202-32g",
    ] {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn help_lists_the_profiles() {
    let out = gpu_backend(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("gh200-96g") && text.contains("gb202-32g"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Slicing: `--guest SOCKET:SIZE` and `--slice-size SIZE`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use gpu_backend::vfio_user::test_client::TestClient;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn whole_gpu_inspect_shows_the_slice_and_bar0_trapped_ranges() {
    let out = gpu_backend(&["inspect", "--profile", "tu102-24g", "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["slice"]["whole_gpu"], true);
    assert_eq!(json["slice"]["start"], 0);
    assert_eq!(json["slice"]["size"], json["chip"]["vram_size"]);
    let bar0 = &json["bars"][0];
    let trapped = bar0["trapped"].as_array().unwrap();
    let find = |offset: u64| {
        trapped
            .iter()
            .find(|t| t["offset"] == offset)
            .unwrap_or_else(|| panic!("no trapped range at {offset:#x}: {trapped:?}"))
    };
    assert_eq!(find(0x1000)["size"], 0x1000);
    assert!(find(0x1000)["reason"].as_str().unwrap().contains("0x1700"));
    assert_eq!(find(0x70_0000)["size"], 0x10_0000);
    assert_eq!(find(0xB9_0000)["size"], 256);
    assert_eq!(find(0xBA_0000)["size"], 8);
    // The ranges cover BAR0 exactly, in order.
    let mut at = 0;
    for t in trapped {
        assert_eq!(t["offset"], at);
        at += t["size"].as_u64().unwrap();
    }
    assert_eq!(at, 16 * MIB);
    let registers = json["registers"].as_array().unwrap();
    assert!(registers
        .iter()
        .any(|r| r["name"] == "NV_PMC_BOOT_0" && r["treatment"] == "passed (reads)"));
    assert!(registers
        .iter()
        .any(|r| r["offset"] == 0xB8_30B0u64 && r["treatment"] == "hidden"));
}

#[test]
fn inspect_with_guests_shows_consecutive_slices() {
    let out = gpu_backend(&[
        "inspect",
        "--profile",
        "gh100-80g",
        "--json",
        "--guest",
        "/run/g0.sock:8G",
        "--guest",
        "/run/g1.sock:6G",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let guests = json["guests"].as_array().unwrap();
    assert_eq!(guests.len(), 2);
    assert_eq!(guests[0]["socket"], "/run/g0.sock");
    assert_eq!(guests[0]["slice"]["start"], 0);
    assert_eq!(guests[0]["slice"]["size"], 8 * GIB);
    assert_eq!(guests[1]["slice"]["start"], 8 * GIB);
    assert_eq!(guests[1]["slice"]["size"], 6 * GIB);
    assert_eq!(guests[1]["slice"]["whole_gpu"], false);
    // Guest 1's VRAM BAR: 6 GiB real in 8 GiB, mapped from host VRAM at 8 GiB; the
    // instance-memory BAR is the host's.
    let bars = guests[1]["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 2, "{bars:?}");
    let vram = bars.iter().find(|b| b["role"] == "vram").unwrap();
    assert_eq!(vram["real_size"], 6 * GIB);
    assert_eq!(vram["presented_size"], 8 * GIB);
    assert_eq!(vram["host_vram_offset"], 8 * GIB);
    let w0 = guests[0]["slice"]["bar1_window"].as_u64().unwrap();
    let w1 = guests[1]["slice"]["bar1_window"].as_u64().unwrap();
    assert!(w1 >= w0 + 8 * GIB + 2 * MIB, "guard between windows");
    let p = &json["partition"];
    assert_eq!(p["host_reserved"]["offset"], p["guest_area_end"]);
    assert!(p["host_reserved"]["size"].as_u64().unwrap() >= 64 * MIB);
    assert_eq!(
        p["free"].as_u64().unwrap(),
        p["guest_area_end"].as_u64().unwrap() - 14 * GIB
    );
    // The table names both guests and the host-reserved region.
    let out = gpu_backend(&[
        "inspect",
        "--profile",
        "gh100-80g",
        "--slice-size",
        "8G",
        "--slice-size",
        "512M",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "== guest 0",
        "== guest 1",
        "host-reserved",
        "BAR1 window",
        "0x10fd40",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[test]
fn bad_guest_sizes_exit_2_with_a_clear_error() {
    let cases: [(&[&str], &str); 7] = [
        (&["--guest", "/tmp/a.sock:0"], "non-zero"),
        (&["--guest", "/tmp/a.sock:3M"], "2 MiB"),
        (&["--guest", "/tmp/a.sock:lots"], "not a size"),
        (&["--guest", "/tmp/a.sock"], "SOCKET:SIZE"),
        (
            &["--guest", "/tmp/a.sock:20G", "--guest", "/tmp/b.sock:8G"],
            "no free",
        ),
        (
            &["--guest", "/tmp/a.sock:2M", "--guest", "/tmp/a.sock:2M"],
            "more than one guest",
        ),
        (&["--slice-size", "30G"], "no free"),
    ];
    for (args, message) in cases {
        let mut all = vec!["inspect", "--profile", "tu102-24g"];
        all.extend_from_slice(args);
        let out = gpu_backend(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(message), "{all:?}: {err}");
    }
    // serve refuses the same before creating any socket.
    let dir = temp_dir("bad");
    let sock = dir.join("a.sock");
    let arg = format!("{}:30G", sock.display());
    let out = gpu_backend(&["serve", "--profile", "tu102-24g", "--guest", &arg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!sock.exists());
    // Neither --socket nor --guest, or both: usage errors.
    let out = gpu_backend(&["serve", "--profile", "tu102-24g"]);
    assert_eq!(out.status.code(), Some(2));
    let out = gpu_backend(&[
        "serve",
        "--profile",
        "tu102-24g",
        "--socket",
        "/tmp/x.sock",
        "--guest",
        &arg,
    ]);
    assert_eq!(out.status.code(), Some(2));
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gpu-backend-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for(socket: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_with_two_guests_isolates_them_and_stops_on_sigterm() {
    let dir = temp_dir("guests");
    let (s0, s1) = (dir.join("g0.sock"), dir.join("g1.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-backend"))
        .args(["serve", "--profile", "tu102-24g", "--guest"])
        .arg(format!("{}:6M", s0.display()))
        .arg("--guest")
        .arg(format!("{}:4M", s1.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&s0, &mut child);
    wait_for(&s1, &mut child);
    let mut g0 = TestClient::connect(&s0).unwrap();
    g0.version().unwrap();
    let mut g1 = TestClient::connect(&s1).unwrap();
    g1.version().unwrap();
    // Guest 0 fills its VRAM BAR and its aperture; guest 1 sees none of it at the same
    // guest addresses, and its aperture past its 4 MiB reads ~0.
    g0.region_write(1, 0, &[0x66; 4096], false).unwrap();
    g0.region_write(0, 0x1700, &0x40u32.to_le_bytes(), true)
        .unwrap(); // guest 4 MiB
    g0.region_write(0, 0x70_0000, &[0x77; 64], false).unwrap();
    assert_eq!(g1.region_read(1, 0, 64).unwrap(), vec![0; 64]);
    g1.region_write(0, 0x1700, &0x40u32.to_le_bytes(), true)
        .unwrap();
    assert_eq!(g1.region_read(0, 0x70_0000, 64).unwrap(), vec![0xFF; 64]);
    g1.region_write(0, 0x1700, &0x3Fu32.to_le_bytes(), true)
        .unwrap();
    assert_eq!(
        g1.region_read(0, 0x70_FFFC, 8).unwrap(),
        [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]
    );
    // Guest 0 reads its own data back; its 6 MiB BAR is presented as 8 MiB.
    g0.region_write(0, 0x1700, &0x40u32.to_le_bytes(), true)
        .unwrap();
    assert_eq!(g0.region_read(0, 0x70_0000, 64).unwrap(), vec![0x77; 64]);
    assert_eq!(
        g0.region_read(1, 6 * MIB - 2, 4).unwrap(),
        [0x00, 0x00, 0xFF, 0xFF]
    );
    drop((g0, g1));
    // SAFETY: kill(2) on a child we own.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!s0.exists() && !s1.exists(), "sockets left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_boots_the_gsp_and_shows_its_framebuffer_regions() {
    let out = gpu_backend(&["inspect", "--profile", "gh200-96g", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gsp = &json["gsp"];
    assert_eq!(gsp["usable_vram"], 95u64 << 30);
    let regions = gsp["fb_regions"].as_array().unwrap();
    assert_eq!(regions[0]["kind"], "usable");
    assert_eq!(regions[0]["size"], 95u64 << 30);
    assert!(regions
        .iter()
        .any(|r| r["kind"] == "board_reserved" && r["size"] == 1u64 << 30));
    assert!(gsp["boot_events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "GSP_INIT_DONE"));
    let table = gpu_backend(&["inspect", "--profile", "tu102-24g"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("GSP (tu102-24g") && text.contains("usable"),
        "{text}"
    );
}

#[test]
fn serve_rejects_a_poll_spin_over_one_millisecond() {
    let out = gpu_backend(&[
        "serve",
        "--profile",
        "tu102-24g",
        "--socket",
        "/nonexistent/never.sock",
        "--poll-spin-us",
        "5000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("poll-spin-us"));
}
