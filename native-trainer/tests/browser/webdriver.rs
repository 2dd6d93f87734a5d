//! The few WebDriver commands a page test needs (W3C protocol: JSON over HTTP), spoken to a
//! chromedriver this module starts, over plain std TCP (one `Connection: close` request per
//! command).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    /// The browser's fresh profile directory, removed at the end.
    profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open: read the head, then the body its
    // Content-Length announces (or chunks up to the last one).
    let mut response = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let complete = |r: &[u8]| -> Option<Vec<u8>> {
        let split = r.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&r[..split]).to_ascii_lowercase();
        let body = &r[split..];
        if head.contains("transfer-encoding:") && head.contains("chunked") {
            return body.ends_with(b"0\r\n\r\n").then(|| dechunk(body));
        }
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        (body.len() >= length).then(|| body[..length].to_vec())
    };
    let content = loop {
        if let Some(content) = complete(&response) {
            break content;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break complete(&response).unwrap_or_default();
        }
        response.extend_from_slice(&buf[..n]);
    };
    serde_json::from_slice(&content).map_err(|e| {
        std::io::Error::other(format!(
            "{method} {path}: not JSON ({e}): {:.300}",
            String::from_utf8_lossy(&response)
        ))
    })
}

/// The body of a `Transfer-Encoding: chunked` answer: hex size, CRLF, data, CRLF, ..., 0.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let data = &rest[eol + 2..];
        let size = size.min(data.len());
        out.extend_from_slice(&data[..size]);
        rest = data.get(size + 2..).unwrap_or(&[]);
    }
    out
}

impl Browser {
    /// Starts `chromedriver` and a headless `chromium` session with a fresh profile, the
    /// window `width`×`height` CSS pixels.
    pub fn start(chromedriver: &Path, chromium: &Path, width: u32, height: u32) -> Browser {
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        // From here on, a panic drops `browser`, which ends chromedriver.
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile: tempfile::tempdir().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/status", None).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--hide-scrollbars".into(),
            // SwiftShader's WebGPU adapter, for the chat page.
            "--enable-unsafe-webgpu".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser.profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            // The browser's own console lines (WebGPU's validation warnings among them), which
            // a page's console hooks never see.
            "goog:loggingPrefs": {"browser": "ALL"}
        }}});
        let answer = browser.command("POST", "/session", Some(&capabilities));
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_string();
        browser
    }

    /// One command; panics with the driver's message on a WebDriver error. Returns `value`.
    fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let answer = http(self.port, method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let value = answer["value"].clone();
        if let Some(error) = value.get("error") {
            panic!("WebDriver {method} {path}: {error}: {}", value["message"]);
        }
        value
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.command(
            "POST",
            &self.session_path("/url"),
            Some(&json!({ "url": url })),
        );
    }

    /// Runs `script` (a function body: `return …`) in the page.
    pub fn eval(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        self.command("POST", &self.session_path("/execute/sync"), Some(&body))
    }

    /// Runs `script`, which ends by calling `arguments[0]` with its result (after promises).
    pub fn eval_async(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        self.command("POST", &self.session_path("/execute/async"), Some(&body))
    }

    /// Polls `script` until it returns `want`; panics with what it last returned (and `why`'s
    /// answer, the page's visible error, and the browser's console) after `timeout`.
    pub fn wait_for(&self, script: &str, want: &Value, timeout: Duration, why: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.eval(script);
            if &got == want {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {timeout:?} for `{script}` to be {want}; it is {got}; page says: {}; \
                     console: {:#?}",
                    self.eval(why),
                    self.console_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Picks `files` in the `<input type="file">` that `css` selects (hidden ones too).
    pub fn pick_files(&self, css: &str, files: &[&Path]) {
        let body = json!({ "using": "css selector", "value": css });
        let element = self.command("POST", &self.session_path("/element"), Some(&body));
        let id = element
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element `{css}`: {element}"))
            .to_string();
        let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        let body = json!({ "text": paths.join("\n") });
        self.command(
            "POST",
            &self.session_path(&format!("/element/{id}/value")),
            Some(&body),
        );
    }

    /// The browser console's lines since the last call (chromedriver's log endpoint): what
    /// the page logged and what the browser itself reported, e.g. WebGPU errors.
    pub fn console_log(&self) -> Vec<String> {
        let body = json!({ "type": "browser" });
        let entries = self.command("POST", &self.session_path("/se/log"), Some(&body));
        entries
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| format!("{} {}", e["level"], e["message"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Resizes the window to `width`×`height` CSS pixels.
    pub fn resize(&self, width: u32, height: u32) {
        let body = json!({ "width": width, "height": height });
        self.command("POST", &self.session_path("/window/rect"), Some(&body));
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        let b64 = self.command("GET", &self.session_path("/screenshot"), None);
        decode_base64(b64.as_str().expect("base64 text"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(self.port, "DELETE", &self.session_path(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(value)
        .collect();
    digits
        .chunks(4)
        .flat_map(|g| {
            let n = g
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(g.len() - 1)
        })
        .collect()
}

#[test]
fn dechunks() {
    assert_eq!(
        dechunk(b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"),
        b"Wikipedia"
    );
}

#[test]
fn base64_decodes() {
    assert_eq!(decode_base64("aGVsbG8="), b"hello");
    assert_eq!(decode_base64("aGk="), b"hi");
    assert_eq!(decode_base64("YWJj"), b"abc");
}
