//! Private NATS servers for the replica tests: `nats-server` (Debian's package, which
//! `scripts/test` installs) with JetStream, on free loopback ports, in a folder of the test's.
//! A cluster is several such servers routed to each other.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One `nats-server` process.
pub struct NatsServer {
    pub port: u16,
    /// The port other servers of its cluster route to.
    pub route_port: u16,
    name: String,
    routes: Vec<u16>,
    dir: TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// A lone server with JetStream.
    pub fn start() -> NatsServer {
        let mut server = NatsServer::new("n1", free_port(), Vec::new());
        server.spawn();
        server
    }

    /// Three servers routed to each other, JetStream clustered over them.
    pub fn cluster3() -> Vec<NatsServer> {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers: Vec<NatsServer> = (0..3)
            .map(|i| {
                let mut server = NatsServer::new(&format!("n{}", i + 1), routes[i], routes.clone());
                server.spawn_process();
                server
            })
            .collect();
        for server in &mut servers {
            server.wait_ready();
        }
        servers
    }

    fn new(name: &str, route_port: u16, routes: Vec<u16>) -> NatsServer {
        NatsServer {
            port: free_port(),
            route_port,
            name: name.to_string(),
            routes,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        let store = self.dir.path().join("jetstream");
        let mut config = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{store}\", max_memory_store: 64MB, max_file_store: 4GB }}\n",
            name = self.name,
            port = self.port,
            store = store.display(),
        );
        if !self.routes.is_empty() {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            config.push_str(&format!(
                "cluster {{ name: zt, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                self.route_port,
                routes.join(", ")
            ));
        }
        let config_path = self.dir.path().join("nats.conf");
        std::fs::write(&config_path, config).expect("nats config");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("log");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("nats-server runs (Debian package nats-server; scripts/test installs it)");
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server {} did not start:\n{}", self.name, self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same ports and store (after [`NatsServer::kill`]).
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message read back from a stream.
#[derive(Debug, Clone)]
pub struct StreamedMessage {
    pub subject: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

/// Every message of `stream` whose subject matches `filter`, oldest first, read with direct
/// gets from the NATS server at `url`.
pub fn read_stream(url: &str, stream: &str, filter: &str) -> Vec<StreamedMessage> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("NATS");
        let jetstream = async_nats::jetstream::new(client);
        let stream = jetstream.get_stream(stream).await.expect("stream");
        let mut out = Vec::new();
        let mut next = 1;
        while let Ok(message) = stream.direct_get_next_for_subject(filter, Some(next)).await {
            next = message.sequence + 1;
            let headers = message
                .headers
                .iter()
                .filter_map(|(name, values)| {
                    Some((name.to_string(), values.first()?.as_str().to_string()))
                })
                .collect();
            out.push(StreamedMessage {
                subject: message.subject.to_string(),
                headers,
                payload: message.payload.to_vec(),
            });
        }
        out
    })
}
