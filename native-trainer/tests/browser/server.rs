//! A static file server on 127.0.0.1 for browser tests: URL path prefixes map to directories;
//! one thread per connection, `Connection: close`, GET only.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

pub struct StaticServer {
    pub port: u16,
}

impl StaticServer {
    /// Serves `mounts` (URL prefix ending in `/` → directory); the longest matching prefix wins,
    /// and `/` itself serves `index.html` of its directory.
    pub fn start(mounts: Vec<(String, PathBuf)>) -> StaticServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mounts = mounts.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &mounts);
                });
            }
        });
        StaticServer { port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn resolve(mounts: &[(String, PathBuf)], url_path: &str) -> Option<PathBuf> {
    let path = url_path.split(['?', '#']).next().unwrap_or("/");
    if path.split('/').any(|part| part == "..") {
        return None;
    }
    let (prefix, dir) = mounts
        .iter()
        .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())?;
    let rest = &path[prefix.len()..];
    let file = if rest.is_empty() {
        dir.join("index.html")
    } else {
        dir.join(rest)
    };
    file.is_file().then_some(file)
}

fn serve(mut stream: TcpStream, mounts: &[(String, PathBuf)]) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let found = (method == "GET")
        .then(|| resolve(mounts, target))
        .flatten()
        .and_then(|file| Some((std::fs::read(&file).ok()?, content_type(&file))));
    match found {
        Some((body, mime)) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {mime}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(&body)
        }
        None => stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    }
}
