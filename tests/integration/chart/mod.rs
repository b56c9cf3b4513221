//! The Helm chart against the real API server: install (the operator runs as a Pod under the
//! chart's ServiceAccount), upgrade, uninstall, values the schema refuses, server-side dry runs
//! of every rendered manifest; and the generated CRD reference.

mod install;
mod reference;
mod render;
mod values;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/inventory-outbox")
}

/// A tool the stack's env file names (`source ~/.local/state/inventory-outbox/env.sh`).
fn tool(var: &str) -> Command {
    let path =
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: source the env file `make env-up` writes"));
    let mut cmd = Command::new(path);
    cmd.env("KUBECONFIG", super::support::kubeconfig_path());
    cmd
}

pub fn helm() -> Command {
    tool("HELM")
}

pub fn kubectl() -> Command {
    tool("KUBECTL")
}

/// Runs `cmd` (with `stdin` piped in, if any) and returns its output, whatever its exit status.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    use std::io::Write as _;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input)
            .unwrap_or_else(|e| panic!("write stdin of {cmd:?}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

/// Runs `cmd` and panics with its stderr and stdout unless it succeeds; returns stdout.
pub fn run_ok(cmd: Command, stdin: Option<&[u8]>, what: &str) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd, stdin);
    assert!(
        out.status.success(),
        "{what} failed ({}): {shown}\nstderr:\n{}\nstdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(repository, tag)` of the image mapped onto this test binary's `inventory-outbox`.
pub fn test_image() -> (String, String) {
    let image = super::support::cluster::register_test_image();
    let (repo, tag) = image.rsplit_once(':').expect("test image has a tag");
    (repo.to_owned(), tag.to_owned())
}

/// Applies the ServiceMonitor and PrometheusRule CRDs that hack/components/chart-tools.sh
/// caches (the chart's optional monitoring objects need them) and waits until they are served.
pub fn install_monitoring_crds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut env = Command::new(repo_root().join("hack/components/chart-tools.sh"));
        env.arg("env");
        let lines = run_ok(env, None, "hack/components/chart-tools.sh env");
        let dir = lines
            .lines()
            .find_map(|l| l.strip_prefix("export MONITORING_CRDS="))
            .map(|v| v.trim_matches('"').to_owned())
            .expect("chart-tools.sh env prints MONITORING_CRDS");
        assert!(
            Path::new(&dir)
                .join("monitoring.coreos.com_prometheusrules.yaml")
                .is_file(),
            "the monitoring CRDs are not cached in {dir}: run `hack/components/chart-tools.sh install`"
        );
        let mut apply = kubectl();
        apply.args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=inventory-outbox-tests",
            "-f",
            &dir,
        ]);
        run_ok(apply, None, "apply the monitoring CRDs");
        let mut wait = kubectl();
        wait.args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ]);
        run_ok(wait, None, "wait for the monitoring CRDs");
    });
}

/// Values turning every optional object of the chart on.
pub fn all_optional_objects() -> Vec<String> {
    [
        "metrics.service.enabled=true",
        "metrics.serviceMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "grafanaDashboard.enabled=true",
        "networkPolicy.enabled=true",
        "networkPolicy.apiServerCIDRs[0]=127.0.0.1/32",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Deletes a test's namespace however the test ends (a panic included), without waiting.
pub struct NamespaceGuard(pub String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let mut delete = kubectl();
        delete.args(["delete", "namespace", &self.0, "--wait=false", "--ignore-not-found"]);
        let _ = run(delete, None);
    }
}
