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
    // Whole-GPU mode: only the emulated rules and the (hidden) PCI config mirror are listed,
    // everything else is passed.
    let registers = json["registers"].as_array().unwrap();
    assert!(registers.iter().all(|r| r["treatment"] == "emulated"
        || (r["name"] == "PCI config mirror" && r["treatment"] == "hidden")));
    assert!(registers
        .iter()
        .any(|r| r["name"] == "PCI config mirror" && r["offset"] == 0x8_8000));
    assert!(registers
        .iter()
        .any(|r| r["name"] == "NV_PBUS_BAR0_WINDOW" && r["offset"] == 0x1700));
    assert_eq!(json["unlisted_registers"], "passed (reads and writes)");
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
    // Sliced guests keep the default-deny table.
    let registers = guests[1]["registers"].as_array().unwrap();
    assert!(registers
        .iter()
        .any(|r| r["name"] == "NV_PMC_BOOT_0" && r["treatment"] == "passed (reads)"));
    assert!(registers
        .iter()
        .any(|r| r["offset"] == 0xB8_30B0u64 && r["treatment"] == "hidden"));
    assert_eq!(guests[1]["unlisted_registers"], "hidden");
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
    let sock =
        std::env::temp_dir().join(format!("gpu-backend-cli-{}-bad.sock", std::process::id()));
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

/// `--vfio` with something that is not a usable NVIDIA GPU: exit 2, the device named,
/// nothing started (the real sysfs of this machine, which has no NVIDIA GPU).
#[test]
fn vfio_bad_devices_exit_2_with_the_reason() {
    for (args, needle) in [
        (vec!["inspect", "--vfio", "01:00"], "is not a PCI address"),
        (
            vec!["inspect", "--vfio", "0000:fe:1f.7"],
            "no PCI device 0000:fe:1f.7",
        ),
        (
            vec![
                "serve",
                "--vfio",
                "0000:fe:1f.7",
                "--socket",
                "/tmp/never.sock",
            ],
            "no PCI device",
        ),
        (vec!["measure", "--vfio", "0000:fe:1f.7"], "no PCI device"),
    ] {
        let out = gpu_backend(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/never.sock").exists());
    // Any PCI function of this machine that is not NVIDIA's is refused as such.
    let other = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .flatten()
        .find(|d| {
            std::fs::read_to_string(d.path().join("vendor")).is_ok_and(|v| v.trim() != "0x10de")
        })
        .expect("a PCI function");
    let address = other.file_name().to_string_lossy().into_owned();
    let out = gpu_backend(&["inspect", "--vfio", &address]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{address} is not an NVIDIA GPU")),
        "{err}"
    );
    // --vfio and --profile are exclusive.
    let out = gpu_backend(&["inspect", "--vfio", &address, "--profile", "tu102-24g"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_display_arguments_exit_2_and_start_nothing() {
    let dir = std::env::temp_dir().join(format!("gpu-backend-cli-display-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    let (g0, g1, d0) = (path("g0.sock"), path("g1.sock"), path("d0.sock"));
    let file = path("precious.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let live = path("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let keyed = |socket: &str, display: &str| format!("socket={socket},vram=2M,display={display}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        // A display path that exists and is not a socket, or a live one.
        (
            vec![
                "--socket".into(),
                g0.clone(),
                "--display".into(),
                file.clone(),
            ],
            "exists and is not a socket",
        ),
        (
            vec!["--guest".into(), keyed(&g0, &file)],
            "exists and is not a socket",
        ),
        (
            vec![
                "--socket".into(),
                g0.clone(),
                "--display".into(),
                live.clone(),
            ],
            "in use",
        ),
        // A display without a guest.
        (vec!["--display".into(), d0.clone()], "--socket"),
        (
            vec![
                "--guest".into(),
                format!("{g0}:2M"),
                "--display".into(),
                d0.clone(),
            ],
            "cannot be used with",
        ),
        (
            vec!["--guest".into(), format!("vram=2M,display={d0}")],
            "no `socket=`",
        ),
        // Two guests on one display path, or a display on a guest's socket.
        (
            vec![
                "--guest".into(),
                keyed(&g0, &d0),
                "--guest".into(),
                keyed(&g1, &d0),
            ],
            "more than one guest",
        ),
        (
            vec![
                "--guest".into(),
                keyed(&g0, &d0),
                "--guest".into(),
                keyed(&g1, &g0),
            ],
            "more than one guest",
        ),
        (
            vec![
                "--socket".into(),
                g0.clone(),
                "--display".into(),
                g0.clone(),
            ],
            "more than one guest",
        ),
        (
            vec!["--guest".into(), format!("socket={g0},vram=2M,screen={d0}")],
            "unknown key",
        ),
        (
            vec!["--guest".into(), format!("socket={g0},vram=2M,msix=no")],
            "expected `msix=on` or `msix=off`",
        ),
        (
            vec![
                "--socket".into(),
                g0.clone(),
                "--guest".into(),
                format!("{g1}:2M"),
                "--no-msix".into(),
            ],
            "cannot be used with",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["serve", "--profile", "tu102-24g"];
        all.extend(args.iter().map(String::as_str));
        let out = gpu_backend(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(message), "{all:?}: {err}");
        for p in [&g0, &g1, &d0] {
            assert!(!std::path::Path::new(p).exists(), "{all:?} created {p}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
