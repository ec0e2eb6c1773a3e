//! `virtsec lab`, the default scenario, as a user runs it: every step passes; `--json` gives
//! the same timeline; a kept lab refuses a second one and `virtsec lab down` removes it; a lab
//! interrupted midway (Ctrl-C) or killed (SIGKILL, then `lab down`) leaves nothing behind:
//! no namespace, no virtsecd, no run directory, no lock. One test function, because the lab's
//! namespaces have fixed names (one lab per machine). Needs root; skipped otherwise.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("vslab-"))
        .map(str::to_string)
        .collect()
}

fn virtsecd_running(run_dir: &std::path::Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", &format!("virtsecd --config {}", run_dir.display())])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

fn assert_clean(run_dir: &std::path::Path, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ns = lab_namespaces();
        let d = virtsecd_running(run_dir);
        let dir = run_dir.exists();
        let lock = std::path::Path::new("/run/virtsec-lab.pid").exists();
        if ns.is_empty() && !d && !dir && !lock {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: left behind: namespaces {ns:?}, virtsecd running {d}, run dir {dir}, lock {lock}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lab(run_dir: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(VIRTSEC);
    c.arg("lab").arg("--run-dir").arg(run_dir).args(args);
    c
}

/// Starts a lab and returns it once its output contains `marker`.
fn start_until(run_dir: &std::path::Path, args: &[&str], marker: &str) -> std::process::Child {
    let mut child = lab(run_dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains(&marker) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the lab did not reach the expected point");
    child
}

fn signal(child: &std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn the_default_lab_passes_and_leaves_nothing_behind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED the_default_lab_passes_and_leaves_nothing_behind: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("lab");

    // The default scenario, human output: every step passes, well within 60 s.
    let t = Instant::now();
    let out = lab(&run_dir, &[]).output().unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("13 passed, 0 failed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_clean(&run_dir, "after a normal run");

    // --json: the same timeline, one object per step.
    let out = lab(&run_dir, &["--json"]).output().unwrap();
    assert!(out.status.success());
    let steps: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    assert_eq!(steps.len(), 13);
    assert!(steps.iter().all(|s| s["ok"] == true), "{steps:?}");
    assert!(steps[7]["name"].as_str().unwrap().contains("signature"));
    assert_clean(&run_dir, "after --json");

    // --keep: the host stays; a second lab refuses; `lab down` removes it.
    let mut kept = start_until(&run_dir, &["--keep"], "The lab keeps running");
    let st = cli_at(&run_dir.join("control.sock"), &["status", "--json"]);
    assert!(st.status.success());
    let second = lab(&tmp.path().join("other"), &[]).output().unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let down = Command::new(VIRTSEC)
        .args(["lab", "down"])
        .output()
        .unwrap();
    assert!(down.status.success());
    let _ = kept.wait();
    assert_clean(&run_dir, "after lab down");

    // Ctrl-C midway: the lab tears down what it made.
    let mut c = start_until(&run_dir, &[], "[ 5]");
    signal(&c, nix::sys::signal::Signal::SIGINT);
    let st = c.wait().unwrap();
    assert!(!st.success(), "an interrupted lab must not report success");
    assert_clean(&run_dir, "after Ctrl-C midway");

    // SIGKILL midway: nothing can run in the lab; virtsecd dies with it, `lab down` (or the
    // next lab) removes the rest.
    let mut c = start_until(&run_dir, &[], "[ 4]");
    signal(&c, nix::sys::signal::Signal::SIGKILL);
    let _ = c.wait();
    let down = Command::new(VIRTSEC)
        .args(["lab", "down"])
        .output()
        .unwrap();
    assert!(down.status.success());
    assert_clean(&run_dir, "after SIGKILL midway and lab down");
}

fn cli_at(control: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(VIRTSEC)
        .arg("--control-socket")
        .arg(control)
        .args(args)
        .output()
        .unwrap()
}
