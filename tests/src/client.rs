//! A test client that runs inside pods: sends requests and prints one JSON line per answer with
//! what the echo backend saw (pod, headers, path) and what came back (status, headers). Each
//! request uses a new connection unless told otherwise, so every call is steered afresh.

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientRequest {
    /// `http://IP:PORT/path?query`: the TCP destination and request target.
    pub url: String,
    /// The authority to send (Host header / :authority); default: the URL's.
    pub host: Option<String>,
    pub method: String,
    pub headers: Vec<(String, String)>,
    /// gRPC: HTTP/2 prior knowledge, POST, `content-type: application/grpc`, on a connection
    /// of its own per request, `host` as its `:authority`.
    pub grpc: bool,
    pub count: usize,
    /// HTTP/1.1 requests share a kept connection (gRPC ones never do).
    pub keep_alive: bool,
    /// Connect from this local port (SO_REUSEADDR), and abort the connection (RST, no TIME_WAIT)
    /// after the answer, so the next request can use the same port: a reused source port.
    #[serde(default)]
    pub source_port: Option<u16>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientAnswer {
    pub status: u16,
    pub pod: String,
    /// The answering pod's namespace, as it reports it.
    pub namespace: String,
    /// The authority the backend received (Host, or HTTP/2's `:authority`).
    pub host: Option<String>,
    pub headers_at_backend: Vec<(String, String)>,
    pub path_at_backend: Option<String>,
    pub response_headers: Vec<(String, String)>,
    /// The peer address the client's socket reports (getpeername): the VIP for a redirected
    /// connection, thanks to the getpeername programs.
    pub peer: Option<String>,
    pub error: Option<String>,
}

impl ClientRequest {
    /// As command-line arguments of `gamma-client`.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--json".into(),
            serde_json::to_string(self).expect("serializable"),
        ]
    }
}

pub async fn run(request: &ClientRequest) -> Vec<ClientAnswer> {
    let mut builder = Client::builder(TokioExecutor::new());
    if !request.keep_alive {
        builder.pool_max_idle_per_host(0);
    }
    let client: Client<_, Full<Bytes>> = builder.build_http();
    let mut answers = Vec::with_capacity(request.count);
    for _ in 0..request.count.max(1) {
        let answer =
            match tokio::time::timeout(Duration::from_secs(10), once(&client, request)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => ClientAnswer {
                    error: Some(e),
                    ..Default::default()
                },
                Err(_) => ClientAnswer {
                    error: Some("timed out after 10 s".into()),
                    ..Default::default()
                },
            };
        answers.push(answer);
    }
    answers
}

async fn once(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    request: &ClientRequest,
) -> Result<ClientAnswer, String> {
    let outgoing = build(request)?;
    // The URL's address: the request's own URI names the host when it is HTTP/2's authority.
    let target = || {
        let url = request.url.parse::<Uri>().ok();
        url.as_ref()
            .and_then(ip_port)
            .ok_or("this needs an IP:port URL")
    };
    if let Some(port) = request.source_port {
        return once_from_port(outgoing, target()?, port).await;
    }
    if request.grpc {
        return once_http2(outgoing, target()?).await;
    }
    let response = client
        .request(outgoing)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let peer = response
        .extensions()
        .get::<hyper_util::client::legacy::connect::HttpInfo>()
        .map(|i| i.remote_addr().to_string());
    answer(response, peer, request.grpc).await
}

/// One request on a connection of its own from local `port`, aborted after the answer.
async fn once_from_port(
    outgoing: Request<Full<Bytes>>,
    target: std::net::SocketAddr,
    port: u16,
) -> Result<ClientAnswer, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
    // Linger 0: closing sends a reset and leaves no TIME_WAIT holding the port.
    socket.set_zero_linger().map_err(|e| e.to_string())?;
    socket
        .bind((std::net::Ipv4Addr::UNSPECIFIED, port).into())
        .map_err(|e| format!("binding port {port}: {e}"))?;
    let stream = socket
        .connect(target)
        .await
        .map_err(|e| format!("connecting from port {port}: {e}"))?;
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(outgoing)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let answer = answer(response, peer, false).await;
    drop(sender);
    let _ = connection.await;
    answer
}

/// An HTTP/2 request on a connection of its own to the URL's address, its `:authority` the
/// request's (the name the URL's address was resolved from): as a gRPC client sends it. A Host
/// beside a different `:authority` is a malformed request (RFC 9113 §8.3.1).
async fn once_http2(
    outgoing: Request<Full<Bytes>>,
    target: std::net::SocketAddr,
) -> Result<ClientAnswer, String> {
    let stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let response = sender
        .send_request(outgoing)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let answer = answer(response, peer, true).await;
    drop(sender);
    connection.abort();
    answer
}

/// The address a URI names as IP:port, if it does.
fn ip_port(uri: &Uri) -> Option<std::net::SocketAddr> {
    uri.authority()?.as_str().parse().ok()
}

fn build(request: &ClientRequest) -> Result<Request<Full<Bytes>>, String> {
    let mut uri: Uri = request
        .url
        .parse()
        .map_err(|e| format!("bad url {}: {e}", request.url))?;
    let method = if request.grpc {
        "POST"
    } else {
        request.method.as_str()
    };
    let mut host = request.host.as_ref();
    if let Some(authority) = host.filter(|_| request.grpc) {
        // HTTP/2 names it in `:authority`, from the URI.
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        uri = format!("http://{authority}{path}")
            .parse()
            .map_err(|e| format!("bad authority {authority}: {e}"))?;
        host = None;
    }
    let mut builder = Request::builder().method(method).uri(uri.clone());
    if let Some(host) = host {
        builder = builder.header(http::header::HOST, host);
    }
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let body = if request.grpc {
        builder = builder
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
    } else {
        Full::new(Bytes::new())
    };
    builder.body(body).map_err(|e| e.to_string())
}

async fn answer(
    response: http::Response<hyper::body::Incoming>,
    peer: Option<String>,
    grpc: bool,
) -> Result<ClientAnswer, String> {
    let status = response.status().as_u16();
    let response_headers = pairs(response.headers());
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let json = if grpc && bytes.len() >= 5 {
        &bytes[5..]
    } else {
        &bytes[..]
    };
    let echoed: serde_json::Value = serde_json::from_slice(json).unwrap_or(serde_json::Value::Null);
    let headers_at_backend = echoed["headers"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|h| Some((h[0].as_str()?.to_string(), h[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(ClientAnswer {
        status,
        pod: echoed["pod"].as_str().unwrap_or_default().to_string(),
        namespace: echoed["namespace"].as_str().unwrap_or_default().to_string(),
        host: echoed["host"].as_str().map(str::to_string),
        headers_at_backend,
        path_at_backend: echoed["path"].as_str().map(str::to_string),
        response_headers,
        peer,
        error: None,
    })
}

fn pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}
