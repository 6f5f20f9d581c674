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
    /// gRPC: HTTP/2 prior knowledge, POST, `content-type: application/grpc`.
    pub grpc: bool,
    pub count: usize,
    pub keep_alive: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientAnswer {
    pub status: u16,
    pub pod: String,
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
    builder.http2_only(request.grpc);
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
    let uri: Uri = request
        .url
        .parse()
        .map_err(|e| format!("bad url {}: {e}", request.url))?;
    let method = if request.grpc {
        "POST"
    } else {
        request.method.as_str()
    };
    let mut builder = Request::builder().method(method).uri(uri.clone());
    if let Some(host) = &request.host {
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
    let response = client
        .request(builder.body(body).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let response_headers = pairs(response.headers());
    let peer = response
        .extensions()
        .get::<hyper_util::client::legacy::connect::HttpInfo>()
        .map(|i| i.remote_addr().to_string());
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let json = if request.grpc && bytes.len() >= 5 {
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
