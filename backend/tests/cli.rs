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
