//! `cargo xtask test-dashboard`: the demo's training dashboard (Burn's TUI) run in a 120x40
//! pseudo-terminal as a user's terminal would run it, rendered by the `pyte` terminal emulator
//! (in a venv made once under the target folder), and checked for the PO metrics.

use std::process::Command;

use anyhow::bail;

use crate::web;

/// The `pyte` release the check pins.
const PYTE: &str = "pyte==0.8.2";

/// Runs a short demo under the dashboard and checks what it draws.
pub fn test_dashboard() -> anyhow::Result<()> {
    crate::build_bins("building phantom-train")?;
    let python = crate::python_with("pyte-venv", PYTE, "pyte")?;
    let target = web::target_dir();
    let frame = target.join("dashboard-frame.txt");
    let out = target.join("dashboard-demo");
    let mut capture = Command::new(python);
    capture
        .arg(web::root().join("xtask/dashboard/capture.py"))
        .args([
            "--cols",
            "120",
            "--rows",
            "40",
            "--until",
            "held-out accuracy",
        ])
        .arg("--frame")
        .arg(&frame);
    for word in [
        "loss",
        "pref_loss",
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "Status:",
        "Progress",
    ] {
        capture.args(["--expect", word]);
    }
    capture
        .arg("--")
        .arg(target.join("debug/phantom-train"))
        .args([
            "demo",
            "--steps",
            "60",
            "--train-size",
            "64",
            "--eval-size",
            "8",
            "--device",
            "flex",
            "--out",
        ])
        .arg(&out);
    let status = capture.status()?;
    let drawn = std::fs::read_to_string(&frame).unwrap_or_default();
    println!("{drawn}");
    println!("(frame saved to {})", frame.display());
    if !status.success() {
        bail!("the dashboard did not draw the PO metrics");
    }
    Ok(())
}
