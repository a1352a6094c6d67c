//! A software TPM for tests: a `swtpm` process on free localhost ports, tpm2-tools run against
//! it, and the device-side script `tests/tpm/device.sh` (§3.4: EK/SRK creation, activation
//! blob import, HMAC signing inside the TPM).
//!
//! Needs the Debian packages `swtpm`, `swtpm-tools` and `tpm2-tools`, which `scripts/test`
//! installs. Nothing here skips: a missing tool is a test failure saying so.
//!
//! ```no_run
//! let tpm = zerotouch_tests::swtpm::Swtpm::start();
//! let (ek_b64, srk_b64) = tpm.device_init();
//! // ... register, get `authenticationKey` back ...
//! # let authentication_key = String::new();
//! tpm.device_import(&authentication_key);
//! let sig_b64 = tpm.device_sign("scope%2fregistrations%2fid\n1700000000");
//! ```

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The tools the TPM tests run.
const TOOLS: [&str; 10] = [
    "swtpm",
    "tpm2_createek",
    "tpm2_createprimary",
    "tpm2_evictcontrol",
    "tpm2_readpublic",
    "tpm2_flushcontext",
    "tpm2_activatecredential",
    "tpm2_import",
    "tpm2_load",
    "tpm2_hmac",
];

/// Panics with an actionable message unless swtpm and tpm2-tools are on `PATH`.
pub fn require_tools() {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|tool| {
            !std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "TPM tests need swtpm and tpm2-tools, but {missing:?} are not on PATH: run them through \
         scripts/test, which installs the Debian packages swtpm, swtpm-tools and tpm2-tools \
         (or apt-get install swtpm swtpm-tools tpm2-tools)"
    );
}

/// The device-side script.
pub fn device_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tpm/device.sh")
}

/// A running swtpm with its own state directory; killed on drop.
pub struct Swtpm {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Swtpm {
    /// Starts a fresh TPM 2.0 (already started up, `TPM2_Startup(CLEAR)`) on free localhost
    /// ports `P` (commands) and `P + 1` (control, where the `swtpm` TCTI expects it), retrying
    /// if another process grabs a port first.
    pub fn start() -> Swtpm {
        require_tools();
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            std::fs::create_dir(dir.path().join("state")).expect("state dir");
            let (port, ctrl_port) = free_ports();
            let log = dir.path().join("swtpm.log");
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl_port},bindaddr=127.0.0.1"))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--tpmstate")
                .arg(format!("dir={}", dir.path().join("state").display()))
                .arg("--log")
                .arg(format!("file={},level=1", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start swtpm ({e}); scripts/test installs swtpm and tpm2-tools")
                });
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!(
                        "swtpm exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Swtpm { child, port, dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = "swtpm did not listen within 5 s".to_string();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start swtpm: {last_error}");
    }

    /// The `TPM2TOOLS_TCTI` value that reaches this TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A scratch directory that lives as long as the TPM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a tpm2-tools program against this TPM; returns its stdout, panics with its stderr
    /// if it fails.
    pub fn tool(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let mut command = Command::new(program);
        command.args(args);
        self.run(command)
    }

    /// Runs `tests/tpm/device.sh` with its state in `<dir>/device`; returns its stdout, panics
    /// with its stderr if it fails.
    pub fn device(&self, args: &[&str]) -> String {
        self.try_device(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Swtpm::device`], returning the failure (command, status, output) instead of panicking.
    pub fn try_device(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new("bash");
        command
            .arg(device_script())
            .arg(self.device_state())
            .args(args);
        self.try_run(command)
            .map(|stdout| String::from_utf8_lossy(&stdout).into_owned())
    }

    /// `device.sh`'s state directory.
    pub fn device_state(&self) -> PathBuf {
        self.dir.path().join("device")
    }

    /// `device.sh init`: returns `(endorsementKey, storageRootKey)` in base64.
    pub fn device_init(&self) -> (String, String) {
        self.device(&["init"]);
        let read = |name: &str| {
            std::fs::read_to_string(self.device_state().join(name))
                .unwrap_or_else(|e| panic!("device.sh init wrote no {name}: {e}"))
        };
        (read("ek.b64"), read("srk.b64"))
    }

    /// `device.sh import`: imports an `authenticationKey` to the persistent handle 0x81000100.
    pub fn device_import(&self, authentication_key_b64: &str) {
        self.device(&["import", authentication_key_b64]);
    }

    /// `device.sh sign`: base64 HMAC-SHA256 of `string_to_sign` computed inside the TPM.
    pub fn device_sign(&self, string_to_sign: &str) -> String {
        self.device(&["sign", string_to_sign]).trim().to_string()
    }

    /// A SAS token for `resource`, valid 10 minutes, whose signature is computed inside the
    /// TPM with the imported key.
    pub fn sas_token(&self, resource: &str, key_name: Option<&str>) -> String {
        use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
        const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let sr = utf8_percent_encode(resource, ENCODE).to_string();
        let se = zerotouch_service::time::now_unix() + 600;
        let sig = self.device_sign(&format!("{sr}\n{se}"));
        let mut token = format!(
            "SharedAccessSignature sr={sr}&sig={}&se={se}",
            utf8_percent_encode(sig.trim(), ENCODE)
        );
        if let Some(name) = key_name {
            token.push_str(&format!("&skn={name}"));
        }
        token
    }

    fn run(&self, command: Command) -> Vec<u8> {
        self.try_run(command).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_run(&self, mut command: Command) -> Result<Vec<u8>, String> {
        let description = format!("{command:?}");
        let output = command
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {description} ({e}); scripts/test installs tpm2-tools")
            });
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(format!(
                "{description} failed with {}:\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port `P` such that `P` and `P + 1` were both free a moment ago: the swtpm TCTI reaches
/// the control channel at the server port + 1.
fn free_ports() -> (u16, u16) {
    for _ in 0..100 {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = server.local_addr().expect("local addr").port();
        let Some(ctrl_port) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", ctrl_port)).is_ok() {
            return (port, ctrl_port);
        }
    }
    panic!("found no two consecutive free localhost ports");
}
